"""Decoding fast paths: step runner, adaptive draft length, split promotion hook, `kvblend bench decode`."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from kvblend.bench import decode as bench_decode
from kvblend.bench.harness import HEADER_KEYS
from kvblend.fusion.blend import prefill
from kvblend.generation.drafters import NgramDrafter
from kvblend.generation.generate import generate
from kvblend.generation.sampling import SamplingParams, make_generator, sample
from kvblend.generation.speculative import DraftLength, accept_greedy, speculative_generate
from kvblend.model.layers import forward_tokens
from kvblend.model.runner import ModelRunner, runner_of
from kvblend.types import PromptIds


def _prompt(vocab: int, seed: int, chunk_len: int = 30) -> PromptIds:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(0, vocab, (n,), generator=g).tolist())  # noqa: E731
    return PromptIds(ids(5), (ids(chunk_len), ids(chunk_len), ids(chunk_len)), ids(8))


def test_draft_length_schedule():
    d = DraftLength(6)
    assert d.k == 6
    d.update(6, 2)
    assert d.k == 5
    for _ in range(10):
        d.update(d.k, 0)
    assert d.k == 1  # never below k_min
    d.update(1, 1)
    assert d.k == 3  # +2 after a fully accepted pass
    d.update(0, 0)
    assert d.k == 3  # no drafts: no evidence
    fixed = DraftLength(4, adaptive=False)
    fixed.update(4, 0)
    assert fixed.k == 4


def test_accept_greedy():
    assert accept_greedy([5, 6, 7], [5, 9]) == ([5, 6], 1)
    assert accept_greedy([5, 6, 7], [5, 6]) == ([5, 6, 7], 2)
    assert accept_greedy([4], []) == ([4], 0)


def test_step_runner_cpu_equals_forward_tokens(tiny_llama):
    prompt = _prompt(tiny_llama.shape.vocab_size, seed=1)
    a = prefill(tiny_llama, prompt, mode="full", extra_capacity=8)
    b = prefill(tiny_llama, prompt, mode="full", extra_capacity=8)
    runner = runner_of(tiny_llama).decoder(b.state)
    assert not runner.graphs
    got = runner.logits([3, 4, 5])
    ref = forward_tokens(tiny_llama, a.state, [3, 4, 5])
    assert torch.equal(got, ref) and a.state.length == b.state.length
    assert runner.argmax([7]) == forward_tokens(tiny_llama, a.state, [7]).argmax(-1).tolist()
    with pytest.raises(ValueError, match="CUDA"):
        runner_of(tiny_llama).decoder(a.state, graphs=True)


@pytest.mark.parametrize("holes", [False, True])
def test_padded_step_equals_forward_tokens(tiny_model, holes):
    """The computation the CUDA graphs capture (attention over the whole capacity, device-side causal and
    validity mask, start position from a device tensor), run eagerly on CPU, equals the plain layer loop."""
    prompt = _prompt(tiny_model.shape.vocab_size, seed=5)
    a = prefill(tiny_model, prompt, mode="full", extra_capacity=12)
    b = prefill(tiny_model, prompt, mode="full", extra_capacity=12)
    if holes:  # a placeholder: rows of the second chunk masked out in both
        lo = len(prompt.prefix_ids) + len(prompt.chunk_ids[0])
        for st in (a.state, b.state):
            st.set_valid(lo, lo + len(prompt.chunk_ids[1]), False)
    runner = runner_of(tiny_model).decoder(b.state, graphs=False, padded=True)
    assert b.state.buffer is not None  # the private state was moved into a static buffer once
    for ids in ([3], [4, 5, 6, 7], [8]):
        qa, qb = [], []
        ref = forward_tokens(tiny_model, a.state, ids, queries_out=qa)
        got = runner.logits(ids, queries_out=qb)
        assert (got - ref).abs().max().item() < 1e-5 and a.state.length == b.state.length
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(qa, qb))
    a.state.truncate(a.state.length - 2)  # rolled-back rows are rewritten, never attended
    b.state.truncate(b.state.length - 2)
    assert runner.argmax([9, 10]) == forward_tokens(tiny_model, a.state, [9, 10]).argmax(-1).tolist()


def test_host_sampling_stream_unchanged():
    logits = torch.randn(50)
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=4)
    a = [sample(logits, params, torch.Generator().manual_seed(4)) for _ in range(3)]
    b = [sample(logits, params, make_generator(4, "cpu")) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_and_fixed_draft_length_equal_generate(tiny_model, adaptive):
    prompt = _prompt(tiny_model.shape.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=24, stop_on_newline=False)
    ref = generate(tiny_model, prefill(tiny_model, prompt, mode="full", extra_capacity=30), params, 0.0)
    pre = prefill(tiny_model, prompt, mode="full", extra_capacity=40)
    out, steps = speculative_generate(tiny_model, pre, NgramDrafter(prompt.chunk_ids), params, 0.0,
                                      prompt_ids=prompt, k=6, adaptive_k=adaptive)
    assert out.token_ids == ref.token_ids and out.stop_reason == ref.stop_reason
    if not adaptive:
        assert all(len(s.drafted_ids) <= 6 for s in steps)


def test_split_hook_runs_before_and_during_each_pass(tiny_llama):
    prompt = _prompt(tiny_llama.shape.vocab_size, seed=3)
    calls: list[tuple[str, int, int]] = []

    class Hook:
        def before_pass(self, step, state):
            calls.append(("before", step, state.length))

        def during_pass(self, step, state):
            calls.append(("during", step, state.length))

        def __call__(self, step, state):  # pragma: no cover - must not be used when split
            raise AssertionError("split hooks are called as before_pass/during_pass")

    params = SamplingParams(max_new_tokens=6, stop_on_newline=False)
    pre = prefill(tiny_llama, prompt, mode="full", extra_capacity=12)
    base = pre.state.length
    out, steps = speculative_generate(tiny_llama, pre, NgramDrafter([]), params, 0.0, prompt_ids=prompt, k=0,
                                      on_step=Hook())
    assert [c[0] for c in calls] == ["before", "during"] * len(steps)
    assert [c[2] for c in calls[::2]] == [base + i for i in range(len(steps))]  # before: the pass not yet run
    assert [c[2] for c in calls[1::2]] == [base + i + 1 for i in range(len(steps))]  # during: pass queued


def _args(tmp_path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_decode.add_arguments(p)
    argv = ["--device", "cpu", "--quick", "--samples", "1", "--repeats", "1", "--promotion-steps", "4",
            "--no-fp32-check", "--out", str(tmp_path / "decode.json"), "--summary", str(tmp_path / "summary.json")]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return p.parse_args(argv)


def test_quick_bench_writes_json_and_summary(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"P1_other": {"measured": 1.0}}))
    assert bench_decode.run(_args(tmp_path)) == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    assert HEADER_KEYS <= set(result) and result["device"] == result["device_name"]  # the harness's header
    configs = result["configs"]
    assert set(configs) == {"target_plain", "spec_ngram", "spec_ngram_fixed", "hf_generate"}
    for name in ("spec_ngram", "spec_ngram_fixed"):
        assert configs[name]["identical_to_target"] is True  # lossless greedy speculation
        assert 0.0 <= configs[name]["acceptance_rate"] <= 1.0
    for c in configs.values():
        assert c["tpot_ms"] > 0 and math.isfinite(c["tokens_per_s"])
    pr = result["promotion"]
    assert pr["promotions"] >= 2 and pr["ratio"] > 0  # every step fused a chunk copied the step before
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "P1_other" in summary  # other benchmarks' keys kept
    for key in ("P7_tpot_ms", "P7b_vs_hf_generate", "P4_spec_speedup", "P5_promotion_overhead"):
        e = summary[key]
        assert e["source"] == str(tmp_path / "decode.json") and e["better"] in ("higher", "lower")
        assert math.isfinite(e["measured"]) and e["met"] == (e["measured"] <= e["target"] if e["better"] == "lower"
                                                            else e["measured"] >= e["target"])
    assert summary["P4_spec_speedup"]["identical_output"] is True
    # the same entries again from the JSON alone (how the GPU run's copy is summarised), plus the plot
    again = tmp_path / "again.json"
    assert bench_decode.run(_args(tmp_path, from_json=tmp_path / "decode.json", summary=again,
                                  plot=tmp_path / "p.png")) == 0
    assert json.loads(again.read_text())["P7_tpot_ms"] == summary["P7_tpot_ms"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "spec_ngram" in capsys.readouterr().out


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    assert bench_decode.run(_args(tmp_path, from_json=tmp_path / "missing.json")) == 1
    assert bench_decode.run(_args(tmp_path, k=0)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("kvblend bench decode:") for line in err)


def test_static_buffer_path_equals_plain(tiny_model, monkeypatch):
    """The CUDA path's bookkeeping, run eagerly on CPU (padded): a request's state is copied into the model's
    static buffer of its bucket and re-pointed at views of it; greedy generate, speculation and a promotion
    mid-answer give the plain loop's tokens; a later request reuses the buffer, a concurrent one gets its own."""

    from kvblend.fusion.blend import promote_chunk
    from kvblend.kvstore.builder import build_chunk_kv

    prompt = _prompt(tiny_model.shape.vocab_size, seed=8)
    params = SamplingParams(max_new_tokens=20, stop_on_newline=False)
    chunks = [build_chunk_kv(tiny_model, c) for c in prompt.chunk_ids]
    start = len(prompt.prefix_ids) + len(prompt.chunk_ids[0])
    resident = [True, False, True]

    def run_all():
        plain = generate(tiny_model, prefill(tiny_model, prompt, mode="full", extra_capacity=24), params, 0.0)

        def on_step(step, state):
            if step == 2:
                promote_chunk(tiny_model, state, chunks[1], start)

        pre = prefill(tiny_model, prompt, [c if r else None for c, r in zip(chunks, resident)], mode="reuse",
                      resident=resident, extra_capacity=32)
        spec, _ = speculative_generate(tiny_model, pre, NgramDrafter(prompt.chunk_ids), params, 0.0,
                                       prompt_ids=prompt, k=4, on_step=on_step)
        return plain.token_ids, spec.token_ids

    ref = run_all()
    static = ModelRunner(tiny_model, static_eager=True)  # every request in a static buffer, as on CUDA
    monkeypatch.setattr(tiny_model, "_runner", static)
    assert run_all() == ref
    made = static.arena.allocated
    assert run_all() == ref  # the same buffers again, leased by new requests
    assert static.arena.allocated == made
    a = prefill(tiny_model, prompt, mode="full", extra_capacity=4)
    b = prefill(tiny_model, prompt, mode="full", extra_capacity=4)
    assert a.state.buffer is not None and a.state.buffer is not b.state.buffer  # one lease per live request
    r1, r2 = static.decoder(a.state), static.decoder(b.state)
    assert r1.padded and a.state.capacity == prompt.num_tokens + 4
    assert r1.argmax([5]) == r2.argmax([5])
    buf = a.state.buffer
    del a, r1
    import gc

    gc.collect()
    assert not buf.in_use  # a collected state gives its buffer back
