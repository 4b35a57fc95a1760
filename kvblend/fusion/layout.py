"""Prompt layout: where each retrieved chunk sits in one prompt and which ones are resident.

Pure bookkeeping (no store calls, no tensors): the engine lays the chunks out, then fetches the resident ones
to the GPU tier and the placeholders to the CPU tier. A placeholder owns its position range from the start,
so a promotion later fills exactly those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvblend.kvstore.key import ChunkKey


@dataclass(frozen=True, slots=True)
class ChunkSlot:
    """A chunk's place in one prompt. A placeholder (tier "cpu") owns its positions but is not attended."""

    index: int  # position of the chunk in the prompt (retrieval order)
    key: ChunkKey
    start: int  # first global position
    num_tokens: int
    score: float
    tier: str  # "gpu" (resident) or "cpu" (placeholder)

    @property
    def is_placeholder(self) -> bool:
        return self.tier != "gpu"


@dataclass(frozen=True, slots=True)
class Placement:
    slots: tuple[ChunkSlot, ...]

    @property
    def resident(self) -> tuple[ChunkSlot, ...]:
        return tuple(s for s in self.slots if not s.is_placeholder)

    @property
    def placeholders(self) -> tuple[ChunkSlot, ...]:
        return tuple(s for s in self.slots if s.is_placeholder)


def place(keys: Sequence[ChunkKey], num_tokens: Sequence[int], scores: Sequence[float], first_position: int,
          gpu_chunks: int) -> Placement:
    """Lay the chunks out in prompt order from first_position; the `gpu_chunks` best by score (ties: earlier
    first) are resident ("gpu"), the others CPU placeholders that already own their position ranges."""
    if not len(keys) == len(num_tokens) == len(scores):
        raise ValueError("keys, num_tokens and scores must have the same length")
    ranked = sorted(range(len(keys)), key=lambda i: (-scores[i], i))
    on_gpu = set(ranked[:max(0, gpu_chunks)])
    slots, start = [], first_position
    for i, key in enumerate(keys):
        slots.append(ChunkSlot(i, key, start, int(num_tokens[i]), float(scores[i]), "gpu" if i in on_gpu else "cpu"))
        start += int(num_tokens[i])
    return Placement(tuple(slots))
