"""Continuous batching (model/slots.py, generation/batch.py): sequences that join a running batch at different
steps decode exactly what each decodes alone (greedy and sampled), stop by their own rules, and leave their
slots for the next ones."""

from __future__ import annotations

import time

import torch

from test_blend import random_prompt

from kvblend.fusion.blend import prefill
from kvblend.generation.batch import ContinuousBatch
from kvblend.generation.generate import generate
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.model.runner import runner_of
from kvblend.model.slots import DecodeSlots


def _prefilled(model, seed: int, max_new: int, mode: str = "full"):
    prompt = random_prompt(model.shape.vocab_size, seed=seed, chunk_lens=(20 + seed, 17), prefix_len=5,
                           query_len=6 + seed % 3)
    chunks = None if mode == "full" else [build_chunk_kv(model, c) for c in prompt.chunk_ids]
    return lambda: prefill(model, prompt, chunks, mode=mode, ratio=0.3, extra_capacity=max_new)


def test_batched_decoding_equals_each_request_alone(tiny_model):
    cases = [(1, 12, 0.0, "full"), (2, 7, 0.0, "blend"), (3, 15, 0.8, "reuse"), (4, 9, 0.0, "full"),
             (5, 11, 1.0, "blend")]
    want, made = {}, {}
    for seed, max_new, temp, mode in cases:
        params = SamplingParams(max_new_tokens=max_new, temperature=temp, seed=seed, stop_on_newline=False)
        make = _prefilled(tiny_model, seed, max_new, mode)
        want[seed] = generate(tiny_model, make(), params, time.perf_counter()).token_ids
        made[seed] = (make, params)
    slots = DecodeSlots(runner_of(tiny_model), num_slots=3, rows=128)
    batch = ContinuousBatch(tiny_model, slots)
    got: dict[int, list[int]] = {}
    pending = list(made)
    steps = 0
    while pending or batch.running:
        if pending and batch.has_room and steps % 2 == 0:  # join every other step, while a slot is free
            seed = pending.pop(0)
            make, params = made[seed]
            batch.add(make(), params, time.perf_counter(), on_done=lambda out, s=seed: got.__setitem__(s, out.token_ids))
        batch.step()
        steps += 1
        assert slots.busy == len(batch.running) <= 3
    assert got == want
    assert slots.busy == 0 and len(slots.free) == 3


def test_on_token_stops_one_sequence_and_frees_its_slot(tiny_model):
    slots = DecodeSlots(runner_of(tiny_model), num_slots=2, rows=128)
    batch = ContinuousBatch(tiny_model, slots)
    outs = {}
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_on_newline=False)
    seen = []
    batch.add(_prefilled(tiny_model, 1, 20)(), params, time.perf_counter(),
              on_done=lambda o: outs.__setitem__("a", o), on_token=lambda t: seen.append(t) or len(seen) >= 3)
    batch.add(_prefilled(tiny_model, 2, 20)(), params, time.perf_counter(), on_done=lambda o: outs.__setitem__("b", o))
    while batch.running:
        batch.step()
    assert outs["a"].stop_reason == "callback" and len(outs["a"].token_ids) == 3
    assert outs["b"].stop_reason in ("length", "eos") and len(slots.free) == 2
    alone = generate(tiny_model, _prefilled(tiny_model, 2, 20)(), params, time.perf_counter())
    assert outs["b"].token_ids == alone.token_ids


def test_a_request_larger_than_a_slot_is_refused(tiny_model):
    slots = DecodeSlots(runner_of(tiny_model), num_slots=1, rows=32)
    pre = _prefilled(tiny_model, 1, 40)()
    batch = ContinuousBatch(tiny_model, slots)
    assert not batch.fits(pre)
    try:
        slots.admit(pre.state)
    except ValueError as exc:
        assert "does not fit a decode slot of 32" in str(exc)
    else:
        raise AssertionError("admitted a request larger than its slot")
    assert len(slots.free) == 1
