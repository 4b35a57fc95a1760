"""Draft proposers for speculative decoding: prompt lookup (n-gram) and a small draft model.

Protocol (`Drafter`): `propose(context_ids, k)` returns up to k draft ids continuing `context_ids` (the
whole sequence so far: prompt + emitted tokens; it may return fewer than k, even none); `accept(num_accepted,
new_tokens)` says how many drafts the target kept and which tokens it emitted in that step; `reset()` forgets
per-request state. After `propose`, `last_source_chunk` is the chunk index a copied proposal came from (None
when absent) and `last_q` [n, V] the draft distribution each draft was sampled from (None: drafts are a
deterministic function of the context, i.e. q is one-hot).
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import numpy as np
import torch

from kvblend.model.layers import forward_tokens
from kvblend.model.runner import runner_of
from kvblend.generation.sampling import logits_to_probs
from kvblend.model.hf import DecoderModel
from kvblend.types import PromptIds

log = logging.getLogger(__name__)


class Drafter(Protocol):
    last_source_chunk: int | None
    last_q: torch.Tensor | None

    def propose(self, context_ids: list[int], k: int) -> list[int]: ...

    def accept(self, num_accepted: int, new_tokens: list[int]) -> None: ...

    def reset(self) -> None: ...


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (binary search over C-level slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    if list(a[:hi]) == list(b[:hi]):
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if list(a[:mid]) == list(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


class NgramDrafter:
    """Prompt-lookup drafting: the longest suffix n-gram of the context (max_ngram down to min_ngram) is looked
    up in the chunks (chunk order, first occurrence followed by a token of the same chunk), then in the context
    itself (latest earlier occurrence); the tokens that followed it are proposed. The chunk a proposal came
    from is a free promotion signal.

    Lookups are vectorised scans (numpy) of the chunks and of the context, a few microseconds per thousand
    tokens, with nothing built per request: a per-token Python index of a 3,000-token prompt cost ~15 ms on the
    first proposal, more than a whole GPU decode step."""

    def __init__(self, chunk_token_ids: Sequence[Sequence[int]], max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.chunks = [list(c) for c in chunk_token_ids]
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        # all chunks in one array, each followed by a -1 separator (never a token id, never a proposal)
        starts, parts, pos = [], [], 0
        for ids in self.chunks:
            starts.append(pos)
            parts.extend(ids)
            parts.append(-1)
            pos += len(ids) + 1
        self._cat = np.asarray(parts, dtype=np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        self.last_source_chunk: int | None = None
        self.last_q: torch.Tensor | None = None
        self.last_queries: list[torch.Tensor] = []  # per layer [H, D], set by each forward of new context
        self.reset()

    def reset(self) -> None:
        self._ctx: list[int] = []
        self._ctx_arr = np.zeros(0, dtype=np.int64)
        self.last_source_chunk = None

    def accept(self, num_accepted: int, new_tokens: list[int]) -> None:
        pass

    def _context(self, context_ids: list[int]) -> np.ndarray:
        old = len(self._ctx)
        if len(context_ids) >= old and context_ids[:old] == self._ctx:  # the usual case: appended tokens
            if len(context_ids) > old:
                self._ctx_arr = np.concatenate([self._ctx_arr, np.asarray(context_ids[old:], dtype=np.int64)])
        else:
            self._ctx_arr = np.asarray(context_ids, dtype=np.int64)
        self._ctx = list(context_ids)
        return self._ctx_arr

    @staticmethod
    def _followed_matches(arr: np.ndarray, gram: Sequence[int]) -> np.ndarray:
        """Starts s (ascending) where arr[s:s+n] == gram and a token follows (s + n < len(arr))."""
        n = len(gram)
        m = len(arr) - n
        if m <= 0:
            return np.zeros(0, dtype=np.int64)
        hit = arr[:m] == gram[0]
        for j in range(1, n):
            hit &= arr[j:j + m] == gram[j]
        return np.flatnonzero(hit)

    def propose(self, context_ids: list[int], k: int) -> list[int]:
        self.last_source_chunk = None
        if k <= 0 or not context_ids:
            return []
        ctx = self._context(list(context_ids))
        for n in range(min(self.max_ngram, len(context_ids)), self.min_ngram - 1, -1):
            gram = context_ids[-n:]
            hits = self._followed_matches(self._cat, gram)
            hits = hits[self._cat[hits + n] >= 0] if hits.size else hits  # followed inside the same chunk
            if hits.size:
                end = int(hits[0]) + n
                ci = int(np.searchsorted(self._starts, hits[0], side="right")) - 1
                self.last_source_chunk = ci
                stop = min(end + k, int(self._starts[ci]) + len(self.chunks[ci]))
                return self._cat[end:stop].tolist()
            hits = self._followed_matches(ctx, gram)
            if hits.size:
                end = int(hits[-1]) + n
                return list(context_ids[end:end + k])
        return []


class ModelDrafter:
    """A small draft model with its own KV state (full prefill of the prompt), proposing k tokens greedily
    (temperature 0) or sampled (then `last_q` holds the draft probabilities). It shares the target's token
    ids; `vocab_size` (the target's) pads a smaller draft vocabulary with zero probability and cuts a larger
    one, so drafts are always valid target ids; context ids the draft cannot embed are fed to it as `oov_id`
    (the target verifies every draft, so this costs acceptance, never correctness). Its cache holds the context
    plus all but the last draft; rejected drafts are rolled back with truncate (in `accept`, and again by prefix
    matching in `propose`, which also accepts any other context)."""

    def __init__(self, draft_model: DecoderModel, prompt: PromptIds | Sequence[int], *, vocab_size: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, extra_capacity: int = 256,
                 oov_id: int = 0):
        if not isinstance(prompt, PromptIds):
            prompt = PromptIds((), (), tuple(int(t) for t in prompt))
        self.model = draft_model
        self.vocab_size = vocab_size or draft_model.shape.vocab_size
        if self.vocab_size != draft_model.shape.vocab_size:
            log.info("%s: draft vocab %d vs target vocab %d; drafts restricted to the shared ids",
                     draft_model.name, draft_model.shape.vocab_size, self.vocab_size)
        self.temperature, self.top_p, self.oov_id = temperature, top_p, oov_id
        self.generator = torch.Generator().manual_seed(seed)
        self._prompt_ids = prompt.flat()
        self.state, self._prompt_logits = runner_of(draft_model).forward(self._embeddable(prompt).flat(),
                                                                         extra_capacity)
        self.last_source_chunk: int | None = None
        self.last_q: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the prompt (its KV is recomputed on the next propose if a different context overwrote it)."""
        ids = getattr(self, "ids", self._prompt_ids)
        keep = common_prefix_len(ids, self._prompt_ids)
        self.state.truncate(keep)
        self.ids = list(self._prompt_ids[:keep])  # token ids whose KV is in self.state
        # logits [V] after self.ids
        self._next_logits: torch.Tensor | None = self._prompt_logits if keep == len(self._prompt_ids) else None
        self._context_len = keep

    def _feed(self, ids: Sequence[int]) -> list[int]:
        v = self.model.shape.vocab_size
        return [t if t < v else self.oov_id for t in ids]

    def _embeddable(self, prompt: PromptIds) -> PromptIds:
        return PromptIds(tuple(self._feed(prompt.prefix_ids)), tuple(tuple(self._feed(c)) for c in prompt.chunk_ids),
                         tuple(self._feed(prompt.query_ids)))

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        v = self.vocab_size
        if logits.shape[-1] >= v:
            return logits[..., :v]
        return torch.nn.functional.pad(logits, (0, v - logits.shape[-1]), value=float("-inf"))

    def _sync(self, context_ids: list[int]) -> torch.Tensor | None:
        """Bring the cache to exactly context_ids; return the logits [V] after its last token."""
        common = common_prefix_len(self.ids, context_ids)
        if common == len(context_ids) == len(self.ids) and self._next_logits is not None:
            return self._next_logits
        if len(context_ids) > self.state.capacity:
            log.debug("%s: draft KV full (%d tokens > capacity %d); no drafts", self.model.name,
                      len(context_ids), self.state.capacity)
            return None
        keep = min(common, len(context_ids) - 1)
        self.state.truncate(keep)
        del self.ids[keep:]
        queries: list[torch.Tensor] = []
        logits = forward_tokens(self.model, self.state, self._feed(context_ids[keep:]), num_logits=1,
                                queries_out=queries)[-1]
        self.last_queries = [q[:, -1] for q in queries]  # per layer [H, D]: the newest context token's queries
        self.ids.extend(context_ids[keep:])
        return logits

    def _pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        logits = self._fit_vocab(logits)
        if self.temperature <= 0:
            return int(logits.argmax()), None
        q = logits_to_probs(logits, self.temperature, self.top_p)
        return int(torch.multinomial(q.cpu(), 1, generator=self.generator)), q

    def propose(self, context_ids: list[int], k: int) -> list[int]:
        self.last_q = None
        self._context_len = len(self.ids)  # accept() after an empty proposal rolls nothing back
        if k <= 0 or not context_ids:
            return []
        logits = self._sync(list(context_ids))
        if logits is None:
            return []
        self._context_len = len(context_ids)
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        while True:
            tok, q = self._pick(logits)
            drafts.append(tok)
            if q is not None:
                qs.append(q)
            if len(drafts) == k or self.state.length >= self.state.capacity:
                break
            logits = forward_tokens(self.model, self.state, [tok])[-1]
            self.ids.append(tok)
        self._next_logits = logits  # the logits after self.ids (they produced the last draft)
        if qs:
            self.last_q = torch.stack(qs)
        return drafts

    def accept(self, num_accepted: int, new_tokens: list[int]) -> None:
        keep = self._context_len + num_accepted
        if keep < len(self.ids):  # roll back the rejected drafts' KV
            self.state.truncate(keep)
            del self.ids[keep:]
            self._next_logits = None
