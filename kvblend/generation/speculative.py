"""Speculative decoding over a prefilled KV state: draft k tokens, verify them in one target pass, keep the
accepted prefix, roll the target cache back with state.truncate().

Lossless: greedy verification emits exactly the tokens plain greedy `generate()` emits (same stopping rules);
sampled verification (Leviathan et al.; Chen et al.) emits tokens distributed as the target's sampling.
Between steps an `on_step` callback may promote placeholder chunks into the target's state.
On CUDA the target's verification passes replay CUDA graphs (model/decode_graph.py), one per pass length,
and the draft length adapts to the running acceptance (DraftLength).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kvblend.model.kv import KVState
from kvblend.model.runner import runner_of
from kvblend.generation.drafters import Drafter
from kvblend.generation.generate import NewlineDetector, Stopper
from kvblend.generation.sampling import SamplingParams, logits_to_probs, sample
from kvblend.model.hf import DecoderModel
from kvblend.types import GenOutput, PrefillResult, PromptIds

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepRecord:
    """One verification pass of the target."""

    drafted_ids: list[int]
    num_accepted: int  # drafts the target kept
    emitted_ids: list[int]  # tokens this step added to the output (accepted drafts + correction/bonus, cut at stop)
    step_ms: float  # drafting + verification
    source_chunk: int | None = None  # chunk the n-gram drafts were copied from


@dataclass(frozen=True, slots=True)
class SpecStats:
    num_steps: int
    num_drafted: int
    num_accepted: int
    mean_accepted: float  # accepted drafts per step
    acceptance_rate: float  # accepted drafts / drafted tokens
    mean_emitted: float  # output tokens per target pass


def spec_stats(steps: Sequence[StepRecord]) -> SpecStats:
    drafted = sum(len(s.drafted_ids) for s in steps)
    accepted = sum(s.num_accepted for s in steps)
    emitted = sum(len(s.emitted_ids) for s in steps)
    n = len(steps)
    return SpecStats(num_steps=n, num_drafted=drafted, num_accepted=accepted,
                     mean_accepted=accepted / n if n else 0.0,
                     acceptance_rate=accepted / drafted if drafted else 0.0,
                     mean_emitted=emitted / n if n else 0.0)


class DraftLength:
    """Adaptive draft length: starts at k_max; +2 after a pass that accepted every draft, -1 (not below
    k_min) after one that rejected some (transformers' heuristic schedule). adaptive=False keeps k_max."""

    def __init__(self, k_max: int, k_min: int = 1, adaptive: bool = True):
        self.k_max, self.k_min, self.adaptive = k_max, min(k_min, k_max), adaptive
        self.k = k_max

    def update(self, num_drafted: int, num_accepted: int) -> None:
        if not self.adaptive or num_drafted == 0:
            return
        if num_accepted == num_drafted:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(self.k_min, self.k - 1)


def verify_greedy(target_logits: torch.Tensor, drafts: Sequence[int]) -> tuple[list[int], int]:
    """target_logits [k+1, V] at [last token, d1..dk] -> (drafts kept while equal to the target argmax, then the
    target argmax after them: a correction, or a bonus when all pass; num_accepted)."""
    assert target_logits.shape[0] == len(drafts) + 1, (tuple(target_logits.shape), len(drafts))
    return accept_greedy(target_logits.argmax(-1).tolist(), drafts)


def accept_greedy(best: Sequence[int], drafts: Sequence[int]) -> tuple[list[int], int]:
    """verify_greedy on the target's argmax ids best [k+1] (read from the device once)."""
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return list(drafts[:n]) + [best[n]], n


def verify_sampling(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int],
                    generator: torch.Generator | None = None) -> list[int]:
    """p [k+1, V] target probabilities, q [k, V] draft probabilities the drafts were sampled from -> tokens.

    Draft x_i is kept with probability min(1, p_i(x)/q_i(x)); the first rejected one is replaced by a sample
    from normalize(max(0, p_i - q_i)); if all k pass, a bonus token is sampled from p_k.
    """
    k = len(drafts)
    assert p.shape[0] == k + 1 and q.shape[0] >= k, (tuple(p.shape), tuple(q.shape), k)
    p, q = p.detach().to("cpu", torch.float32), q.detach().to("cpu", torch.float32)
    u = torch.rand(k, generator=generator).tolist()
    idx = torch.arange(k)
    x_ids = torch.tensor(list(drafts), dtype=torch.long)
    p_x, q_x = p[idx, x_ids].tolist(), q[idx, x_ids].tolist()
    out: list[int] = []
    for i, x in enumerate(drafts):
        if u[i] * q_x[i] <= p_x[i]:  # u < p/q without dividing by q
            out.append(int(x))
            continue
        residual = (p[i] - q[i]).clamp_min(0.0)
        # a rejection implies p_i(x) < q_i(x), so mass exists elsewhere; fall back to p_i against rounding
        dist = residual if float(residual.sum()) > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[k], 1, generator=generator)))
    return out


