"""Speculative decoding: lossless against plain decoding (greedy, fp32), sampling rule by statistics, drafters,
and promotion of placeholder chunks between verification passes."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import TINY, make_tiny
from kvblend.fusion.blend import prefill, promote_chunk
from kvblend.model.layers import forward_tokens
from kvblend.generation.drafters import ModelDrafter, NgramDrafter, common_prefix_len
from kvblend.generation.generate import NewlineDetector, generate
from kvblend.generation.sampling import SamplingParams
from kvblend.generation.speculative import spec_stats, speculative_generate, verify_greedy, verify_sampling
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.model.hf import random_model
from kvblend.types import PromptIds

GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_prompt(vocab: int, seed: int = 1, chunk_lens=(17, 23, 11), prefix_len=5, query_len=7) -> PromptIds:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    return PromptIds(ids(prefix_len), tuple(ids(n) for n in chunk_lens), ids(query_len))


def plain(model, prompt, params=GREEDY, extra=None, **kw):
    pre = prefill(model, prompt, extra_capacity=params.max_new_tokens + 1 if extra is None else extra, **kw)
    out = generate(model, pre, params, time.perf_counter())
    return out, pre.state.length


def spec(model, prompt, drafter, k, params=GREEDY, extra=None, **kw):
    on_step = kw.pop("on_step", None)
    newline = kw.pop("newline", None)
    pre = prefill(model, prompt, extra_capacity=params.max_new_tokens + 1 if extra is None else extra, **kw)
    out, steps = speculative_generate(model, pre, drafter, params, time.perf_counter(), prompt_ids=prompt, k=k,
                                      on_step=on_step, newline=newline)
    return out, steps, pre.state.length


def draft_model(seed: int = 1, layers: int = 2, model_type: str = "llama", **overrides):
    kw = dict(TINY, num_hidden_layers=layers, **overrides)
    return random_model(kw, model_type=model_type, seed=seed, name=f"draft-{model_type}-{seed}")


@pytest.fixture(scope="module")
def tiny_draft():
    return draft_model()


class WrongDrafter:
    """Knows the reference output and always proposes a different token."""

    def __init__(self, prompt_len: int, ref: list[int], vocab: int):
        self.prompt_len, self.ref, self.vocab = prompt_len, ref, vocab

    def propose(self, context_ids, k):
        pos = len(context_ids) - self.prompt_len  # index of the next output token
        return [(self.ref[pos + i] + 1) % self.vocab if pos + i < len(self.ref) else 0 for i in range(k)]


def check_same(ref_out, ref_len, out, steps, length):
    assert out.token_ids == ref_out.token_ids
    assert out.stop_reason == ref_out.stop_reason
    assert length == ref_len  # same tokens in the cache at the end
    assert [t for s in steps for t in s.emitted_ids] == out.token_ids[1:]
    assert all(s.num_accepted <= len(s.drafted_ids) for s in steps)


# ---------------------------------------------------------------- verification rules (pure functions)

def test_verify_greedy_rules():
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 5, 1, 3]):
        logits[row, best] = 1.0
    assert verify_greedy(logits, [2, 5, 1]) == ([2, 5, 1, 3], 3)  # all pass + bonus
    assert verify_greedy(logits, [2, 4, 1]) == ([2, 5], 1)  # correction at the first mismatch
    assert verify_greedy(logits, [0, 5, 1]) == ([2], 0)
    assert verify_greedy(logits[:1], []) == ([2], 0)  # no drafts: a plain step


def _hist(samples, v):
    return torch.bincount(torch.tensor(samples), minlength=v).float() / len(samples)


def test_verify_sampling_first_token_and_bonus_follow_p():
    p = torch.tensor([[0.05, 0.40, 0.25, 0.10, 0.20],
                      [0.30, 0.05, 0.05, 0.50, 0.10],
                      [0.10, 0.10, 0.60, 0.10, 0.10]])
    q = torch.tensor([[0.30, 0.10, 0.30, 0.25, 0.05],
                      [0.20, 0.20, 0.20, 0.20, 0.20]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.multinomial(q, n, replacement=True, generator=g).T.tolist()  # drafts sampled from q
    first, second, bonus, accepted = [], [], [], 0
    for d in draws:
        out = verify_sampling(p, q, d, g)
        first.append(out[0])
        if len(out) >= 2:
            second.append(out[1])  # emitted only after draft 1 was accepted; must follow p[1]
        if len(out) == 3:
            bonus.append(out[2])
        accepted += len(out) - 1
    assert (_hist(first, 5) - p[0]).abs().max() < 0.02
    assert (_hist(second, 5) - p[1]).abs().max() < 0.02
    assert 0 < accepted < 2 * n
    # bonus path alone: drafts always accepted when q == p, bonus sampled from p[k]
    bonus = [verify_sampling(p, p[:2], d, g)[2] for d in torch.multinomial(p[:2], n, True, generator=g).T.tolist()]
    assert (_hist(bonus, 5) - p[2]).abs().max() < 0.02


def test_verify_sampling_with_deterministic_draft_follows_p():
    """An n-gram (one-hot q) proposal is accepted with probability p(x) and otherwise resampled without x."""
    p = torch.tensor([[0.15, 0.35, 0.05, 0.25, 0.20], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.zeros(1, 5)
    q[0, 1] = 1.0
    g = torch.Generator().manual_seed(1)
    first = [verify_sampling(p, q, [1], g)[0] for _ in range(20000)]
    assert (_hist(first, 5) - p[0]).abs().max() < 0.02


# ---------------------------------------------------------------- drafters

def test_ngram_drafter_longest_match_source_and_context():
    d = NgramDrafter([[1, 2, 3, 4, 5], [9, 2, 3, 7, 8, 6]], max_ngram=3)
    assert d.propose([0, 9, 2, 3], 2) == [7, 8] and d.last_source_chunk == 1  # 3-gram beats chunk 0's 2-gram
    assert d.propose([0, 2, 3], 5) == [4, 5] and d.last_source_chunk == 0  # first chunk, may return < k
    assert d.propose([40, 41, 42, 43, 40, 41], 3) == [42, 43, 40] and d.last_source_chunk is None  # context
    assert d.propose([40, 99], 3) == [] and d.last_source_chunk is None
    assert d.propose([1], 0) == []
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 5]) == 2 and common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_model_drafter_rolls_back_and_matches_its_own_greedy(tiny_draft):
    prompt = make_prompt(256, seed=21)
    drafter = ModelDrafter(tiny_draft, prompt, extra_capacity=32)
    ref, _ = plain(tiny_draft, prompt, SamplingParams(max_new_tokens=12), mode="full")
    ctx = prompt.flat()
    first = drafter.propose(ctx, 4)
    assert first == ref.token_ids[:4]
    drafter.accept(1, [first[0], 77])  # kept one draft, target emitted 77 instead of the second
    assert drafter.state.length == len(ctx) + 1
    again = drafter.propose(ctx + [first[0], 77], 3)
    check = prefill(tiny_draft, PromptIds((), (), tuple(ctx + [first[0], 77])), mode="full", extra_capacity=4)
    assert again[0] == int(check.logits.argmax())


def test_model_drafter_reset_and_full_draft_cache(tiny_llama, tiny_draft):
    prompt = make_prompt(256, seed=22)
    drafter = ModelDrafter(tiny_draft, prompt, extra_capacity=3)
    first = drafter.propose(prompt.flat(), 4)
    assert len(first) == 4 and drafter.state.length == prompt.num_tokens + 3
    assert drafter.propose(prompt.flat() + [1, 2, 3, 4], 4) == []  # context no longer fits: no drafts
    drafter.propose([5, 6, 7], 2)  # an unrelated context overwrites the prompt's KV
    drafter.reset()
    assert drafter.propose(prompt.flat(), 4) == first
    # a drafter that runs out of room mid-answer leaves the output exact
    ref, ref_len = plain(tiny_llama, prompt, mode="full")
    out, steps, length = spec(tiny_llama, prompt, ModelDrafter(tiny_llama, prompt, extra_capacity=6), 3, mode="full")
    check_same(ref, ref_len, out, steps, length)
    assert any(s.drafted_ids for s in steps) and not steps[-1].drafted_ids


# ---------------------------------------------------------------- greedy equivalence with generate()

@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_ngram_equals_generate(tiny_model, k):
    prompt = make_prompt(tiny_model.shape.vocab_size, seed=2)
    ref, ref_len = plain(tiny_model, prompt, mode="full")
    out, steps, length = spec(tiny_model, prompt, NgramDrafter(prompt.chunk_ids), k, mode="full")
    check_same(ref, ref_len, out, steps, length)
    assert any(s.drafted_ids for s in steps)
    assert len(steps) < len(out.token_ids) or spec_stats(steps).num_accepted == 0


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_model_drafter_equals_generate(tiny_model, tiny_draft, k):
    prompt = make_prompt(tiny_model.shape.vocab_size, seed=3)
    chunks = [build_chunk_kv(tiny_model, c) for c in prompt.chunk_ids]
    ref, ref_len = plain(tiny_model, prompt, chunks=chunks, mode="blend", ratio=0.3)
    drafter = ModelDrafter(tiny_draft, prompt, vocab_size=tiny_model.shape.vocab_size, extra_capacity=40)
    out, steps, length = spec(tiny_model, prompt, drafter, k, chunks=chunks, mode="blend", ratio=0.3)
    check_same(ref, ref_len, out, steps, length)
    assert all(len(s.drafted_ids) <= k for s in steps)


def test_greedy_with_smaller_draft_vocab(tiny_llama):
    prompt = make_prompt(200, seed=4)
    ref, ref_len = plain(tiny_llama, prompt, mode="full")
    small = draft_model(seed=5, vocab_size=200)
    drafter = ModelDrafter(small, prompt, vocab_size=tiny_llama.shape.vocab_size, extra_capacity=40)
    out, steps, length = spec(tiny_llama, prompt, drafter, 3, mode="full")
    check_same(ref, ref_len, out, steps, length)


@pytest.mark.parametrize("k", [1, 4])
def test_copy_of_target_as_drafter_is_always_accepted(tiny_model, k):
    prompt = make_prompt(tiny_model.shape.vocab_size, seed=5)
    ref, ref_len = plain(tiny_model, prompt, mode="full")
    drafter = ModelDrafter(tiny_model, prompt, extra_capacity=40)
    out, steps, length = spec(tiny_model, prompt, drafter, k, mode="full")
    check_same(ref, ref_len, out, steps, length)
    st = spec_stats(steps)
    assert st.num_drafted > 0 and st.acceptance_rate == 1.0
    assert len(steps) == -(-(len(out.token_ids) - 1) // (k + 1))  # k + 1 tokens per pass


def test_always_wrong_drafts_are_still_exact(tiny_model):
    prompt = make_prompt(tiny_model.shape.vocab_size, seed=6)
    ref, ref_len = plain(tiny_model, prompt, mode="full")
    drafter = WrongDrafter(prompt.num_tokens, ref.token_ids, tiny_model.shape.vocab_size)
    out, steps, length = spec(tiny_model, prompt, drafter, 3, mode="full")
    check_same(ref, ref_len, out, steps, length)
    assert spec_stats(steps).num_accepted == 0 and len(steps) == len(out.token_ids) - 1


def test_stops_like_generate_at_capacity_and_short_max(tiny_llama):
    prompt = make_prompt(256, seed=7)
    for params, extra in ((GREEDY, 6), (SamplingParams(max_new_tokens=1), 8), (SamplingParams(max_new_tokens=5), 8)):
        ref, ref_len = plain(tiny_llama, prompt, params, extra=extra, mode="full")
        drafter = ModelDrafter(tiny_llama, prompt, extra_capacity=40)
        out, steps, length = spec(tiny_llama, prompt, drafter, 4, params, extra=extra, mode="full")
        check_same(ref, ref_len, out, steps, length)
        assert out.stop_reason == "length"


class FakeTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i % 5 == 2 else " " if i % 5 == 1 else "a" for i in ids)


def test_stops_like_generate_on_eos_and_newline():
    model = make_tiny("llama")
    prompt = make_prompt(256, seed=8)
    ref, _ = plain(model, prompt, mode="full")
    model.hf_model.config.eos_token_id = ref.token_ids[9]
    model.hf_model.generation_config.eos_token_id = ref.token_ids[9]
    ref_eos, ref_len = plain(model, prompt, mode="full")
    assert ref_eos.stop_reason == "eos"
    out, steps, length = spec(model, prompt, ModelDrafter(model, prompt, extra_capacity=40), 4, mode="full")
    check_same(ref_eos, ref_len, out, steps, length)

    model.hf_model.config.eos_token_id = model.hf_model.generation_config.eos_token_id = None
    model.tokenizer = FakeTokenizer()
    newline = NewlineDetector(model.tokenizer)
    pre = prefill(model, prompt, mode="full", extra_capacity=30)
    ref_nl = generate(model, pre, GREEDY, time.perf_counter(), newline=newline)
    for drafter in (ModelDrafter(model, prompt, extra_capacity=40), NgramDrafter(prompt.chunk_ids)):
        out, steps, length = spec(model, prompt, drafter, 3, extra=30, mode="full", newline=newline)
        check_same(ref_nl, pre.state.length, out, steps, length)
    assert ref_nl.stop_reason == "newline" and 2 < len(ref_nl.token_ids) < GREEDY.max_new_tokens


# ---------------------------------------------------------------- n-gram matches from a chunk

def copy_prompt(model, prefix_len=4, lens=(15, 30, 12), query_len=6, seed=9):
    """Chunk 1 is a placeholder (never attended), so the target's answer does not depend on its contents; fill
    it with the query's last two tokens followed by that answer: the n-gram drafter then copies from chunk 1."""
    base = make_prompt(model.shape.vocab_size, seed=seed, chunk_lens=lens, prefix_len=prefix_len,
                       query_len=query_len)
    chunks = [build_chunk_kv(model, c) for c in base.chunk_ids]
    resident = [True, False, True]
    ref = generate(model, prefill(model, base, [chunks[0], None, chunks[2]], mode="reuse", resident=resident,
                                  extra_capacity=25), GREEDY, time.perf_counter())
    body = (tuple(base.query_ids[-2:]) + tuple(ref.token_ids))[: lens[1]]
    filled = body + base.chunk_ids[1][len(body):]
    prompt = PromptIds(base.prefix_ids, (base.chunk_ids[0], filled, base.chunk_ids[2]), base.query_ids)
    return prompt, [chunks[0], build_chunk_kv(model, filled), chunks[2]], ref


