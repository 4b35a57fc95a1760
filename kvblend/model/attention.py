"""Attention of a set of query rows at global positions over the keys [0, num_keys) of a KV state, with the
per-token causal mask (key <= query position, and the key row valid when the state has placeholder holes).

Two kernels compute the same thing:

  sdpa   scaled_dot_product_attention with a dense boolean [r, num_keys] mask: the reference, and the
         default on CPU.
  flex   FlexAttention (torch.compile'd once per process) with a BlockMask built from the positions with
         device tensor ops only (no host synchronisation, no vmap'd create_block_mask): key blocks wholly at
         or below a query block's smallest position and without holes are *full* (no mask evaluated), blocks
         reaching past it or holding invalid rows are *partial* (mask_mod `kv <= q_pos[q] & valid[kv]`), the
         rest are skipped. Usable inside CUDA-graph capture when its inputs are static tensors.

Selection: the `kernel` argument (RuntimeOptions.attention, from EngineConfig.attention or
KVBLEND_ATTENTION through load_config) = flex | sdpa | auto (default auto = sdpa on every device: on the H200, torch 2.11, the compiled flex kernel took 0.23-0.89 ms per
call against 0.11-0.27 ms for cuDNN SDPA with the dense mask on the real shapes, 464-576 rows over 3168-3328
keys; docs/results/bench/attention_kernels_h200.json. flex stays selectable and tested). If flex fails to compile or run, one warning is logged and
sdpa is used for the rest of the process.

How flex is compiled: RuntimeOptions.flex_compile (KVBLEND_FLEX_COMPILE) = static | dynamic | auto (default auto: static on CPU, dynamic
on CUDA).
  static   torch.compile(dynamic=False), one compilation per shape; queries and keys are padded to whole
           blocks (pad rows / keys are masked) so shapes fall into block multiples. On CPU the dynamic mode
           is not usable: inductor's CPU flex template mis-generates C++ for some symbolic shapes (torch 2.13).
  dynamic  torch.compile(dynamic=None): torch's automatic dynamic shapes (the first shape compiled exactly,
           the next ones with symbolic sizes); no padding (the kernel bounds partial blocks itself).

A prefill builds its mask once (`build_mask` -> AttnMask) and passes it to every layer with the same queries.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KERNELS = ("sdpa", "flex", "auto")
BLOCK = 128  # FlexAttention's sparse block size (query and key blocks)

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None  # type: ignore[assignment,misc]
    flex_attention = None  # type: ignore[assignment]

COMPILE_MODES = ("static", "dynamic", "auto")
RECOMPILE_LIMIT = 64  # static mode compiles per shape: torch's default limit (8) would fall back to eager

_lock = threading.Lock()
_compiled: dict = {}  # compile mode -> the compiled flex_attention, built once per process
_flex_broken: str | None = None  # why flex is not used (compile or run failure), once set
_FROM_KV_BLOCKS_ARGS = (set(inspect.signature(BlockMask.from_kv_blocks).parameters)
                        if BlockMask is not None else set())


def flex_available() -> bool:
    return flex_attention is not None and _flex_broken is None


def resolve_kernel(device: torch.device | str, kernel: str | None = None) -> str:
    """"sdpa" or "flex" for `kernel` (None or auto = sdpa everywhere: measured faster on the H200, see the
    module docstring; RuntimeOptions.attention chooses); an explicit flex falls back to sdpa only once flex
    is known broken."""
    k = (kernel or "auto").strip().lower()
    if k not in KERNELS:
        raise ValueError(f"unknown attention kernel '{k}'; use one of {', '.join(KERNELS)}")
    if k == "auto":
        k = "sdpa"
    if k == "flex" and not flex_available():
        return "sdpa"
    return k


_compile_mode = "auto"  # RuntimeOptions.flex_compile, set by the model runner


def set_flex_compile(mode: str) -> None:
    """The process-wide flex compile mode (static | dynamic | auto), from RuntimeOptions.flex_compile."""
    global _compile_mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown flex compile mode '{mode}'; use one of {', '.join(COMPILE_MODES)}")
    _compile_mode = mode


def compile_mode(device: torch.device | str) -> str:
    """"static" or "dynamic" (see the module docstring): set_flex_compile's mode, auto = static on CPU."""
    m = _compile_mode
    if m == "auto":
        m = "dynamic" if torch.device(device).type == "cuda" else "static"
    return m


