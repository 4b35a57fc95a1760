"""Placing cached chunk KV into a request's KV state: copy each resident chunk's rows to its global positions
and re-rotate its keys there in one batched step (RoPE deltas formed in float64, as rope.rerotate does);
host chunks in pinned memory are loaded layer group by layer group on a side stream, overlapped with the
compute of earlier layers. Also the promotion of a placeholder (a CPU-staged chunk) into its reserved rows.
Cached chunk tensors are only read.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.model.hf import DecoderModel
from kvblend.model.kv import KVState
from kvblend.model.rope import rotate_half

H2D_GROUPS = 8  # layer groups of a pipelined host->device chunk load (one event each)


def rotation_tables(placed: Sequence[tuple[ChunkKV, int]], row_start: int, row_end: int,
                    model: DecoderModel) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [rows, D] that move each placed chunk's keys from their cached positions to rows
    start.. (rows of no placed chunk get delta 0, the identity)."""
    delta = torch.zeros(row_end - row_start, dtype=torch.float64)
    for chunk, start in placed:
        delta[start - row_start:start - row_start + chunk.num_tokens] = float(start - chunk.rope_offset)
    delta = delta.to(model.device, non_blocking=True)
    angle = delta[:, None] * model.inv_freq.to(device=model.device, dtype=torch.float64)[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def place_chunks(state: KVState, placed: Sequence[tuple[ChunkKV, int]], model: DecoderModel,
                 layers: slice = slice(None), tables: tuple | None = None) -> None:
    """Copy cached chunks (chunk, first row) into the state for `layers`, then re-rotate all their keys in
    one step. Host chunks in pinned memory are copied asynchronously (ordered on the current stream)."""
    if not placed:
        return
    for chunk, start in placed:
        end = start + chunk.num_tokens
        pinned = chunk.kv.device.type == "cpu" and chunk.kv.is_pinned()
        state.k[layers, :, start:end].copy_(chunk.kv[0, layers], non_blocking=pinned)
        state.v[layers, :, start:end].copy_(chunk.kv[1, layers], non_blocking=pinned)
    if tables is None:
        a = min(start for _, start in placed)
        b = max(start + chunk.num_tokens for chunk, start in placed)
        cos, sin = rotation_tables(placed, a, b, model)
    else:
        cos, sin, a, b = tables
    kf = state.k[layers, :, a:b].to(torch.float32)
    state.k[layers, :, a:b] = (kf * cos + rotate_half(kf) * sin).to(state.k.dtype)


def _layer_groups(order: Sequence[int], num_groups: int) -> list[list[int]]:
    """Consecutive layers of `order` form a group while they are contiguous (at most len/num_groups each)."""
    size = max(1, -(-len(order) // num_groups))
    groups, run = [], []
    for layer in order:
        if run and (layer != run[-1] + 1 or len(run) == size):
            groups.append(run)
            run = []
        run.append(layer)
    if run:
        groups.append(run)
    return groups


def place_pipelined(state: KVState, placed: Sequence[tuple[ChunkKV, int]], model: DecoderModel,
                    order: Sequence[int], num_groups: int = H2D_GROUPS) -> tuple[list, object]:
    """Chunks -> state on a side stream, layer group by layer group in `order` (the layers the compute needs
    first go first), each group re-rotated on arrival. Returns per layer the event to wait for before reading
    that layer's rows (None: not copied) and the event of the last group."""
    dev = model.device
    side = side_stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))  # the buffer was allocated / zeroed there
    a = min(start for _, start in placed)
    b = max(start + chunk.num_tokens for chunk, start in placed)
    events: list = [None] * model.shape.num_layers
    last = None
    with torch.cuda.stream(side):
        cos, sin = rotation_tables(placed, a, b, model)
        for group in _layer_groups(order, num_groups):
            place_chunks(state, placed, model, slice(group[0], group[-1] + 1), (cos, sin, a, b))
            last = torch.cuda.Event(enable_timing=True)
            last.record(side)
            for layer in group:
                events[layer] = last
    return events, last


_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device):
    """One copy stream per device for the whole process: a new stream per call would also give the caching
    allocator a new pool per call (fresh cudaMallocs on the critical path)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


def wait(event, device: torch.device) -> None:
    """Make the compute stream wait for a side-stream event (a pipelined chunk copy); None: nothing to wait."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


@torch.inference_mode()
def promote_chunk(model: DecoderModel, state: KVState, chunk: ChunkKV, start: int) -> None:
    """Fill a placeholder's reserved rows with its cached KV (re-rotated) and make them attendable.

    Tokens decoded after the placeholder did not attend to it; from the next forward on they do.
    """
    end = start + chunk.num_tokens
    if state.valid is None or bool(state.valid[start:end].any()):
        raise ValueError(f"rows {start}..{end} are not a placeholder of this state")
    place_chunks(state, [(chunk, start)], model)
    state.set_valid(start, end, True)
