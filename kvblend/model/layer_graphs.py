"""The recompute layers of a prefill (the same set of query rows through layers first..L-1), three ways:

  plain     one eager pass, the causal mask built once for all layers (CPU, and the reference);
  padded    the same computation on a recompute set padded to a size bucket: pad rows sit *before* the real
            rows, write their K/V to scratch rows past every real row (never attended: the mask admits only
            keys < num_keys) and attend to key 0 only, so real rows get exactly the plain path's inputs;
  graph     the padded computation captured once per (bucket, key bucket, first layer) as a CUDA graph and
            replayed: one launch instead of ~25 per layer, and no host work inside the layer loop.

The graph reads and writes a static KV buffer owned by the model's GraphCache; a prefill that uses graphs
allocates its KV state *in* that buffer (`graph_state`) and hands back a private copy at the end
(`copy_state`), so results never alias each other. The padded path runs eagerly on CPU in the tests
(padded == plain); the GPU compatibility check compares graph == plain on CUDA.

Attention (model/attention.py) uses the kernel of `kernel` / $KVBLEND_ATTENTION (auto: SDPA on every device;
FlexAttention when asked for). The padded path's mask is built from static inputs: SDPA reads a dense [r_pad, n_pad]
mask filled before each run; flex builds its block mask inside the run (captured with the graph) from the
static mask positions (0 for pad rows: key 0 only; the real positions after) and key-validity rows.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvblend.model.attention import AttnMask, build_mask, resolve_kernel
from kvblend.model.hf import DecoderModel
from kvblend.model.runner import KVState, attend_mlp, attn_mask, causal_mask, qkv, write_kv

log = logging.getLogger(__name__)

KEY_BUCKET = 256  # key-count bucket (and static-buffer capacity granularity)
MAX_GRAPHS = 12  # per model, least recently used dropped first


def row_bucket(r: int) -> int:
    """Padded size of a recompute set of r rows: a multiple of 64 up to 2048, of 256 beyond."""
    step = 64 if r <= 2048 else 256
    return -(-r // step) * step


MAX_PAD = 256  # scratch rows: more than any bucket's padding


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs for the recompute layers: on CUDA unless KVBLEND_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("KVBLEND_CUDA_GRAPHS", "1") not in ("0", "false", "no")


def run_layers_plain(model: DecoderModel, state: KVState, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, first: int, num_keys: int, causal_prefix: bool = False,
                     kernel: str | None = None) -> torch.Tensor:
    """Rows h [r, hidden] at positions pos [r] through layers first..L-1 (K/V written at pos); returns the
    last row's output [1, hidden]. causal_prefix: pos is exactly 0..num_keys-1 with no holes.
    kernel: the attention kernel of the masked layers (None: $KVBLEND_ATTENTION, see model/attention.py)."""
    num_layers = model.shape.num_layers
    mask = None if causal_prefix else attn_mask(pos, num_keys, state, kernel)
    mask_last = None if mask is None else mask.last_row()
    where = slice(0, num_keys) if causal_prefix else pos
    for layer in range(first, num_layers):
        q, k, v = qkv(model, layer, h, cos, sin)
        write_kv(state, layer, where, k, v)
        if layer == num_layers - 1:  # only the last position's output is needed
            m = mask_last if mask_last is not None else causal_mask(pos[-1:], num_keys, state)
            h = attend_mlp(model, layer, h[-1:], q[:, -1:], pos[-1:], state, num_keys, causal_prefix=False, mask=m)
        else:
            h = attend_mlp(model, layer, h, q, pos, state, num_keys, causal_prefix=causal_prefix, mask=mask)
    return h[-1:]


@dataclass(slots=True)
class PaddedInputs:
    """Static inputs of one bucket: pad rows first, real rows last. The mask inputs depend on the kernel:
    sdpa: `mask`; flex: `mask_pos` and `kv_valid` (the block mask is built from them inside the run)."""

    h: torch.Tensor  # [r_pad, hidden]
    pos: torch.Tensor  # [r_pad] long: scratch rows for pads, real positions after
    cos: torch.Tensor  # [r_pad, D]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [r_pad, n_pad] bool (sdpa)
    out: torch.Tensor  # [1, hidden]
    kernel: str = "sdpa"
    mask_pos: torch.Tensor | None = None  # [r_pad] long (flex): 0 for pad rows (key 0 only), real positions after
    kv_valid: torch.Tensor | None = None  # [n_pad] bool (flex): key row attendable

    @staticmethod
    def empty(model: DecoderModel, r_pad: int, n_pad: int, kernel: str | None = None) -> "PaddedInputs":
        dev, dt, s = model.device, model.dtype, model.shape
        kernel = resolve_kernel(dev, kernel)
        flex = kernel == "flex"
        return PaddedInputs(
            h=torch.zeros(r_pad, s.hidden_size, device=dev, dtype=dt),
            pos=torch.zeros(r_pad, dtype=torch.long, device=dev),
            cos=torch.ones(r_pad, s.head_dim, device=dev, dtype=dt),
            sin=torch.zeros(r_pad, s.head_dim, device=dev, dtype=dt),
            mask=None if flex else torch.zeros(r_pad, n_pad, dtype=torch.bool, device=dev),
            out=torch.zeros(1, s.hidden_size, device=dev, dtype=dt),
            kernel=kernel,
            mask_pos=torch.zeros(r_pad, dtype=torch.long, device=dev) if flex else None,
            kv_valid=torch.ones(n_pad, dtype=torch.bool, device=dev) if flex else None)

    @property
    def n_pad(self) -> int:
        return self.mask.shape[1] if self.mask is not None else self.kv_valid.shape[0]

    def attn_mask(self) -> AttnMask:
        """The mask of the padded rows over n_pad keys, from the static inputs (device ops only)."""
        if self.mask is not None:
            return AttnMask(self.pos, self.n_pad, None, "sdpa", dense=self.mask)
        return build_mask(self.mask_pos, self.n_pad, self.kv_valid, "flex")

    def fill(self, state: KVState, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             num_keys: int, scratch_start: int) -> None:
        """Copy one call's rows in (device copies only: no host synchronisation)."""
        r, r_pad = pos.shape[0], self.pos.shape[0]
        p = r_pad - r
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
        else:
            self.mask_pos[:p].zero_()  # pad rows: key 0 only (when valid; else no key, and flex gives 0)
            self.mask_pos[p:].copy_(pos)
            if state.has_holes():
                self.kv_valid.copy_(state.valid[: self.n_pad])
            else:
                self.kv_valid.fill_(True)
            self.kv_valid[num_keys:] = False


