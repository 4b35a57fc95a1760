"""The model runner: one object per model that owns its static KV storage (model/kv.py) and its captured
graphs (model/graphs.py), and runs tokens through the layer body of model/layers.py.

Verbs:
  forward(ids)            full prefill of a prompt into a new state (every layer; on CUDA the plain loop or
                          the captured padded computation, whichever was measured faster for its size)
  append(state, ids)      append tokens at state.length and return logits (chunk builds, drafters, probes)
  run_layers(...)         a set of query rows through layers first..L-1 (a blend's recompute set): plain,
                          padded (the captured computation, eagerly) or a CUDA graph replay
  decoder(state)          a StepRunner for decode / verification steps (captured per token count on CUDA)
  new_state(capacity)     a request's KV: on CUDA with graphs a lease of a static buffer, which prefill writes
                          and decoding's graphs read in place (never copied between them)

`RuntimeOptions` (kvblend/config.py: CUDA graphs, the blend front's graph, the attention kernel) is handed to
the runner when it is built (`attach_runner`); a model without one gets the defaults on first use
(`runner_of`). Blending (fusion/) and generation build on this module; it imports neither.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kvblend.config import RuntimeOptions
from kvblend.errors import ModelError
from kvblend.model.attention import AttnMask, build_mask, resolve_kernel, set_flex_compile
from kvblend.model.graphs import GraphCache
from kvblend.model.hf import DecoderModel
from kvblend.model.kv import MAX_PAD, KVArena, KVState, StaticKV, allocate_state
from kvblend.model.layers import attn_mask, causal_mask, forward_tokens, lm_logits, run_layers
from kvblend.model.steps import StepRunner
from kvblend.model.rope import rope_cos_sin
from kvblend.types import BlendStats, PrefillResult

log = logging.getLogger(__name__)

KEY_BUCKET = 256  # key-count bucket of the padded recompute computation
RECOMPUTE_PATHS = ("auto", "plain", "padded", "graph")
MAX_GRAPH_TOKENS = 16  # decode / verification steps of up to this many tokens are captured
FULL_GRAPH_MAX_ROWS = 8192  # longer prompts are compute-bound: the plain loop, no graph memory held


def row_bucket(r: int) -> int:
    """Padded size of a recompute set of r rows: a multiple of 64 up to 2048, of 256 beyond."""
    step = 64 if r <= 2048 else 256
    return -(-r // step) * step


def elapsed_ms(t_start: float, device: torch.device) -> float:
    """Wall time since t_start, after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t_start) * 1e3


def check_length(model: DecoderModel, num_tokens: int) -> None:
    s = model.shape
    if num_tokens > s.max_position_embeddings:
        raise ModelError(f"{model.name}: {num_tokens} tokens exceed the model context of "
                         f"{s.max_position_embeddings}; retrieve fewer or shorter chunks")
    if s.sliding_window is not None and num_tokens > s.sliding_window:
        raise ModelError(f"{model.name}: {num_tokens} tokens exceed the sliding window of {s.sliding_window}, "
                         f"which kvblend does not implement; use a shorter prompt")