def compiled_flex(mode: str = "static"):
    """The process-wide torch.compile'd flex_attention of a compile mode (each shape, or shape class,
    compiles on its first call)."""
    fn = _compiled.get(mode)
    if fn is None:
        with _lock:
            fn = _compiled.get(mode)
            if fn is None:
                cfg = torch._dynamo.config
                for name in ("recompile_limit", "cache_size_limit"):
                    if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
                        setattr(cfg, name, RECOMPILE_LIMIT)
                fn = torch.compile(flex_attention, dynamic=False if mode == "static" else None, fullgraph=True)
                _compiled[mode] = fn
    return fn


def _mark_broken(exc: BaseException) -> None:
    global _flex_broken
    if _flex_broken is None:
        _flex_broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("FlexAttention unavailable (%s); using SDPA with a dense mask", _flex_broken)


# --------------------------------------------------------------------------------------------- masks
def dense_mask(q_pos: torch.Tensor, num_keys: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [r, num_keys]: key position <= query position (and valid[key] when given)."""
    mask = torch.arange(num_keys, device=q_pos.device)[None, :] <= q_pos[:, None]
    if valid is not None:
        mask = mask & valid[None, :num_keys]
    return mask


def _compact(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m [nq, nk] bool -> (counts [1, 1, nq] int32, indices [1, 1, nq, nk] int32): per row, the column indices
    of the True entries first (ascending), then the others. A scatter of cumulative counts: no sort, no sync."""
    nk = m.shape[-1]
    t = m.to(torch.int32)
    c = t.cumsum(-1, dtype=torch.int32)
    n = c[:, -1:]
    j = torch.arange(nk, device=m.device, dtype=torch.int32).expand_as(c)
    dest = torch.where(m, c - 1, n + j - c)  # False at column j goes after the n True ones, in order
    idx = torch.empty_like(dest).scatter_(-1, dest.long(), j)
    return n[:, 0][None, None].contiguous(), idx[None, None].contiguous()


def _padded(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """x[:length] extended with `value` to `length` entries (x may be longer or shorter)."""
    if x.shape[0] >= length:
        return x[:length]
    return torch.cat([x, x.new_full((length - x.shape[0],), value)])


def _rows_to_blocks(q_pos: torch.Tensor, length: int) -> torch.Tensor:
    """q_pos extended to `length` rows by repeating the last position (changes no block's min or max)."""
    r = q_pos.shape[0]
    return q_pos if r == length else torch.cat([q_pos, q_pos[-1:].expand(length - r)])


def block_structure(q_pos: torch.Tensor, num_keys: int, valid: torch.Tensor | None = None, block: int = BLOCK):
    """(full, partial): bool [nq, nk] per (query block, key block), exact: full = every (query, key) pair of
    the tile attends (every key is valid, < num_keys and <= the block's smallest query position); partial =
    some but not all do (the mask_mod decides); neither = none does (the tile is skipped)."""
    r = q_pos.shape[0]
    nq, nk = -(-r // block), -(-num_keys // block)
    qb = _rows_to_blocks(q_pos, nq * block).view(nq, block)
    lo, hi = qb.amin(1), qb.amax(1)
    keys = torch.arange(nk * block, device=q_pos.device)
    if valid is None:
        vb = keys < num_keys
    else:
        vb = _padded(valid[:num_keys], nk * block, False)
    vb = vb.view(nk, block)
    first_valid = torch.where(vb, keys.view(nk, block), nk * block).amin(1)  # nk * block: none valid
    end = keys.view(nk, block)[:, -1]
    touched = first_valid[None, :] <= hi[:, None]
    full = (end[None, :] <= lo[:, None]) & vb.all(1)[None, :]
    return full, touched & ~full


def position_block_mask(q_pos: torch.Tensor, num_keys: int, valid: torch.Tensor | None = None,
                        block: int = BLOCK, pad: bool = False):
    """FlexAttention BlockMask for queries at positions q_pos [r] over keys [0, num_keys): key <= q_pos[q]
    and valid[key] (valid: bool [>= num_keys] or None = all valid). Device tensor ops only (no host sync).

    pad=False: seq_lengths (r, num_keys); the mask_mod indexes q_pos [r] and valid [num_keys] (the kernel
    bounds the indices of a partial last block). pad=True: seq_lengths are whole blocks (nq * block,
    nk * block); the caller pads queries and keys to them; pad rows repeat the last position and keys
    >= num_keys are invalid, so nothing changes for the real rows."""
    r = q_pos.shape[0]
    nq, nk = -(-r // block), -(-num_keys // block)
    full, partial = block_structure(q_pos, num_keys, valid, block)
    kv_num, kv_idx = _compact(partial)
    full_num, full_idx = _compact(full)
    if pad:
        qp = _rows_to_blocks(q_pos, nq * block)
        vv = (_padded(valid[:num_keys], nk * block, False) if valid is not None
              else torch.arange(nk * block, device=q_pos.device) < num_keys)
        lengths = (nq * block, nk * block)
    else:
        qp = q_pos
        vv = (valid[:num_keys] if valid is not None
              else torch.ones(num_keys, dtype=torch.bool, device=q_pos.device))
        lengths = (r, num_keys)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= qp[q_idx]) & vv[kv_idx]

    kw = {"compute_q_blocks": False} if "compute_q_blocks" in _FROM_KV_BLOCKS_ARGS else {}
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=lengths, **kw)


@dataclass(slots=True)
class AttnMask:
    """The mask of one set of queries, built once and used by every layer with those queries.
    kernel "sdpa": `dense` [r, num_keys] bool; kernel "flex": `block` (a BlockMask)."""

    q_pos: torch.Tensor  # [r]
    num_keys: int
    valid: torch.Tensor | None  # bool [>= num_keys] or None (all valid)
    kernel: str
    dense: torch.Tensor | None = None
    block: object | None = None
    compile_mode: str = "static"  # flex: static = block's lengths are padded to whole blocks

    def last_row(self) -> "AttnMask":
        """The mask of the last query row alone (dense: a single row is a decode-like SDPA call)."""
        if self.dense is not None:
            d = self.dense[-1:]
        else:
            d = dense_mask(self.q_pos[-1:], self.num_keys, self.valid)
        return AttnMask(self.q_pos[-1:], self.num_keys, self.valid, "sdpa", dense=d)


def build_mask(q_pos: torch.Tensor, num_keys: int, valid: torch.Tensor | None = None,
               kernel: str | None = None) -> AttnMask:
    """The mask for queries at q_pos [r] over keys [0, num_keys), for `kernel` (resolved as resolve_kernel)."""
    k = resolve_kernel(q_pos.device, kernel)
    if k == "flex":
        mode = compile_mode(q_pos.device)
        return AttnMask(q_pos, num_keys, valid, "flex", compile_mode=mode,
                        block=position_block_mask(q_pos, num_keys, valid, pad=mode == "static"))
    return AttnMask(q_pos, num_keys, valid, "sdpa", dense=dense_mask(q_pos, num_keys, valid))


# --------------------------------------------------------------------------------------------- attention
def _flex(q, keys, vals, num_keys: int, scale: float, mask: AttnMask) -> torch.Tensor:
    r = q.shape[1]
    q_len, kv_len = mask.block.seq_lengths
    if q_len > r:  # static mode: pad rows (their outputs are dropped)
        q = torch.cat([q, q.new_zeros(q.shape[0], q_len - r, q.shape[2])], dim=1)
    elif mask.compile_mode == "static":  # contiguous like the padded case: strides are part of the shape
        q = q.contiguous()
    if kv_len > num_keys:  # static mode: zero keys past num_keys (masked: invalid), contiguous like every
        pad = kv_len - num_keys  # other static call, so the compiled kernel does not vary with strides
        keys = torch.cat([keys[:, :num_keys], keys.new_zeros(keys.shape[0], pad, keys.shape[2])], dim=1)
        vals = torch.cat([vals[:, :num_keys], vals.new_zeros(vals.shape[0], pad, vals.shape[2])], dim=1)
    elif mask.compile_mode == "static":
        keys, vals = keys[:, :num_keys].contiguous(), vals[:, :num_keys].contiguous()
    else:
        keys, vals = keys[:, :num_keys], vals[:, :num_keys]
    out = compiled_flex(mask.compile_mode)(q[None], keys[None], vals[None], block_mask=mask.block, scale=scale,
                                           enable_gqa=q.shape[0] != keys.shape[0])[0]
    return out[:, :r] if q_len > r else out


def masked_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, q_pos: torch.Tensor,
                     num_keys: int, valid: torch.Tensor | None, scale: float, kernel: str | None = None,
                     mask: AttnMask | None = None) -> torch.Tensor:
    """q [H, r, D] at positions q_pos [r]; keys, vals [H_kv, >= num_keys, D] (only the first num_keys are
    used; H a multiple of H_kv). Returns [H, r, D]. mask: a prebuilt AttnMask (its kernel wins)."""
    if mask is None:
        mask = build_mask(q_pos, num_keys, valid, kernel)
    if mask.kernel == "flex" and _flex_broken is None:
        try:
            return _flex(q, keys, vals, num_keys, scale, mask)
        except Exception as exc:  # compile or kernel failure: SDPA from here on
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            _mark_broken(exc)
    keys, vals = keys[:, :num_keys], vals[:, :num_keys]
    d = mask.dense if mask.dense is not None else dense_mask(mask.q_pos, num_keys, mask.valid)
    return F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=d[None, None], scale=scale,
                                          enable_gqa=True)[0]
