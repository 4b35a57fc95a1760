"""TTFT, defined once.

The clock of a request starts when the request (prompt token ids + chunk keys) is handed to the engine, and
TTFT ends when the first output token has been sampled. Inside TTFT: hashing the chunk keys, fetching each
chunk from the tier it is on to the GPU tier (disk reads verify the file: reported as `fetch_ms`), placing and
re-rotating cached KV, the prefill, a warm-start promotion round, sampling the first token. Outside TTFT,
reported as `build_ms`: building a chunk that is missing or whose file is corrupt (a prefill of the chunk alone
plus its write), wherever on the read path that happens before the first token. Staging chunks into a common
starting tier before a timed comparison (Engine.stage) happens before the clock starts.

Decoders measure TTFT as now - t_start; RequestClock.ttft_start() hands them a start shifted by the build
time excluded so far, so every path (plain, speculative, demo, pipeline, server) reports the same quantity.

Cold and warm are the same quantity from two starting points: cold, the chunks start on the comparison's start
tier (or where a prefetch put them, which the answer's chunk_tiers record); warm, they are GPU-resident
(kvblend.pipeline.decode.answer_plans times both).
Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestClock:
    start: float = field(default_factory=time.perf_counter)
    build_ms: float = 0.0  # excluded from TTFT: building missing / corrupt chunks
    fetch_ms: float = 0.0  # included in TTFT: bringing cached chunks from their tier to the GPU tier

    def exclude(self, ms: float) -> None:
        """Time spent building chunks: reported apart, taken out of TTFT."""
        self.build_ms += ms

    def ttft_start(self) -> float:
        """The perf_counter value a decoder measures TTFT from (the request start plus excluded time)."""
        return self.start + self.build_ms / 1e3

    def elapsed_ms(self) -> float:
        """Time on the clock so far, excluded time taken out."""
        return (time.perf_counter() - self.start) * 1e3 - self.build_ms