# ------------------------------------------------------------------------------------ recompute layers
@dataclass(slots=True)
class PaddedRows:
    """Static inputs of the padded recompute computation: pad rows first, real rows last; pad rows write
    scratch rows and attend to key 0 only, so real rows get exactly the plain path's inputs. The mask inputs
    depend on the kernel: sdpa a dense `mask`; flex `mask_pos` and `kv_valid` (block mask built inside)."""

    h: torch.Tensor  # [r_pad, hidden]
    pos: torch.Tensor  # [r_pad] long: scratch rows for pads, real positions after
    cos: torch.Tensor  # [r_pad, D]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [r_pad, n_pad] bool (sdpa)
    out: torch.Tensor  # [1, hidden]
    kernel: str = "sdpa"
    mask_pos: torch.Tensor | None = None  # [r_pad] long (flex): 0 for pad rows, real positions after
    kv_valid: torch.Tensor | None = None  # [n_pad] bool (flex): key row attendable

    @staticmethod
    def empty(model: DecoderModel, r_pad: int, n_pad: int, kernel: str) -> "PaddedRows":
        dev, dt, s = model.device, model.dtype, model.shape
        flex = kernel == "flex"
        return PaddedRows(
            h=torch.zeros(r_pad, s.hidden_size, device=dev, dtype=dt),
            pos=torch.zeros(r_pad, dtype=torch.long, device=dev),
            cos=torch.ones(r_pad, s.head_dim, device=dev, dtype=dt),
            sin=torch.zeros(r_pad, s.head_dim, device=dev, dtype=dt),
            mask=None if flex else torch.zeros(r_pad, n_pad, dtype=torch.bool, device=dev),
            out=torch.zeros(1, s.hidden_size, device=dev, dtype=dt), kernel=kernel,
            mask_pos=torch.zeros(r_pad, dtype=torch.long, device=dev) if flex else None,
            kv_valid=torch.ones(n_pad, dtype=torch.bool, device=dev) if flex else None)

    @property
    def n_pad(self) -> int:
        return self.mask.shape[1] if self.mask is not None else self.kv_valid.shape[0]

    def attn_mask(self) -> AttnMask:
        if self.mask is not None:
            return AttnMask(self.pos, self.n_pad, None, "sdpa", dense=self.mask)
        return build_mask(self.mask_pos, self.n_pad, self.kv_valid, "flex")

    def fill(self, state: KVState, h, pos, cos, sin, num_keys: int, scratch_start: int) -> None:
        """Copy one call's rows in (device copies only: no host synchronisation)."""
        p = self.pos.shape[0] - pos.shape[0]
        self.h[:p].zero_()
        self.h[p:].copy_(h)
        self.pos[:p].copy_(torch.arange(scratch_start, scratch_start + p, device=pos.device))
        self.pos[p:].copy_(pos)
        self.cos[:p].fill_(1)
        self.sin[:p].zero_()
        self.cos[p:].copy_(cos)
        self.sin[p:].copy_(sin)
        if self.mask is not None:
            self.mask.zero_()
            self.mask[:p, 0] = True  # pad rows attend to key 0 only (a row with no key would be NaN)
            self.mask[p:, :num_keys].copy_(causal_mask(pos, num_keys, state))
            return
        self.mask_pos[:p].zero_()
        self.mask_pos[p:].copy_(pos)
        if state.has_holes():
            self.kv_valid.copy_(state.valid[: self.n_pad])
        else:
            self.kv_valid.fill_(True)
        self.kv_valid[num_keys:] = False

    def scratch_only(self, scratch_start: int) -> None:
        """Point every row at scratch rows (a capture's warm-up writes nothing a request owns)."""
        self.pos.copy_(scratch_start + torch.arange(self.pos.shape[0], device=self.pos.device) % MAX_PAD)
        if self.mask is not None:
            self.mask[:, 0] = True


def _padded_body(model: DecoderModel, full: KVState, first: int):
    def body(rows: PaddedRows) -> None:
        h = run_layers(model, full, rows.h, rows.cos, rows.sin, range(first, model.shape.num_layers), rows.pos,
                       rows.pos, rows.n_pad, mask=rows.attn_mask(), last_only=True)
        rows.out.copy_(h[-1:])
    return body


@dataclass(slots=True)
class FullRows:
    """Static inputs of a captured full prefill: token ids padded to n_pad, RoPE tables, the last real row."""

    ids: torch.Tensor  # [n_pad] long
    cos: torch.Tensor  # [n_pad, D]
    sin: torch.Tensor
    last: torch.Tensor  # [1] long: n - 1
    out: torch.Tensor  # [1, hidden]

    @staticmethod
    def empty(model: DecoderModel, n_pad: int) -> "FullRows":
        dev = model.device
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(n_pad, device=dev), model.dtype)
        return FullRows(ids=torch.zeros(n_pad, dtype=torch.long, device=dev), cos=cos, sin=sin,
                        last=torch.zeros(1, dtype=torch.long, device=dev),
                        out=torch.zeros(1, model.shape.hidden_size, dtype=model.dtype, device=dev))

    def fill(self, token_ids: Sequence[int]) -> None:
        n = len(token_ids)
        self.ids.zero_()
        self.ids[:n].copy_(torch.tensor(list(token_ids), dtype=torch.long), non_blocking=True)
        self.last.fill_(n - 1)


def _full_body(model: DecoderModel, full: KVState):
    def body(rows: FullRows) -> None:
        n_pad = rows.ids.shape[0]
        h = run_layers(model, full, model.embed_tokens(rows.ids), rows.cos, rows.sin,
                       range(model.shape.num_layers), slice(0, n_pad), None, n_pad, causal_prefix=True)
        rows.out.copy_(h.index_select(0, rows.last))
    return body


