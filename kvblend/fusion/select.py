"""Which chunk tokens a blended prefill recomputes: selection signals and the selection policy.

At a check layer every candidate chunk token has a fresh K/V (computed over the blended context) and a
cached K/V (computed when the chunk was prefilled alone). A signal scores each candidate; the policy keeps
the top `ratio` of chunk tokens. Signals (kvblend.vocab.SCORE_ON):

  k               squared deviation of fresh K from the cached row (LMCache's CacheBlend)
  v               the same on V (the original CacheBlend code)
  attn            attention mass from the query tokens onto the token at the check layer, with the positions
                  the model really sees (information flow, as in InfoFlow KV)
  k_attn_rank     rank of k + rank of attn (a token must matter on both)
  k_attn_product  k deviation x attention mass
  k_tail_product  k deviation x attention mass from the query's last TAIL_QUERY_TOKENS tokens only (the
                  positions nearest the first answer token; a long query, such as samsum's dialogue, otherwise
                  spreads the mass over its own local reading). Frontier-only until kvblend.vocab.SCORE_ON lists
                  it (EXTRA_SIGNALS below), so EngineConfig cannot select it yet.
  draft_attn      the attention mass a small draft model's query tokens give each prompt token, summed over its
                  layers and heads (CacheClip: the draft reads the whole prompt with full attention, cheaply);
                  computed once per request by `draft_attention_prior` and passed to the prefill as `prior`
  k_draft_product k deviation x draft_attn

Policy extras: `first_tokens` keeps each chunk's first N tokens always (EPIC's false attention sinks),
inside the same budget; `layers` > 1 narrows progressively (CacheBlend's gradual filtering): the first check
layer keeps layers x ratio, the next (layers-1) x ratio of the survivors' fresh scores, ... down to ratio.
Ratio 0 selects nothing (= reuse) and ratio 1 everything (= full prefill), whatever the signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvblend.config import SelectionPolicy, num_to_select
from kvblend.vocab import EXTRA_SIGNALS, SELECTION_SIGNALS as SIGNALS

ATTENTION_SIGNALS: tuple[str, ...] = ("attn", "k_attn_rank", "k_attn_product", "k_tail_product")
DRAFT_SIGNALS: tuple[str, ...] = ("draft_attn", "k_draft_product")  # need a draft model's prior
TAIL_QUERY_TOKENS = 16  # k_tail_product: the query's last tokens whose attention counts


def kv_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-token squared deviation summed over heads and dims. fresh, cached: [H_kv, T, D] -> [T] (fp32)."""
    diff = fresh.to(torch.float32) - cached.to(torch.float32)
    return diff.square().sum(dim=(0, 2))


