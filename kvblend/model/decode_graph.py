"""Decode steps without launch overhead: the one-token step and the (k+1)-token verification step of one
sequence, captured as CUDA graphs over its preallocated KV state and replayed.

A step appends T tokens at positions state.length.. and returns their logits (and argmax). Shapes are static:
attention runs over the whole capacity of the state with a device-side mask (key position <= query position,
and the row valid: placeholders of CPU-staged chunks stay masked until promoted), the token ids and the start
position live in a small device buffer that the host fills before each replay (one copy from pinned memory).
Nothing reads back to the host but the chosen tokens. The layers are the runner's own per-layer functions
(qkv, write_kv, attend_mlp, lm_logits): a captured step computes exactly what `forward_tokens` computes.

On CPU (or with graphs=False) every step is a plain `forward_tokens` call; the results are identical.
Graphs are captured lazily, one per token count T <= max_graph_tokens; longer steps run plainly. The KV
buffers, the validity mask and the model weights are captured by address, so graphs live with a static KV
buffer kept per model and capacity bucket (`decode_runner`): a request's prefilled state is copied into it
once (one device copy) and its KVState is re-pointed at views of it, so promotions and truncations by anyone
holding the state act on what the graphs read. A buffer in use by another request is never shared: that
request gets a fresh one (captured again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Iterator, Sequence

import torch

from kvblend.model.hf import DecoderModel
from kvblend.model.rope import rope_cos_sin
from kvblend.model.runner import KVState, attend_mlp, forward_tokens, lm_logits, qkv, write_kv

log = logging.getLogger(__name__)

MAX_GRAPH_TOKENS = 16
CAPACITY_BUCKET = 1024  # static buffers come in multiples of this many rows


class _Graph:
    """One captured step of T tokens: inputs ids [T] + start [1] in `inp`, outputs logits, argmax, queries."""

    def __init__(self, runner: "StepRunner", t: int):
        self.t = t
        dev = runner.model.device
        self.host = torch.zeros(t + 1, dtype=torch.long).pin_memory()
        self.inp = torch.zeros(t + 1, dtype=torch.long, device=dev)
        self.copied = torch.cuda.Event()
        view = runner.view
        # capture at a start where the T rows exist; the rows written while capturing are rewritten by every
        # real step before anything attends to them (they are >= the current length)
        self.inp[t] = max(0, min(view.length, view.capacity - t))
        self.inp[:t] = 0
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up (allocator, library handles) outside the graph
                runner._step(self.inp, t)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.pool):
            self.logits, self.argmax, self.queries = runner._step(self.inp, t)

    def replay(self, token_ids: Sequence[int], start: int) -> None:
        self.copied.synchronize()  # the previous copy out of `host` has finished (almost always already)
        self.host[: self.t] = torch.as_tensor(token_ids, dtype=torch.long)
        self.host[self.t] = start
        self.inp.copy_(self.host, non_blocking=True)
        self.copied.record()
        self.graph.replay()


class StepRunner:
    """Decode steps for one KVState: `logits(ids)` / `argmax(ids)` append ids at state.length and return the
    logits [T, V] (fp32, on the device) or the argmax ids of every position (a host list, the one sync).

    graphs: None = on CUDA; True requires CUDA. Logits returned by a replayed graph live in the graph's
    output buffer: consume them before the next step.
    """

    def __init__(self, model: DecoderModel, state: KVState, graphs: bool | None = None,
                 max_graph_tokens: int = MAX_GRAPH_TOKENS, padded: bool = False):
        """padded: run the captured computation (whole-capacity attention, device-side mask) eagerly, on any
        device, instead of replaying graphs (tests check it against forward_tokens on CPU)."""
        cuda = model.device.type == "cuda"
        if graphs and not cuda:
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self.model, self.state = model, state
        self.view = state  # the KVState whose length steps follow (decode_runner: a view of self.state)
        self.graphs = cuda if graphs is None else bool(graphs)
        self.padded = padded and not self.graphs
        self.max_graph_tokens = max_graph_tokens
        self._graphs: dict[int, _Graph] = {}
        self.pool = None
        if self.padded:
            if state.valid is None:
                state.set_valid(0, 0, True)
            self.inv_freq = model.inv_freq.to(model.device, torch.float32)
            self.key_pos = torch.arange(state.capacity, device=model.device)
        if self.graphs:
            if state.k.device != model.device:
                raise ValueError(f"KV state on {state.k.device}, model on {model.device}")
            if state.valid is None:
                state.set_valid(0, 0, True)  # allocate the (all-valid) mask the graphs read by address
            self.pool = torch.cuda.graph_pool_handle()
            self.inv_freq = model.inv_freq.to(model.device, torch.float32)
            self.key_pos = torch.arange(state.capacity, device=model.device)
            self.num_captured = 0

    # the captured computation ------------------------------------------------------------------
    def _step(self, inp: torch.Tensor, t: int):
        model, state = self.model, self.state
        ids, start = inp[:t], inp[t:]
        pos = start + torch.arange(t, device=inp.device)
        h = model.embed_tokens(ids)
        cos, sin = rope_cos_sin(self.inv_freq, pos, model.dtype)
        mask = (self.key_pos[None, :] <= pos[:, None]) & state.valid[None, :]  # [T, capacity]
        queries = []
        for layer in range(model.shape.num_layers):
            q, k, v = qkv(model, layer, h, cos, sin)
            queries.append(q)
            write_kv(state, layer, pos, k, v)
            h = attend_mlp(model, layer, h, q, pos, state, state.capacity, causal_prefix=False, mask=mask)
        logits = lm_logits(model, h)
        return logits, logits.argmax(-1), queries

    def _graph(self, t: int) -> _Graph | None:
        if not self.graphs or t > self.max_graph_tokens:
            return None
        g = self._graphs.get(t)
        if g is None:
            g = self._graphs[t] = _Graph(self, t)
            self.num_captured += 1
            log.debug("%s: captured the %d-token decode step", self.model.name, t)
        return g

    @torch.inference_mode()
    def _run(self, token_ids: Sequence[int], queries_out: list | None) -> _Graph | torch.Tensor:
        t = len(token_ids)
        view = self.view
        start = view.length
        if start + t > view.capacity:
            raise ValueError(f"KV buffer full: {start} + {t} tokens > capacity {view.capacity}")
        if self.padded and t:
            inp = torch.tensor(list(token_ids) + [start], dtype=torch.long, device=self.model.device)
            logits, _best, queries = self._step(inp, t)
            view.length = start + t
            if queries_out is not None:
                queries_out.extend(queries)
            return logits
        g = self._graph(t) if t else None
        if g is None:
            return forward_tokens(self.model, view, token_ids, queries_out=queries_out)
        g.replay(token_ids, start)
        view.length = start + t
        if queries_out is not None:  # copies: the graph's buffers are overwritten by the next replay
            queries_out.extend(q.clone() for q in g.queries)
        return g

    # public steps --------------------------------------------------------------------------------
    def launch(self, token_ids: Sequence[int], queries_out: list | None = None) -> "PendingStep":
        """Append token_ids and queue their forward (on CUDA it runs while the host goes on); read the result
        from the returned PendingStep before the next step."""
        out = self._run(token_ids, queries_out)
        if isinstance(out, _Graph):
            return PendingStep(out.logits, out.argmax)
        return PendingStep(out, None)

    def logits(self, token_ids: Sequence[int], queries_out: list | None = None) -> torch.Tensor:
        """Append token_ids; logits [T, V] (fp32, on the model's device) of all of them, like forward_tokens."""
        return self.launch(token_ids, queries_out).logits()

    def argmax(self, token_ids: Sequence[int], queries_out: list | None = None) -> list[int]:
        """Append token_ids; the greedy next token after each of them (one device->host read)."""
        return self.launch(token_ids, queries_out).argmax()


class PendingStep:
    """The queued result of one step: logits [T, V] and (captured steps) their argmax computed on the device."""

    def __init__(self, logits: torch.Tensor, best: torch.Tensor | None):
        self._logits, self._best = logits, best

    def logits(self) -> torch.Tensor:
        return self._logits

    def argmax(self) -> list[int]:
        best = self._best if self._best is not None else self._logits.argmax(-1)
        return best.tolist()


class _StaticBuffers:
    """A static KV buffer (and its graphs) for one model and capacity bucket."""

    def __init__(self, model: DecoderModel, capacity: int, max_graph_tokens: int, padded: bool = False):
        from kvblend.model.runner import allocate_state

        self.state = allocate_state(model, capacity)
        self.state.valid = torch.zeros(capacity, dtype=torch.bool, device=model.device)
        self.runner = StepRunner(model, self.state, graphs=not padded, max_graph_tokens=max_graph_tokens,
                                 padded=padded)
        self.in_use = False

    def adopt(self, state: KVState) -> None:
        """Copy state's rows into the static buffer and point state at views of it (same capacity)."""
        cap, n = state.capacity, state.length
        if state.valid is None:
            state.set_valid(0, 0, True)  # allocates the mask (and any host mirror) the graphs need
        st = self.state
        st.k[:, :, :n].copy_(state.k[:, :, :n])
        st.v[:, :, :n].copy_(state.v[:, :, :n])
        st.valid.zero_()
        st.valid[:cap].copy_(state.valid)
        state.k, state.v, state.valid = st.k[:, :, :cap], st.v[:, :, :cap], st.valid[:cap]


_BUFFERS: "weakref.WeakKeyDictionary[DecoderModel, dict[tuple[int, bool], _StaticBuffers]]" = \
    weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@contextlib.contextmanager
def decode_runner(model: DecoderModel, state: KVState, graphs: bool | None = None,
                  max_graph_tokens: int = MAX_GRAPH_TOKENS, padded: bool = False) -> Iterator[StepRunner]:
    """A StepRunner for decoding `state` (graphs: None = on CUDA). With graphs, state is moved into the model's
    static buffer of its capacity bucket (graphs captured there once, replayed by every later request);
    the state stays usable after the block (its tensors are views of that buffer until the next request
    of the bucket adopts it: read what you need before then). padded: the same static-buffer path with the
    captured computation run eagerly, on any device (tests of this path without CUDA)."""
    use = (model.device.type == "cuda") if graphs is None else bool(graphs)
    if not use and not padded:
        yield StepRunner(model, state, graphs=False)
        return
    padded = padded and not use
    bucket = -(-state.capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
    with _LOCK:
        per_model = _BUFFERS.setdefault(model, {})
        buf = per_model.get((bucket, padded))
        if buf is None or buf.in_use or buf.runner.max_graph_tokens < max_graph_tokens:
            fresh = _StaticBuffers(model, bucket, max_graph_tokens, padded=padded)
            if buf is None or not buf.in_use:
                per_model[(bucket, padded)] = fresh
            buf = fresh
        buf.in_use = True
    try:
        with torch.inference_mode():  # the static buffers are inference tensors
            buf.adopt(state)
        buf.runner.view = state
        yield buf.runner
    finally:
        buf.runner.view = buf.state
        buf.in_use = False