def run_layers_padded(model: DecoderModel, state: KVState, inp: PaddedInputs, first: int) -> None:
    """The padded recompute layers over static inputs; writes inp.out. Captured as a CUDA graph."""
    num_layers = model.shape.num_layers
    n_pad = inp.n_pad
    mask = inp.attn_mask()
    h = inp.h
    for layer in range(first, num_layers):
        q, k, v = qkv(model, layer, h, inp.cos, inp.sin)
        write_kv(state, layer, inp.pos, k, v)
        if layer == num_layers - 1:
            h = attend_mlp(model, layer, h[-1:], q[:, -1:], inp.pos[-1:], state, n_pad, causal_prefix=False,
                           mask=mask.last_row())
        else:
            h = attend_mlp(model, layer, h, q, inp.pos, state, n_pad, causal_prefix=False, mask=mask)
    inp.out.copy_(h[-1:])


def padded_geometry(num_keys: int, capacity: int) -> tuple[int, int]:
    """(alloc, n_pad): real rows of the static buffer (capacity rounded up) and the padded key count."""
    alloc = -(-capacity // KEY_BUCKET) * KEY_BUCKET
    n_pad = min(-(-num_keys // KEY_BUCKET) * KEY_BUCKET, alloc)
    return alloc, n_pad


def run_layers_padded_eager(model: DecoderModel, state: KVState, h: torch.Tensor, pos: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, first: int, num_keys: int,
                            kernel: str | None = None) -> torch.Tensor:
    """The padded computation, eagerly, on a state with MAX_PAD scratch rows past its real capacity
    (see padded_state). Used by the tests to check padded == plain on any device."""
    alloc = state.capacity - MAX_PAD
    _, n_pad = padded_geometry(num_keys, alloc)
    inp = PaddedInputs.empty(model, row_bucket(pos.shape[0]), n_pad, kernel)
    inp.fill(state, h, pos, cos, sin, num_keys, scratch_start=alloc)
    run_layers_padded(model, state, inp, first)
    return inp.out.clone()


class _Graph:
    def __init__(self, graph, inputs: PaddedInputs):
        self.graph = graph
        self.inputs = inputs


class GraphCache:
    """Per model: one static KV buffer (grown on demand; growing drops the graphs) and the captured graphs."""

    def __init__(self, model: DecoderModel):
        self.model = model
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.alloc = 0
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures = 0
        self.failed: str | None = None

    def state(self, capacity: int) -> KVState:
        """A zeroed KV state of `capacity` rows living in the static buffer (valid until the next call)."""
        alloc, _ = padded_geometry(capacity, capacity)
        if self.k is None or alloc > self.alloc:
            self.graphs.clear()
            self.k = self.v = None
            s = self.model.shape
            shape = (s.num_layers, s.num_kv_heads, alloc + MAX_PAD, s.head_dim)
            self.k = torch.zeros(shape, dtype=self.model.dtype, device=self.model.device)
            self.v = torch.zeros(shape, dtype=self.model.dtype, device=self.model.device)
            self.alloc = alloc
        else:
            self.k[:, :, :capacity].zero_()
            self.v[:, :, :capacity].zero_()
        return KVState(k=self.k, v=self.v)

    def run(self, state: KVState, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            first: int, num_keys: int, kernel: str | None = None) -> torch.Tensor:
        """Replay (capturing first if needed) the graph for this bucket; returns the last row [1, hidden]."""
        assert state.k is self.k, "the state must live in this cache's static buffer (GraphCache.state)"
        _, n_pad = padded_geometry(num_keys, self.alloc)
        key = (row_bucket(pos.shape[0]), n_pad, first, resolve_kernel(self.model.device, kernel))
        if self.failed is not None:  # capture does not work here: the same padded computation, eagerly
            inp = PaddedInputs.empty(self.model, key[0], n_pad, key[3])
            inp.fill(state, h, pos, cos, sin, num_keys, scratch_start=self.alloc)
            run_layers_padded(self.model, state, inp, first)
            return inp.out
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self._capture(state, key)
            except RuntimeError as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed (%s); running the recompute layers eagerly", self.failed)
                return self.run(state, h, pos, cos, sin, first, num_keys, kernel)
            self.graphs[key] = g
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        g.inputs.fill(state, h, pos, cos, sin, num_keys, scratch_start=self.alloc)
        g.graph.replay()
        return g.inputs.out.clone()

    def _capture(self, state: KVState, key: tuple) -> _Graph:
        r_pad, n_pad, first, kernel = key
        inp = PaddedInputs.empty(self.model, r_pad, n_pad, kernel)
        # warm-up on a side stream (allocator, library handles, the flex kernel's compilation), then capture;
        # every run is idempotent (pad rows write scratch rows only; the real rows would be rewritten with
        # the same values)
        inp.pos.copy_(self.alloc + torch.arange(r_pad, device=inp.pos.device) % MAX_PAD)  # scratch rows only
        if inp.mask is not None:
            inp.mask[:, 0] = True
        # (flex: mask_pos 0 and every key valid = key 0 only, as built by PaddedInputs.empty)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run_layers_padded(self.model, state, inp, first)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_layers_padded(self.model, state, inp, first)
        self.captures += 1
        log.info("captured a CUDA graph for %d rows x %d keys from layer %d", r_pad, n_pad, first)
        return _Graph(graph, inp)


def per_model(model: DecoderModel, attr: str, make):
    """The model's object stored under `attr`, made by make(model) on first use (graph caches live as long as
    their model)."""
    obj = getattr(model, attr, None)
    if obj is None:
        obj = make(model)
        setattr(model, attr, obj)
    return obj


def graph_cache(model: DecoderModel) -> GraphCache:
    return per_model(model, "_graph_cache", GraphCache)


def copy_state(state: KVState, capacity: int) -> KVState:
    """A private copy (first `capacity` rows, valid mask included) of a state living in a static buffer."""
    out = KVState(k=state.k[:, :, :capacity].clone(), v=state.v[:, :, :capacity].clone(), length=state.length)
    if state.valid is not None:
        out.valid = state.valid[:capacity].clone()
        out.valid_host = bytearray(state.valid_host[:capacity])
    return out