def select_top(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (sorted ascending) of the top `ratio` fraction of tokens by deviation."""
    n = num_to_select(deviation.numel(), ratio)
    keep = keep_top(deviation, torch.ones_like(deviation, dtype=torch.bool), n)
    return keep.nonzero().squeeze(1)


def keep_top(score: torch.Tensor, cand: torch.Tensor, budget, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The selection, written once in static shapes: bool [N], the `budget` best candidates by score.

    score [N]; cand bool [N] (non-candidates are never kept); budget an int or a 0-d device tensor (so one
    CUDA graph serves every budget); forced bool [N]: candidates that outrank every other (each chunk's
    first tokens), ranked among themselves by score. Ties go to the lower index (a stable sort). The eager
    path calls it over exactly its candidates (cand all true); the static front over padded rows."""
    score = torch.where(cand, score.to(torch.float32), torch.full_like(score, float("-inf"), dtype=torch.float32))
    if forced is not None:
        lift = (torch.where(cand, score.abs(), torch.zeros_like(score)).max() + 1.0) * 2.0
        score = torch.where(forced & cand, score + lift, score)
    order = torch.sort(score, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return cand & (rank < budget)


@dataclass(slots=True)
class CheckLayer:
    """What one check layer offers the selection.

    q, k, v: fresh [H, R, D] / [H_kv, R, D] of the rows the layer computed, at global positions `rows_pos`;
    cached_k, cached_v: the layer's KV buffer [H_kv, capacity, D] (cached chunk rows, re-rotated);
    cand_pos: global positions of the candidate chunk tokens (a subset of rows_pos);
    query_pos: global positions of the query tokens (a subset of rows_pos);
    num_keys: prompt length; valid: attendable rows [capacity] or None (all).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rows_pos: torch.Tensor
    cached_k: torch.Tensor
    cached_v: torch.Tensor
    cand_pos: torch.Tensor
    query_pos: torch.Tensor
    num_keys: int
    scale: float
    valid: torch.Tensor | None = None
    prior: torch.Tensor | None = None  # [>= num_keys] per-position importance from a draft model (the draft
    # signals need it; fusion/blend.py prefill refuses a draft signal without it)

    def rows_of(self, pos: torch.Tensor) -> torch.Tensor:
        lut = torch.full((self.num_keys,), -1, dtype=torch.long, device=pos.device)
        lut[self.rows_pos] = torch.arange(self.rows_pos.numel(), device=pos.device)
        return lut[pos]


def query_attention_mass(q: torch.Tensor, keys: torch.Tensor, see: torch.Tensor, scale: float,
                         row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention mass of queries q [H, Tq, D] over keys [H_kv, N, D] (both fp32; GQA by repeating the
    key heads), summed over heads and queries -> [N]. see [Tq, N] bool: the keys each query attends to;
    row_weight [Tq]: a per-query weight (0 drops a query, e.g. a pad row)."""
    group = q.shape[0] // keys.shape[0]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=0)
    scores = torch.matmul(q, keys.transpose(1, 2)) * scale  # [H, Tq, N]
    probs = scores.masked_fill(~see[None], float("-inf")).softmax(dim=-1)
    if row_weight is not None:
        probs = probs * row_weight[None, :, None]
    return probs.sum(dim=(0, 1))


def query_attention(layer: CheckLayer, last: int = 0) -> torch.Tensor:
    """Attention probability mass from the query tokens onto each candidate, summed over heads and query
    tokens [T_cand] (fp32). Keys are what the query sees at this layer: fresh rows where computed, the cached
    (re-rotated) rows elsewhere; per-token causal mask, placeholders masked out. last > 0: only the query's
    last `last` tokens count (k_tail_product); 0: every query token (the existing signals)."""
    n = layer.num_keys
    keys = layer.cached_k[:, :n].to(torch.float32).clone()
    keys[:, layer.rows_pos] = layer.k.to(torch.float32)
    query_pos = layer.query_pos[-last:] if last > 0 else layer.query_pos
    q = layer.q[:, layer.rows_of(query_pos)].to(torch.float32)  # [H, Tq, D]
    mask = torch.arange(n, device=q.device)[None, :] <= query_pos[:, None]
    if layer.valid is not None:
        mask = mask & layer.valid[None, :n]
    return query_attention_mass(q, keys, mask, layer.scale)[layer.cand_pos]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """0 for the smallest value ... T-1 for the largest (fp32)."""
    out = torch.empty_like(x, dtype=torch.float32)
    out[x.argsort()] = torch.arange(x.numel(), dtype=torch.float32, device=x.device)
    return out


def signal_score(signal: str, deviation: Callable[[], torch.Tensor], attention: Callable[[int], torch.Tensor],
                 prior: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Each signal's formula, written once for the eager path and the static front (which differ only in how
    they compute the parts): deviation() the K (V for signal v) deviation of each row, attention(last) the
    query's attention mass on it (last > 0: the query's last `last` tokens only), prior() a draft's prior."""
    if signal in ("k", "v"):
        return deviation()
    if signal == "attn":
        return attention(0)
    if signal == "k_attn_product":
        return deviation() * attention(0)
    if signal == "k_attn_rank":
        return _ranks(deviation()) + _ranks(attention(0))
    if signal == "k_tail_product":
        return deviation() * attention(TAIL_QUERY_TOKENS)
    if signal in ("draft_attn", "k_draft_product") and prior is not None:
        return prior() if signal == "draft_attn" else deviation() * prior()
    raise ValueError(f"unknown selection signal '{signal}'" if signal not in SIGNALS + EXTRA_SIGNALS
                     else f"selection signal '{signal}' needs a draft model's prior")


def token_scores(signal: str, layer: CheckLayer) -> torch.Tensor:
    """Importance of each candidate [T_cand] (higher = recompute first)."""
    def deviation() -> torch.Tensor:
        on_v = signal == "v"
        fresh = (layer.v if on_v else layer.k)[:, layer.rows_of(layer.cand_pos)]
        return kv_deviation(fresh, (layer.cached_v if on_v else layer.cached_k)[:, layer.cand_pos])

    prior = None if layer.prior is None else (lambda: layer.prior[layer.cand_pos].to(torch.float32))
    return signal_score(signal, deviation, lambda last: query_attention(layer, last=last), prior)


def select_candidates(policy: SelectionPolicy, layer: CheckLayer, budget: int,
                      forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices into layer.cand_pos (ascending) of the `budget` candidates kept at this check layer
    (keep_top over the candidates; forced: bool [T_cand], each chunk's first tokens)."""
    num = layer.cand_pos.numel()
    budget = min(budget, num)
    dev = layer.cand_pos.device
    if budget == 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    if budget == num:
        return torch.arange(num, device=dev)
    scores = token_scores(policy.signal, layer)
    cand = torch.ones(num, dtype=torch.bool, device=dev)
    return keep_top(scores, cand, budget, forced).nonzero().squeeze(1)


@torch.inference_mode()
def draft_attention_prior(draft, token_ids, query_len: int) -> torch.Tensor:
    """CacheClip's signal: a draft model (same tokenizer as the target) prefills the whole prompt with full
    attention, and each position's importance is the attention mass the last `query_len` tokens (the query)
    give it, summed over the draft's layers, heads and query tokens. Returns fp32 [len(token_ids)] on the
    draft's device (each query token contributes layers x heads in total)."""
    from kvblend.model.layers import forward_tokens
    from kvblend.model.kv import allocate_state

    n = len(token_ids)
    if not 0 < query_len <= n:
        raise ValueError(f"query_len must be in [1, {n}], got {query_len}")
    if token_ids and max(token_ids) >= draft.shape.vocab_size:
        raise ValueError(f"the draft model {draft.name} has {draft.shape.vocab_size} token ids, the prompt uses "
                         f"id {max(token_ids)}: draft and target must share a tokenizer")
    state = allocate_state(draft, n)
    queries: list[torch.Tensor] = []
    forward_tokens(draft, state, token_ids, num_logits=0, queries_out=queries)
    dev = state.k.device
    q_pos = torch.arange(n - query_len, n, device=dev)
    see = torch.arange(n, device=dev)[None, :] <= q_pos[:, None]
    total = torch.zeros(n, dtype=torch.float32, device=dev)
    for layer, q in enumerate(queries):
        total += query_attention_mass(q[:, n - query_len:].to(torch.float32),
                                      state.k[layer, :, :n].to(torch.float32), see, draft.attn_scale)
    return total