def _one_hot_q(drafts: Sequence[int], vocab_size: int) -> torch.Tensor:
    q = torch.zeros(len(drafts), vocab_size)
    q[torch.arange(len(drafts)), torch.tensor(list(drafts), dtype=torch.long)] = 1.0
    return q


def _draft_q(drafter: Drafter, drafts: list[int], vocab_size: int) -> torch.Tensor:
    """q [n, V]: the drafter's sampling distribution, or one-hot for deterministic drafts."""
    q = getattr(drafter, "last_q", None)
    if q is None:
        return _one_hot_q(drafts, vocab_size)
    q = q[: len(drafts)].to(torch.float32)
    assert q.shape[0] == len(drafts), (tuple(q.shape), len(drafts))
    if q.shape[1] < vocab_size:  # smaller draft vocabulary: its missing ids have probability 0
        q = torch.nn.functional.pad(q, (0, vocab_size - q.shape[1]))
    return q[:, :vocab_size]


@dataclass
class _Verifier:
    """One speculative decoding loop's state; step() drafts, verifies and emits once."""

    state: KVState
    runner: object  # ModelRunner.decoder(): launch(tokens) -> PendingStep
    drafter: Drafter
    params: SamplingParams
    stop: Stopper
    length: DraftLength
    context: list[int]
    vocab_size: int
    gen: torch.Generator
    on_step: Callable | None
    split: bool
    probe: list | None
    steps: list[StepRecord]
    token_ms: list[float]

    def _propose(self, room: int) -> list[int]:
        drafts = [int(t) for t in self.drafter.propose(self.context + self.stop.tokens, room)][:room] if room > 0 else []
        if any(not 0 <= t < self.vocab_size for t in drafts):
            raise ValueError(f"drafter proposed ids outside the target vocabulary of {self.vocab_size}: {drafts}")
        return drafts

    def step(self, token: int) -> tuple[int, bool]:
        """One pass: (the last emitted token, whether decoding stopped)."""
        t0, state, params, stop = time.perf_counter(), self.state, self.params, self.stop
        base = state.length  # cache: prompt + emitted tokens but the last (`token`)
        room = min(self.length.k, params.max_new_tokens - len(stop.tokens) - 1, state.capacity - base - 1)
        drafts = self._propose(room)
        source = getattr(self.drafter, "last_source_chunk", None) if drafts else None
        if self.on_step is not None:
            (self.on_step.before_pass if self.split else self.on_step)(len(self.steps), state)
            assert state.length == base, f"on_step changed the state length ({base} -> {state.length})"
        if self.probe is not None:
            self.probe.clear()
        pending = self.runner.launch([token] + drafts, queries_out=self.probe)  # [len(drafts)+1] positions
        if self.split:
            self.on_step.during_pass(len(self.steps), state)  # host work while the device verifies
        if params.temperature <= 0:
            out, num_accepted = accept_greedy(pending.argmax(), drafts)
        else:
            p = logits_to_probs(pending.logits(), params.temperature, params.top_p)
            out = verify_sampling(p, _draft_q(self.drafter, drafts, self.vocab_size), drafts, self.gen)
            num_accepted = len(out) - 1
        self.length.update(len(drafts), num_accepted)
        accept = getattr(self.drafter, "accept", None)
        if accept is not None and room > 0:  # the drafter was asked this step
            accept(num_accepted, out)
        emitted_before, used, done = len(stop.tokens), len(out), False
        for i, t in enumerate(out):  # out[i] sits after token, d1..di: cache length base + 1 + i
            if stop.push(t, base + 1 + i):
                done, used = True, i + 1
                break
        state.truncate(base + used)  # keep token and the drafts that precede the last used output
        step_ms = (time.perf_counter() - t0) * 1e3
        self.token_ms.extend([step_ms / len(out)] * used)
        self.steps.append(StepRecord(drafted_ids=drafts, num_accepted=num_accepted, source_chunk=source,
                                     emitted_ids=stop.tokens[emitted_before:], step_ms=step_ms))
        return out[-1], done


