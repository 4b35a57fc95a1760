"""Logits -> probabilities -> token: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_on_newline: bool = True  # stop at the first line break after some text (QA answers are one line)
    seed: int = 0


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V]; temperature 0 gives a one-hot argmax."""
    logits = logits.to(torch.float32)
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator: on the host for CPU decoding, on the GPU for CUDA decoding (sampling then
    never leaves the device; its stream differs from the host generator's)."""
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]; sampled where the generator lives (the host when None)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = logits_to_probs(logits, params.temperature, params.top_p)
    where = generator.device if generator is not None else torch.device("cpu")
    return int(torch.multinomial(probs.to(where), 1, generator=generator))
