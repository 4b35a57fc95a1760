"""Decode and verification steps of one sequence: append T tokens at state.length and return their logits
(and argmax), eagerly (`forward_tokens`) or, on CUDA, as a CUDA graph captured once per token count T <=
max_graph_tokens over the state's static KV buffer and replayed (one launch; nothing read back but the chosen
tokens).

A captured step attends over the whole static buffer with a device-side mask (key position <= query
position, and the row valid: placeholders of CPU-staged chunks stay masked until promoted); the token ids
and start position live in a small device buffer filled from pinned memory before each replay. The layer
body is model/layers.py's, so a captured step computes exactly what forward_tokens computes. The state's
tensors are views of that buffer (ModelRunner.new_state, or one copy by ModelRunner.decoder for a private
state), so promotions and truncations by anyone holding the state act on what the graphs read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kvblend.model.kv import KVState
from kvblend.model.layers import embed, forward_tokens, lm_logits, run_layers
from kvblend.model.rope import rope_cos_sin

ModelRunner = Any  # kvblend.model.runner.ModelRunner (which imports this module)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepIO:
    """Static tensors of one captured step of T tokens: inp = ids [T] + start [1]; outputs written in place."""

    host: torch.Tensor  # pinned [T + 1]
    inp: torch.Tensor  # [T + 1] long
    logits: torch.Tensor  # [T, V] fp32
    best: torch.Tensor  # [T] long
    queries: torch.Tensor  # [L, H, T, D]
    copied: object  # cuda Event: the last host -> device copy of `host` is done

    @staticmethod
    def empty(runner: "ModelRunner", t: int, pinned: bool) -> "StepIO":
        m, s = runner.model, runner.model.shape
        dev = m.device
        host = torch.zeros(t + 1, dtype=torch.long)
        return StepIO(host=host.pin_memory() if pinned else host,
                      inp=torch.zeros(t + 1, dtype=torch.long, device=dev),
                      logits=torch.zeros(t, s.vocab_size, dtype=torch.float32, device=dev),
                      best=torch.zeros(t, dtype=torch.long, device=dev),
                      queries=torch.zeros(s.num_layers, s.num_heads, t, s.head_dim, dtype=m.dtype, device=dev),
                      copied=torch.cuda.Event() if pinned else None)


def _step_body(runner: "ModelRunner", buf, t: int):
    """A step of t tokens over the static buffer `buf`: attends over its rows [0, buf.rows) (never the
    scratch rows past them, which only padded prefill rows write)."""
    model, full, num_keys = runner.model, buf.full, buf.rows
    key_pos = torch.arange(num_keys, device=model.device)
    inv_freq = model.inv_freq.to(model.device, torch.float32)

    def body(io: StepIO) -> None:
        ids, start = io.inp[:t], io.inp[t:]
        pos = start + torch.arange(t, device=io.inp.device)
        cos, sin = rope_cos_sin(inv_freq, pos, model.dtype)
        mask = (key_pos[None, :] <= pos[:, None]) & full.valid[None, :num_keys]  # [T, buffer rows]
        queries: list[torch.Tensor] = []
        h = run_layers(model, full, embed(model, ids), cos, sin, range(model.shape.num_layers), pos, pos,
                       num_keys, mask=mask, queries_out=queries)
        logits = lm_logits(model, h)
        io.logits.copy_(logits)
        io.best.copy_(logits.argmax(-1))
        io.queries.copy_(torch.stack(queries))
    return body


class StepRunner:
    """Decode steps for one KVState: `logits(ids)` / `argmax(ids)` append ids at state.length and return the
    logits [T, V] (fp32, on the device) or the argmax ids of every position (a host list, the one sync).

    Logits returned by a replayed graph live in the graph's output buffer: consume them before the next step.
    padded: the captured computation run eagerly (any device; tests check it against forward_tokens).
    """

    def __init__(self, runner: "ModelRunner", state: KVState, graphs: bool, padded: bool = False,
                 max_graph_tokens: int = 16):
        self.runner, self.model, self.state = runner, runner.model, state
        self.graphs, self.padded, self.max_graph_tokens = graphs, padded, max_graph_tokens
        self.num_captured = 0

    def _io(self, t: int):
        """(io, captured graph or None) for a static step of t tokens, or (None, None): run forward_tokens."""
        buf = self.state.buffer
        if not t or buf is None or not (self.graphs or self.padded):
            return None, None
        if self.padded:
            return StepIO.empty(self.runner, t, pinned=False), _step_body(self.runner, buf, t)
        if t > self.max_graph_tokens:
            return None, None
        before = self.runner.graphs.captures

        def prepare(io: StepIO) -> None:  # warm-up / capture at a start whose T rows exist; they are
            io.inp[t] = max(0, min(self.state.length, buf.rows - t))  # rewritten before anything reads them
        # the body (and its key-position / RoPE tables) is built only to capture, never per step
        g = self.runner.graphs.get(("step", buf.id, t), lambda: StepIO.empty(self.runner, t, pinned=True),
                                   lambda: _step_body(self.runner, buf, t), prepare)
        if g is None:
            return None, None
        if self.runner.graphs.captures > before:
            self.num_captured += 1
            log.debug("%s: captured the %d-token decode step", self.model.name, t)
        return g.io, g

    @torch.inference_mode()
    def _run(self, token_ids: Sequence[int], queries_out: list | None):
        t, state = len(token_ids), self.state
        start = state.length
        if start + t > state.capacity:
            raise ValueError(f"KV buffer full: {start} + {t} tokens > capacity {state.capacity}")
        io, how = self._io(t)
        if io is None:
            return PendingStep(forward_tokens(self.model, state, token_ids, queries_out=queries_out), None)
        if callable(how):  # padded: the captured computation, eagerly
            io.inp.copy_(torch.tensor(list(token_ids) + [start], dtype=torch.long))
            how(io)
        else:
            io.copied.synchronize()  # the previous copy out of `host` has finished (almost always already)
            io.host[:t] = torch.as_tensor(token_ids, dtype=torch.long)
            io.host[t] = start
            io.inp.copy_(io.host, non_blocking=True)
            io.copied.record()
            how.replay()
        state.length = start + t
        if queries_out is not None:  # copies: the graph's buffers are overwritten by the next replay
            queries_out.extend(q.clone() for q in io.queries)
        return PendingStep(io.logits, io.best)

    def launch(self, token_ids: Sequence[int], queries_out: list | None = None) -> "PendingStep":
        """Append token_ids and queue their forward (on CUDA it runs while the host goes on); read the result
        from the returned PendingStep before the next step."""
        return self._run(token_ids, queries_out)

    def logits(self, token_ids: Sequence[int], queries_out: list | None = None) -> torch.Tensor:
        """Append token_ids; logits [T, V] (fp32, on the model's device) of all of them, like forward_tokens."""
        return self.launch(token_ids, queries_out).logits()

    def argmax(self, token_ids: Sequence[int], queries_out: list | None = None) -> list[int]:
        """Append token_ids; the greedy next token after each of them (one device->host read)."""
        return self.launch(token_ids, queries_out).argmax()


class PendingStep:
    """The queued result of one step: logits [T, V] and (static steps) their argmax computed on the device."""

    def __init__(self, logits: torch.Tensor, best: torch.Tensor | None):
        self._logits, self._best = logits, best

    def logits(self) -> torch.Tensor:
        return self._logits

    def argmax(self) -> list[int]:
        best = self._best if self._best is not None else self._logits.argmax(-1)
        return best.tolist()
