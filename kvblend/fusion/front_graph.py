"""The front of a blended prefill in static shapes, so it can be captured as one CUDA graph.

The front is everything before the recompute layers: the embedding, the layers below the check layer over
every token, and the check layer(s) with the token selection (fusion/select.py). Eagerly (fusion/blend.py)
these are ~25 kernel launches per layer plus the selection's gathers, sorts and top-k, issued one by one from
Python: on a small model the GPU idles while the host launches them. Here the same computation is written so
that every tensor has a size known before the call (a *plan*), and the whole front is one graph replay:

  * the prompt is padded to n_pad tokens (pads after the query, token 0): causal attention keeps real rows
    from seeing them, and their K/V go to scratch rows past every real row (decoding's rows stay untouched);
  * at each check step the rows of the current set are scored, non-candidates get -inf, and a stable sort
    ranks the candidates; the kept ones are `rank < budget`, with the budget a device scalar, so one graph
    serves every budget of a size bucket;
  * the next set (always-recomputed rows + kept candidates, ascending positions) comes from sorting a key
    that puts members first; it is cut to a bucketed row count whose tail rows are pads that write scratch
    rows past every real row and attend to key 0 only (as in model/layer_graphs.py).

The selection is fusion/select.py's keep_top, the same function the eager front calls (k / v deviation,
query attention, their product, first tokens forced, narrowing over several check layers; ties go to lower
positions). The rank-sum signal (integer rank sums tie often), the frontier-only
k_tail_product and prompts with placeholders are left to the eager front. `run_front` runs the computation
eagerly (the tests compare it with the eager blend on CPU); `run_static_front` replays it as a CUDA graph of
the model runner's graph cache (model/graphs.py) on CUDA.

Graphs are keyed by the prompt's 256-token bucket, the check layer and policy, the 64-row buckets of the sets
and the 16-token bucket of the query; the first request of a new key pays a capture (two warm-up runs of the
eager front and the recording); the runner's cache keeps the most recently used graphs of every kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvblend.config import SelectionPolicy
from kvblend.fusion.select import keep_top, kv_deviation, query_attention_mass, signal_score
from kvblend.model.hf import DecoderModel
from kvblend.model.kv import MAX_PAD, KVState
from kvblend.model.layers import embed, layer_out, qkv, run_layers
from kvblend.model.rope import rope_cos_sin
from kvblend.model.runner import ModelRunner, row_bucket

log = logging.getLogger(__name__)

TOKEN_BUCKET = 256  # prompt length bucket of the front graph
FRONT_SIGNALS = ("k", "v", "attn", "k_attn_product")  # k_attn_rank (integer rank sums tie), k_tail_product: eager


@dataclass(frozen=True, slots=True)
class FrontPlan:
    """The host-known sizes of one blended prefill's front (the graph key is everything but the exact sizes)."""

    n: int  # prompt tokens
    n_pad: int
    prefix: int  # tokens before the first chunk
    query_start: int
    check_layer: int
    policy: SelectionPolicy
    budgets: tuple[int, ...]  # chunk tokens kept after each check step
    set_rows: tuple[int, ...]  # padded row count of the set entering each check step after the first
    query_pad: int

    @property
    def key(self) -> tuple:
        return (self.n_pad, self.check_layer, self.policy, self.set_rows, self.query_pad)

    @property
    def num_always(self) -> int:
        return self.prefix + (self.n - self.query_start)

    @property
    def rows_out(self) -> int:
        """Real rows of the set leaving the front (prefix + query + kept chunk tokens)."""
        return self.num_always + self.budgets[-1]


def front_supported(model: DecoderModel, policy: SelectionPolicy, check_layer: int, has_holes: bool,
                    enabled: bool = True) -> bool:
    """Whether the static front applies: no placeholders, a signal it implements, a recompute layer after,
    and `enabled` (RuntimeOptions.front_graph; False runs the eager front: for A/B measurements)."""
    if not enabled:
        return False
    last = check_layer + policy.layers - 1
    return not has_holes and policy.signal in FRONT_SIGNALS and last < model.shape.num_layers - 1


