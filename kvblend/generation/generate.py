"""Autoregressive decoding from a prefilled KV state, with TTFT and per-token timing."""

from __future__ import annotations

import time
from typing import Any

import torch

from kvblend.fusion.blend import PrefillResult, forward_tokens
from kvblend.generation.sampling import SamplingParams, sample
from kvblend.model.hf import DecoderModel
from kvblend.types import GenOutput


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


class NewlineDetector:
    """Which token ids contain a line break (decoded once per id, cached)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        if token_id not in self._cache:
            self._cache[token_id] = "\n" in self.tokenizer.decode([token_id])
        return self._cache[token_id]


@torch.inference_mode()
def generate(model: DecoderModel, prefilled: PrefillResult, params: SamplingParams, t_start: float,
             newline: NewlineDetector | None = None) -> GenOutput:
    """Decode up to params.max_new_tokens tokens; t_start is the request's start (perf_counter) for TTFT."""
    eos = model.eos_token_ids()
    gen = torch.Generator().manual_seed(params.seed)
    token = sample(prefilled.logits, params, gen)
    ttft_ms = (time.perf_counter() - t_start) * 1e3
    tokens: list[int] = []
    token_ms: list[float] = []
    stop_reason = "length"
    text_started = False
    state = prefilled.state
    while True:
        if token in eos:
            stop_reason = "eos"
            break
        tokens.append(token)
        if params.stop_on_newline and newline is not None:
            if newline(token) and text_started:
                stop_reason = "newline"
                break
            text_started = text_started or bool(model.tokenizer.decode([token]).strip())
        if len(tokens) >= params.max_new_tokens or state.length >= state.capacity:
            break
        t0 = time.perf_counter()
        logits = forward_tokens(model, state, [token])[-1]
        token = sample(logits, params, gen)
        token_ms.append((time.perf_counter() - t0) * 1e3)
    text = model.tokenizer.decode(tokens, skip_special_tokens=True) if model.tokenizer is not None else ""
    return GenOutput(token_ids=tokens, text=text, ttft_ms=ttft_ms, token_ms=token_ms, stop_reason=stop_reason,
                     blend=prefilled.stats)