def test_ngram_copies_from_a_chunk_and_records_it(tiny_model):
    prompt, chunks, ref = copy_prompt(tiny_model)
    staged = [chunks[0], None, chunks[2]]
    out, steps, _ = spec(tiny_model, prompt, NgramDrafter(prompt.chunk_ids), 4, chunks=staged, mode="reuse",
                         resident=[True, False, True], extra=25)
    assert out.token_ids == ref.token_ids
    st = spec_stats(steps)
    assert st.num_accepted > 0 and st.acceptance_rate > 0.5 and st.mean_emitted > 2
    assert steps[0].source_chunk == 1 and steps[0].num_accepted > 0


# ---------------------------------------------------------------- promotion between verification passes

def plain_with_promotion(model, prompt, chunks, promote_at_len, start, params=GREEDY):
    """Reference: plain greedy decoding that promotes chunk 1 once the cache holds promote_at_len tokens."""
    pre = prefill(model, prompt, [chunks[0], None, chunks[2]], mode="reuse", resident=[True, False, True],
                  extra_capacity=params.max_new_tokens + 1)
    state, token, tokens = pre.state, int(pre.logits.argmax()), []
    while True:
        tokens.append(token)
        if len(tokens) >= params.max_new_tokens:
            return tokens, state.length
        if state.length == promote_at_len:
            promote_chunk(model, state, chunks[1], start)
        token = int(forward_tokens(model, state, [token])[-1].argmax())


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_promotion_mid_answer_stays_lossless(tiny_model, tiny_draft, kind):
    prompt = make_prompt(tiny_model.shape.vocab_size, seed=10, chunk_lens=(15, 20, 12))
    chunks = [build_chunk_kv(tiny_model, c) for c in prompt.chunk_ids]
    start = len(prompt.prefix_ids) + len(prompt.chunk_ids[0])
    promoted_at: list[int] = []

    def on_step(step, state):
        if step == 2:
            promote_chunk(tiny_model, state, chunks[1], start)
            promoted_at.append(state.length)

    if kind == "ngram":
        drafter = NgramDrafter(prompt.chunk_ids)
    else:  # drafts from the full prompt, so they diverge from the placeholder target: partial acceptance
        drafter = ModelDrafter(tiny_model, prompt, extra_capacity=40)
    out, steps, length = spec(tiny_model, prompt, drafter, 3, chunks=[chunks[0], None, chunks[2]], mode="reuse",
                              resident=[True, False, True], on_step=on_step)
    assert len(promoted_at) == 1 and promoted_at[0] > prompt.num_tokens  # promoted mid-answer
    ref_tokens, ref_len = plain_with_promotion(tiny_model, prompt, chunks, promoted_at[0], start)
    assert out.token_ids == ref_tokens and length == ref_len
    # the promotion mattered: without it the answer differs
    unpromoted, _ = plain(tiny_model, prompt, chunks=[chunks[0], None, chunks[2]], mode="reuse",
                          resident=[True, False, True])
    assert unpromoted.token_ids != out.token_ids


# ---------------------------------------------------------------- sampling end to end

def test_sampled_speculation_is_reproducible_and_valid(tiny_llama, tiny_draft):
    prompt = make_prompt(256, seed=11)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    outs = []
    for _ in range(2):
        drafter = ModelDrafter(tiny_draft, prompt, temperature=0.8, top_p=0.9, seed=4, extra_capacity=40)
        out, steps, _ = spec(tiny_llama, prompt, drafter, 3, params, mode="full")
        outs.append(out.token_ids)
        assert len(out.token_ids) == 16 and all(0 <= t < 256 for t in out.token_ids)
        assert drafter.last_q is not None or not any(s.drafted_ids for s in steps)
    assert outs[0] == outs[1]
    out, steps, _ = spec(tiny_llama, prompt, NgramDrafter(prompt.chunk_ids), 3, params, mode="full")
    assert len(out.token_ids) == 16