@torch.inference_mode()
def speculative_generate(target: DecoderModel, prefilled: PrefillResult, drafter: Drafter, params: SamplingParams,
                         t_start: float, *, prompt_ids: PromptIds | Sequence[int], k: int = 4,
                         newline: NewlineDetector | None = None, eos: set[int] | None = None,
                         on_step: Callable[[int, KVState], None] | None = None,
                         probe: list | None = None, adaptive_k: bool = True,
                         graphs: bool | None = None) -> tuple[GenOutput, list[StepRecord]]:
    """Decode like generate(), verifying up to k drafts per target pass.

    prompt_ids: the ids the state was prefilled with (the drafter sees prompt + emitted tokens as context).
    eos: stop ids (default target.eos_token_ids()). Greedy (temperature 0) output equals generate()'s token
    for token, stop reason included; sampled output has the target's distribution (not generate()'s stream).
    on_step(step_index, state): called after drafting and before each verification pass. The state then holds
    the prompt and every emitted token but the last; the callback may promote placeholder chunks
    (promote_chunk) so that this pass and later ones attend to them; it must leave state.length unchanged.
    Tokens already in the cache keep the KV they were computed with, exactly as in plain decoding that
    promotes at the same emitted-token count, so speculation stays lossless across promotions.
    GenOutput.token_ms: each step's time spread evenly over the tokens it produced.
    probe: if a list, after each verification pass it holds that pass's per-layer target queries [H, T, D]
    (row 0 is the newest emitted token), for relevance proxies that score chunks against the target's query.
    adaptive_k: the draft length adapts to the acceptance, between 1 and k (DraftLength); False: always k.
    graphs: replay CUDA-graph-captured target passes (None = on CUDA). If on_step also has `before_pass` and
    `during_pass` methods (Promoter does), the first runs before the pass and the second while the GPU runs it
    (its host work then overlaps the pass) instead of calling on_step.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    context = list(prompt_ids.flat() if isinstance(prompt_ids, PromptIds) else prompt_ids)
    state = prefilled.state
    if len(context) != state.length:
        raise ValueError(f"prompt_ids has {len(context)} tokens but the prefilled state holds {state.length}")
    vocab_size = target.shape.vocab_size
    gen = torch.Generator().manual_seed(params.seed)
    token = sample(prefilled.logits, params, gen)
    ttft_ms = (time.perf_counter() - t_start) * 1e3
    stop = Stopper(target, params, target.eos_token_ids() if eos is None else set(eos), state.capacity, newline)
    steps: list[StepRecord] = []
    token_ms: list[float] = []
    length = DraftLength(k, adaptive=adaptive_k)
    split = on_step is not None and hasattr(on_step, "before_pass") and hasattr(on_step, "during_pass")
    done = stop.push(token, state.length)
    loop = _Verifier(state, runner_of(target).decoder(state, graphs), drafter, params, stop, length, context,
                     vocab_size, gen, on_step, split, probe, steps, token_ms)
    while not done:
        token, done = loop.step(token)
    st = spec_stats(steps)
    log.debug("speculative: %d tokens in %d steps, %d/%d drafts accepted (%.2f), %.2f tokens per pass",
              len(stop.tokens), st.num_steps, st.num_accepted, st.num_drafted, st.acceptance_rate, st.mean_emitted)
    return stop.output(ttft_ms, token_ms, prefilled.stats), steps