# ------------------------------------------------------------------------------------------ the runner
class ModelRunner:
    """One per model: its static KV buffers, its graphs, the verbs of the module docstring."""

    def __init__(self, model: DecoderModel, runtime: RuntimeOptions | None = None, static_eager: bool = False):
        """static_eager: run every captured computation (static buffers, the padded recompute layers, the
        static front, whole-buffer decode steps) eagerly instead of replaying graphs, on any device: the
        CUDA paths, tested on CPU."""
        self.model = model
        self.static_eager = static_eager
        self.runtime = runtime if runtime is not None else RuntimeOptions()
        set_flex_compile(self.runtime.flex_compile)
        self.graphs = GraphCache(model, self.runtime.max_graphs)
        self.arena = KVArena(model, on_free=self._buffer_freed)
        self.lock = threading.Lock()  # one request at a time through the static buffers' graphs
        self._full_paths: dict[int, str] = {}  # row bucket -> "graph" | "plain", measured (_choose_full_path)

    def _buffer_freed(self, buf: StaticKV) -> None:
        self.graphs.drop(lambda key: isinstance(key, tuple) and len(key) > 1 and key[1] == buf.id)

    @property
    def use_graphs(self) -> bool:
        return self.model.device.type == "cuda" and self.runtime.cuda_graphs and self.graphs.enabled

    @property
    def use_static(self) -> bool:
        """Requests live in static buffers: graphs are used, or their computations run eagerly."""
        return self.use_graphs or self.static_eager

    @property
    def kernel(self) -> str:
        return resolve_kernel(self.model.device, self.runtime.attention)

    def new_state(self, capacity: int, static: bool | None = None) -> KVState:
        """A zeroed KV state of `capacity` rows: a static-buffer lease (static None: when graphs are used)
        or a private allocation."""
        static = self.use_static if static is None else static
        return self.arena.lease(capacity) if static else allocate_state(self.model, capacity)

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], extra_capacity: int = 0,
                static: bool | None = None) -> tuple[KVState, torch.Tensor]:
        """Full prefill: (state with room for extra_capacity more tokens, fp32 logits [V] of the last token).
        In a static buffer with graphs, prompts of up to FULL_GRAPH_MAX_ROWS rows run captured (padded at the
        end, causal attention: _full_captured) where that was measured faster for their size (_full_path)."""
        if not token_ids:
            raise ValueError("nothing to prefill: the prompt is empty")
        check_length(self.model, len(token_ids) + extra_capacity)
        state = self.new_state(len(token_ids) + extra_capacity, static)
        path = self._full_path(state, len(token_ids))
        if path == "auto":  # first prompt of this size: time both, keep the faster for the bucket
            path = self._choose_full_path(state, token_ids)
        if path in ("graph", "padded"):
            return state, self._full_captured(state, token_ids, path)
        return state, forward_tokens(self.model, state, token_ids, num_logits=1)[-1]

    def _full_path(self, state: KVState, n: int) -> str:
        if state.buffer is None or row_bucket(n) > FULL_GRAPH_MAX_ROWS:
            return "plain"
        if not self.use_graphs:  # static_eager: the captured computation, eagerly (tests it on any device)
            return "padded" if self.static_eager else "plain"
        return self._full_paths.get(row_bucket(n), "auto")

    def _full_captured(self, state: KVState, token_ids: Sequence[int], path: str = "graph") -> torch.Tensor:
        """The full prefill as one captured computation per row bucket: the prompt padded at the end to
        row_bucket(n) rows, plain causal attention over them (pad rows sit after every real row, so no real
        row sees them; their K/V land in rows [n, n_pad), which decoding overwrites before it attends to
        them); logits of row n - 1. path "padded": the same computation eagerly."""
        n, model, buf = len(token_ids), self.model, state.buffer
        n_pad = row_bucket(n)
        make = lambda: FullRows.empty(model, n_pad)  # noqa: E731
        g = self.graphs.get(("full", buf.id, n_pad), make, lambda: _full_body(model, buf.full)) \
            if path == "graph" else None
        io = g.io if g is not None else make()
        io.fill(token_ids)
        if g is not None:
            g.replay()
        else:
            _full_body(model, buf.full)(io)
        state.length = n
        return lm_logits(model, io.out)[-1]

    def _choose_full_path(self, state: KVState, token_ids: Sequence[int]) -> str:
        """Time the plain layer loop and the captured computation on this prompt (after a warm-up call of
        each) and keep the faster for its row bucket: a small model is launch-bound (the graph wins), a
        large one may not be. Leaves the state prefilled by the plain loop (the caller runs the winner)."""
        times = {}
        for path in ("graph", "plain", "graph", "plain"):
            state.length = 0
            t0 = time.perf_counter()
            if path == "graph":
                self._full_captured(state, token_ids)
            else:
                forward_tokens(self.model, state, token_ids, num_logits=1)
            times[path] = elapsed_ms(t0, self.model.device)
        state.length = 0
        best = min(times, key=times.get) if not self.graphs.failed else "plain"
        self._full_paths[row_bucket(len(token_ids))] = best
        log.info("%s: full prefill of %d rows: captured %.2f ms, plain %.2f ms: %s", self.model.name,
                 row_bucket(len(token_ids)), times["graph"], times["plain"], best)
        return best

    def full_prefill(self, prompt, extra_capacity: int = 0, static: bool | None = None) -> PrefillResult:
        """forward() of a prompt (PromptIds or token ids) as a PrefillResult (mode full), timed."""
        t0 = time.perf_counter()
        ids = prompt.flat() if hasattr(prompt, "flat") else list(prompt)
        state, logits = self.forward(ids, extra_capacity, static)
        n_chunk = sum(len(c) for c in getattr(prompt, "chunk_ids", ()))
        stats = BlendStats(mode="full", num_tokens=len(ids), num_chunk_tokens=n_chunk, num_recomputed=len(ids),
                           selected_positions=(), prefill_ms=elapsed_ms(t0, self.model.device))
        return PrefillResult(state=state, logits=logits, stats=stats)

    def append(self, state: KVState, token_ids: Sequence[int], num_logits: int | None = None,
               queries_out: list | None = None) -> torch.Tensor:
        return forward_tokens(self.model, state, token_ids, num_logits, queries_out)

    def recompute_path(self, path: str = "auto") -> str:
        if path not in RECOMPUTE_PATHS:
            raise ValueError(f"unknown recompute path '{path}'; use one of {', '.join(RECOMPUTE_PATHS)}")
        if path == "auto":
            return "graph" if self.use_graphs else ("padded" if self.static_eager else "plain")
        if path == "graph" and self.model.device.type != "cuda":
            raise ValueError("recompute path 'graph' needs CUDA")
        return path

    def run_layers(self, state: KVState, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, first: int, num_keys: int, path: str = "plain",
                   causal_prefix: bool = False) -> torch.Tensor:
        """Rows h [r, hidden] at positions pos [r] through layers first..L-1 (K/V written at pos); returns the
        last row's output [1, hidden]. causal_prefix: pos is exactly 0..num_keys-1 with no holes (plain).
        path "padded" / "graph" need a static state (new_state(static=True))."""
        model = self.model
        layers = range(first, model.shape.num_layers)
        if path == "plain" or causal_prefix:
            mask = None if causal_prefix else attn_mask(pos, num_keys, state, self.kernel)
            where = slice(0, num_keys) if causal_prefix else pos
            return run_layers(model, state, h, cos, sin, layers, where, pos, num_keys, causal_prefix, mask,
                              last_only=True)[-1:]
        buf = state.buffer
        if buf is None:
            raise ValueError(f"recompute path '{path}' needs a state in a static buffer (ModelRunner.new_state)")
        n_pad = min(-(-num_keys // KEY_BUCKET) * KEY_BUCKET, buf.rows)
        kernel = self.kernel
        key = ("recompute", buf.id, row_bucket(pos.shape[0]), n_pad, first, kernel)
        make = lambda: PaddedRows.empty(model, key[2], n_pad, kernel)  # noqa: E731
        body = _padded_body(model, buf.full, first)
        g = self.graphs.get(key, make, lambda: body, lambda r: r.scratch_only(buf.scratch_start)) \
            if path == "graph" else None
        rows = g.io if g is not None else make()
        rows.fill(state, h, pos, cos, sin, num_keys, buf.scratch_start)
        if g is not None:
            g.replay()
            return rows.out.clone()
        body(rows)
        return rows.out

    def decoder(self, state: KVState, graphs: bool | None = None, max_graph_tokens: int = MAX_GRAPH_TOKENS,
                padded: bool = False) -> "StepRunner":
        """Decode steps over `state` (graphs None: self.use_graphs). With graphs (or padded: the captured
        computation run eagerly, for tests on any device) steps run over the state's static buffer; a state
        outside one is copied into a lease once (its tensors re-pointed there)."""
        use = self.use_graphs if graphs is None else bool(graphs)
        if use and self.model.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        padded = padded or (self.static_eager and graphs is None)
        static = use or padded
        if static and state.buffer is None:
            self.arena.adopt(state)
        return StepRunner(self, state, graphs=use, padded=padded and not use, max_graph_tokens=max_graph_tokens)

_ATTACH_LOCK = threading.Lock()


def attach_runner(model: DecoderModel, runtime: RuntimeOptions | None = None) -> ModelRunner:
    """The model's runner with these runtime settings: the current one if its settings are the same (its
    graphs and buffers are kept), else a new one replacing it."""
    runtime = runtime if runtime is not None else RuntimeOptions()
    with _ATTACH_LOCK:
        runner = getattr(model, "_runner", None)
        if runner is None or runner.runtime != runtime:
            runner = model._runner = ModelRunner(model, runtime)
        return runner


def runner_of(model: DecoderModel | ModelRunner) -> ModelRunner:
    """The model's runner (built with the default RuntimeOptions on first use); a runner is returned as is."""
    if isinstance(model, ModelRunner):
        return model
    runner = getattr(model, "_runner", None)
    if runner is None:
        with _ATTACH_LOCK:
            runner = getattr(model, "_runner", None)
            if runner is None:
                runner = model._runner = ModelRunner(model)
    return runner