def make_plan(n: int, prefix: int, query_start: int, check_layer: int, ratio: float,
              policy: SelectionPolicy) -> FrontPlan:
    num_chunk = query_start - prefix
    budgets = tuple(policy.budget(step, policy.layers, ratio, num_chunk) for step in range(policy.layers))
    always = prefix + (n - query_start)
    n_pad = -(-n // TOKEN_BUCKET) * TOKEN_BUCKET
    set_rows = tuple(min(row_bucket(always + b), n_pad) for b in budgets)
    query = n - query_start
    return FrontPlan(n=n, n_pad=n_pad, prefix=prefix, query_start=query_start, check_layer=check_layer,
                     policy=policy, budgets=budgets, set_rows=set_rows, query_pad=-(-query // 16) * 16)


@dataclass(slots=True)
class FrontInputs:
    """Static inputs and outputs of one front graph."""

    ids: torch.Tensor  # [n_pad] long
    offsets: torch.Tensor  # [n_pad] long: each chunk token's offset inside its chunk (others: any)
    cos: torch.Tensor  # [n_pad, D] rope tables of positions 0..n_pad-1
    sin: torch.Tensor
    scalars: torch.Tensor  # long [4 + steps]: n, prefix, query_start, first_tokens, budget per step
    h_out: torch.Tensor  # [rows of the last set, hidden]
    pos_out: torch.Tensor  # [rows of the last set] long: real positions first, then scratch rows

    @staticmethod
    def empty(model: DecoderModel, plan: FrontPlan) -> "FrontInputs":
        dev = model.device
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(plan.n_pad, device=dev), model.dtype)
        rows = plan.set_rows[-1]
        return FrontInputs(ids=torch.zeros(plan.n_pad, dtype=torch.long, device=dev),
                           offsets=torch.zeros(plan.n_pad, dtype=torch.long, device=dev), cos=cos, sin=sin,
                           scalars=torch.zeros(4 + len(plan.budgets), dtype=torch.long, device=dev),
                           h_out=torch.zeros(rows, model.shape.hidden_size, dtype=model.dtype, device=dev),
                           pos_out=torch.zeros(rows, dtype=torch.long, device=dev))

    def fill(self, plan: FrontPlan, ids: torch.Tensor, offsets: torch.Tensor, first_tokens: int) -> None:
        """One call's values (device copies of host-known numbers: no synchronisation)."""
        self.ids.zero_()
        self.ids[:plan.n].copy_(ids)
        self.offsets[:plan.n].copy_(offsets)
        vals = [plan.n, plan.prefix, plan.query_start, first_tokens, *plan.budgets]
        self.scalars.copy_(torch.tensor(vals, dtype=torch.long), non_blocking=True)


def run_front(model: DecoderModel, state: KVState, plan: FrontPlan, inp: FrontInputs, scratch_start: int) -> None:
    """The front over static inputs (see the module docstring); writes inp.h_out / inp.pos_out.
    scratch_start: first of MAX_PAD state rows past every real row (pad rows write there; a real call has
    fewer than MAX_PAD pad rows, the capture's dummy call wraps around)"""
    dev = inp.ids.device
    n_pad, c, policy = plan.n_pad, plan.check_layer, plan.policy
    n_t, prefix_t, qstart_t, first_t = inp.scalars[0], inp.scalars[1], inp.scalars[2], inp.scalars[3]
    keys_idx = torch.arange(n_pad, device=dev)
    # pad tokens write scratch rows: the rows past the prompt belong to decoding and stay untouched
    rows_below = torch.where(keys_idx < n_t, keys_idx, scratch_start + (keys_idx - n_t).clamp(min=0) % MAX_PAD)
    h = run_layers(model, state, embed(model, inp.ids), inp.cos, inp.sin, range(c), rows_below, None, n_pad,
                   causal_prefix=True)
    pos = rows_below  # state rows of the current set: real positions first (ascending), then pad rows
    rope_pos = keys_idx  # their positions (0 for pad rows)
    real = keys_idx < n_t
    num_real = n_t
    for step in range(policy.layers):
        layer = c + step
        q, k, v = qkv(model, layer, h, inp.cos[rope_pos], inp.sin[rope_pos])
        cand = real & (rope_pos >= prefix_t) & (rope_pos < qstart_t)
        score = _scores(model, state, layer, policy.signal, q, k, v, pos, rope_pos, real, num_real, plan,
                        n_t - qstart_t)
        forced = (inp.offsets[rope_pos] < first_t) if policy.first_tokens else None
        keep = keep_top(score, cand, inp.scalars[4 + step], forced)
        member = keep | (real & ~cand)
        member_key = torch.where(member, rope_pos, n_pad + torch.arange(pos.numel(), device=dev))
        rows = torch.sort(member_key, stable=True).indices[:plan.set_rows[step]]
        num_real = prefix_t + (n_t - qstart_t) + inp.scalars[4 + step]
        slot = torch.arange(rows.numel(), device=dev)
        real = slot < num_real
        new_rope = torch.where(real, rope_pos[rows], torch.zeros_like(rows))
        new_pos = torch.where(real, pos[rows], scratch_start + (slot - num_real).clamp(min=0) % MAX_PAD)
        mask = torch.where(real[:, None], keys_idx[None, :] <= new_rope[:, None], keys_idx[None, :] == 0)
        h = layer_out(model, layer, state, h[rows], q[:, rows], k[:, rows], v[:, rows], new_pos, None, n_pad,
                      mask=mask)
        pos, rope_pos = new_pos, new_rope
    inp.h_out.copy_(h)
    inp.pos_out.copy_(pos)


def _scores(model: DecoderModel, state: KVState, layer: int, signal: str, q, k, v, pos, rope_pos, real,
            num_real, plan: FrontPlan, query_len) -> torch.Tensor:
    """select.signal_score for every row of the set ([rows]); the caller masks non-candidates."""
    def deviation() -> torch.Tensor:
        fresh, cached = (v, state.v[layer]) if signal == "v" else (k, state.k[layer])
        return kv_deviation(fresh, cached[:, pos])

    def attention(last: int) -> torch.Tensor:
        # the query's attention mass at this layer over the keys it sees: fresh rows of the set, cached elsewhere
        assert last == 0, "front_supported() admits whole-query signals only"
        n_pad, dev = plan.n_pad, q.device
        keys = torch.cat([state.k[layer, :, :n_pad], state.k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
        keys = keys.to(torch.float32)
        keys.index_copy_(1, torch.where(real, rope_pos, torch.full_like(rope_pos, n_pad)), k.to(torch.float32))
        slot = torch.arange(plan.query_pad, device=dev)
        q_valid = slot < query_len
        q_rows = torch.where(q_valid, num_real - query_len + slot, torch.zeros_like(slot))
        key_idx = torch.arange(n_pad + 1, device=dev)
        q_pos = rope_pos[q_rows]
        see = torch.where(q_valid[:, None], key_idx[None, :] <= q_pos[:, None], key_idx[None, :] == 0)
        return query_attention_mass(q[:, q_rows].to(torch.float32), keys, see, model.attn_scale,
                                    row_weight=q_valid)[rope_pos]

    return signal_score(signal, deviation, attention)


def run_static_front(runner: ModelRunner, state: KVState, plan: FrontPlan, ids: torch.Tensor,
                     offsets: torch.Tensor, capture: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, positions) of the set leaving the front: plan.rows_out real rows (views of static outputs, valid
    until the next call). `state` lives in a static buffer (ModelRunner.new_state(static=True)); capture:
    replay a CUDA graph of the runner's cache (False, off CUDA or once capture failed: the same computation,
    eagerly)."""
    buf = state.buffer
    if buf is None:
        raise ValueError("the static front needs a state in a static buffer (ModelRunner.new_state)")
    model = runner.model

    def make() -> FrontInputs:
        return FrontInputs.empty(model, plan)

    def body(inp: FrontInputs) -> None:
        run_front(model, buf.full, plan, inp, buf.scratch_start)

    # warm-up and capture with n = 0: no real row, so the check layers write scratch rows only and the
    # cached chunk rows already placed in the buffer stay intact
    g = runner.graphs.get(("front", buf.id, plan.key), make, lambda: body, lambda inp: inp.scalars.zero_()) \
        if capture else None
    inp = g.io if g is not None else make()
    inp.fill(plan, ids, offsets, plan.policy.first_tokens)
    if g is not None:
        g.replay()
    else:
        body(inp)
    return inp.h_out[:plan.rows_out], inp.pos_out[:plan.rows_out]
