"""kvblend: RAG inference with CacheBlend-style chunk KV reuse.

Public API: Engine (prompt -> chunk store -> blended prefill -> decoding), EngineConfig (every setting),
SamplingParams. Import cost stays low: the heavy modules load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "Engine":
        from kvblend.engine import Engine

        return Engine
    if name == "EngineConfig":
        from kvblend.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from kvblend.generation.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kvblend' has no attribute {name!r}")
