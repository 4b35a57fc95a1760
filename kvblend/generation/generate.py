"""Autoregressive decoding from a prefilled KV state, with TTFT and per-token timing."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from kvblend.generation.sampling import SamplingParams, make_generator, sample
from kvblend.model.hf import DecoderModel
from kvblend.model.runner import runner_of
from kvblend.types import GenOutput, PrefillResult


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


class Stopper:
    """The stopping rules shared by generate() and speculative_generate(), applied one token at a time given
    the cache length at that token (the token itself not yet in the cache)."""

    def __init__(self, model: DecoderModel, params: SamplingParams, eos: set[int], capacity: int,
                 newline: NewlineDetector | None):
        self.model, self.params, self.eos, self.capacity, self.newline = model, params, eos, capacity, newline
        self.tokens: list[int] = []
        self.text_started = False
        self.reason: str | None = None

    def push(self, token: int, cache_len: int) -> bool:
        """Record token; True when decoding stops here (self.reason says why)."""
        if token in self.eos:
            self.reason = "eos"
            return True
        self.tokens.append(token)
        if self.params.stop_on_newline and self.newline is not None:
            if self.newline(token) and self.text_started:
                self.reason = "newline"
                return True
            self.text_started = self.text_started or bool(self.model.tokenizer.decode([token]).strip())
        if len(self.tokens) >= self.params.max_new_tokens or cache_len >= self.capacity:
            self.reason = "length"
            return True
        return False

    def output(self, ttft_ms: float, token_ms: list[float], blend=None) -> GenOutput:
        """The decoded answer: the tokens pushed so far, their text, timings and why decoding stopped."""
        tok = self.model.tokenizer
        text = tok.decode(self.tokens, skip_special_tokens=True) if tok is not None else ""
        return GenOutput(token_ids=self.tokens, text=text, ttft_ms=ttft_ms, token_ms=token_ms,
                         stop_reason=self.reason, blend=blend)


@torch.inference_mode()
def generate(model: DecoderModel, prefilled: PrefillResult, params: SamplingParams, t_start: float,
             newline: NewlineDetector | None = None, on_token: Callable[[int], bool | None] | None = None, *,
             graphs: bool | None = None) -> GenOutput:
    """Decode up to params.max_new_tokens tokens; t_start is the request's start (perf_counter) for TTFT.
    on_token (streaming; None = no effect): called with each answer token before the next one is computed
    (the final token arrives only in the result); returning True stops decoding there (stop_reason "callback").
    graphs: replay CUDA-graph-captured decode steps (None = the runner's setting: on CUDA; model/steps.py). Greedy output is
    the same either way; with graphs, sampling draws on the device (a device generator: its own stream)."""
    state = prefilled.state
    runner = runner_of(model).decoder(state, graphs)
    gen = make_generator(params.seed, model.device if runner.graphs else "cpu")
    token = sample(prefilled.logits, params, gen)
    ttft_ms = (time.perf_counter() - t_start) * 1e3
    stop = Stopper(model, params, model.eos_token_ids(), state.capacity, newline)
    token_ms: list[float] = []
    while not stop.push(token, state.length):
        if on_token is not None and on_token(token):
            stop.reason = "callback"
            break
        t0 = time.perf_counter()
        if params.temperature <= 0:
            token = runner.argmax([token])[-1]
        else:
            token = sample(runner.logits([token])[-1], params, gen)
        token_ms.append((time.perf_counter() - t0) * 1e3)
    return stop.output(ttft_ms, token_ms, prefilled.stats)
