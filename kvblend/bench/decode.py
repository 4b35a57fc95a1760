"""`kvblend bench decode`: decode speed after the first token.

Per prompt (greedy, same prompt and device for every configuration, interleaved, median of --repeats):
  target_plain     the target alone, one Python layer loop per token (forward_tokens)
  target_graphs    the target alone, CUDA-graph-captured one-token steps (CUDA only)
  spec_ngram       speculative, n-gram (prompt lookup) drafts from the chunks and the query, adaptive length
  spec_ngram_fixed the same with a fixed draft length k
  spec_model       speculative with --draft-model (only when given)
  hf_generate      transformers' own `generate` on the same prompt ids
and the step time of the target with a chunk promotion in flight at every step vs none (the Promoter's own
path: side-stream copy from pinned memory, re-rotation there, fuse at the next step boundary).
TPOT = decode time after the first token / tokens after the first, summed over the prompts (each prompt's
median over repeats); HF's from the intervals between its generated tokens (a recording streamer), median over repeats and prompts.
Every speculative configuration's output is compared token for token with the target alone.

Writes --out (default results/bench/decode.json); with --summary also the summary targets (P7_tpot_ms,
P7b_vs_hf_generate, P4_spec_speedup, P5_promotion_overhead). --from-json FILE recomputes those entries (and
--plot) from a decode JSON already measured, e.g. the H200 run in docs/results/bench/decode_h200.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from kvblend.bench.harness import device_name, median, results_header, sync
from kvblend.model.shape import PRESETS

log = logging.getLogger(__name__)

DEFAULT_OUT = "results/bench/decode.json"
TARGETS = {  # key: (target, better)
    "P7_tpot_ms": (1.5, "lower"),
    "P4b_verify_step_cost": (1.15, "lower"),
    "P7b_vs_hf_generate": (5.0, "higher"),
    "P4_spec_speedup": (2.0, "higher"),
    "P5_promotion_overhead": (1.1, "lower"),
}
SMOLLM2_SHAPE = PRESETS["smollm2-135m"].hf_config()  # the one shape type (kvblend/model/shape.py)
TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 short prompts (a smoke run)")
    p.add_argument("--real", choices=("smollm2",), default=None,
                   help="real weights and musique_s prompts (default: random weights of SmolLM2's shape)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--samples", type=int, default=None, help="prompts (default 3; --quick 2)")
    p.add_argument("--chunks", type=int, default=5, help="passages per prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64; --quick 16 (EOS still stops)")
    p.add_argument("--k", type=int, default=8, help="largest draft length")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3; --quick 1)")
    p.add_argument("--draft-model", default=None, help="a draft model for spec_model (named model or folder)")
    p.add_argument("--promotion-steps", type=int, default=None, help="steps per promotion run (default 48)")
    p.add_argument("--no-fp32-check", action="store_true",
                   help="skip the fp32 exactness check of speculative vs target-alone output (CUDA, non-fp32)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--summary", default=None, help="update this summary file with the target entries")
    p.add_argument("--source", default=None, help="the path the summary entries name as source (default --out)")
    p.add_argument("--from-json", default=None, help="no run: summary entries (and --plot) from this decode JSON")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s per configuration")


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        try:
            result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
            result["configs"]  # noqa: B018 (shape check)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"kvblend bench decode: cannot read {args.from_json}: {exc}", file=sys.stderr)
            return 1
        _finish(result, args, source=args.source or args.from_json)
        return 0
    for name in ("samples", "max_new_tokens", "repeats", "promotion_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"kvblend bench decode: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.k < 1 or args.chunks < 2:
        print("kvblend bench decode: --k must be >= 1 and --chunks >= 2", file=sys.stderr)
        return 2
    try:
        result = measure(args)
    except Exception as exc:  # noqa: BLE001 (one line for bad input or a missing device, no traceback)
        from kvblend.errors import KvblendError

        if isinstance(exc, (KvblendError, ValueError, RuntimeError, OSError)):
            print(f"kvblend bench decode: {exc}", file=sys.stderr)
            return 1
        raise
    from kvblend.io import atomic_write_json

    atomic_write_json(Path(args.out), result)
    _finish(result, args, source=args.source or args.out)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- measuring

def _model(args, device, dtype, weights: str):
    import torch

    from kvblend.model.hf import random_model

    if weights == "smollm2":
        from kvblend.model.registry import load_model

        return load_model("smollm2-135m-instruct", {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                                     torch.float16: "float16"}[dtype], device.type)
    shape = TINY_SHAPE if args.quick else SMOLLM2_SHAPE
    model = random_model(shape, model_type="llama", seed=0, dtype=dtype,
                         name="tiny-random" if args.quick else "smollm2-shape-random")
    model.hf_model.to(device)
    model.inv_freq = model.inv_freq.to(device)
    return model


def _prompts(model, args, n: int):
    """musique_s prompts (real weights) or random-id prompts of the same layout."""
    import random

    from kvblend.types import PromptIds

    if model.tokenizer is not None:
        from kvblend.data.datasets import load_dataset
        from kvblend.data.prompt import build_prompt

        data = load_dataset("musique_s", limit=n)
        t = data.template
        return [build_prompt(model.tokenizer, t.prefix, [t.format_passage(p) for p in s.passages[:args.chunks]],
                             t.format_query(s.question)) for s in data.samples]
    rng = random.Random(0)
    v = model.shape.vocab_size
    chunk_len = 40 if args.quick else 600
    out = []
    for _ in range(n):
        ids = lambda m: tuple(rng.randrange(v) for _ in range(m))  # noqa: E731
        out.append(PromptIds(ids(8), tuple(ids(chunk_len) for _ in range(args.chunks)), ids(24)))
    return out


def _spec(model, prompt, drafter, params, k, graphs, adaptive=True, on_step=None):
    from kvblend.generation.speculative import speculative_generate
    from kvblend.model.runner import runner_of

    pre = runner_of(model).full_prefill(prompt, params.max_new_tokens + k + 2)
    sync(model.device)
    out, steps = speculative_generate(model, pre, drafter, params, time.perf_counter(), prompt_ids=prompt, k=k,
                                      graphs=graphs, adaptive_k=adaptive, on_step=on_step)
    return out, steps


def _plain(model, prompt, params, graphs):
    from kvblend.generation.generate import generate
    from kvblend.model.runner import runner_of

    pre = runner_of(model).full_prefill(prompt, params.max_new_tokens + 2)
    sync(model.device)
    return generate(model, pre, params, time.perf_counter(), graphs=graphs), []


def _decode_stats(out, steps) -> dict:
    n = len(out.token_ms)  # decoded tokens after the first
    total = sum(out.token_ms)
    d = {"tokens": len(out.token_ids), "decoded": n, "decode_ms": total,
         "tpot_ms": total / n if n else float("nan")}
    if steps:
        from kvblend.generation.speculative import spec_stats

        st = spec_stats(steps)
        d.update(passes=st.num_steps, drafted=st.num_drafted, accepted=st.num_accepted,
                 acceptance_rate=st.acceptance_rate, tokens_per_pass=st.mean_emitted)
    return d


class _TokenClock:
    """A transformers streamer that only records when each piece arrives: put() is called once with the prompt,
    then once per generated token (generate() has already synchronised to decide whether to stop)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_tpot(model, prompt, max_new: int) -> tuple[float, list[int]]:
    """transformers' generate: (TPOT = mean interval between its generated tokens after the first, its greedy ids).

    Measured inside one generate() call, so it can never come out negative (a difference of two separately timed
    calls can, on a loaded machine)."""
    import torch

    ids = torch.tensor([prompt.flat()], device=model.device)
    eos = sorted(model.eos_token_ids()) or None
    kw = dict(do_sample=False, use_cache=True, pad_token_id=eos[0] if eos else 0, eos_token_id=eos,
              attention_mask=torch.ones_like(ids))
    clock = _TokenClock()
    with torch.inference_mode():
        out = model.hf_model.generate(ids, max_new_tokens=max_new, streamer=clock, **kw)
        sync(model.device)
    new_ids = out[0, ids.shape[1]:].tolist()
    token_times = clock.times[1:]  # the first put() is the prompt
    if len(token_times) < 2:
        return float("nan"), new_ids
    tpot = (token_times[-1] - token_times[0]) * 1e3 / (len(token_times) - 1)
    return tpot, new_ids


def measure(args) -> dict:
    import torch

    from kvblend.generation.sampling import SamplingParams

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.real and args.quick:
        raise ValueError("--quick runs a tiny random model; drop --real or --quick")
    samples = args.samples or (2 if args.quick else 3)
    max_new = args.max_new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    k = args.k
    cuda = device.type == "cuda"
    model = _model(args, device, dtype, args.real or "random")
    draft = None
    if args.draft_model:
        from kvblend.model.registry import load_model

        draft = load_model(args.draft_model, str(dtype).removeprefix("torch."), device.type)
    prompts = _prompts(model, args, samples)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_on_newline=False)
    configs = _configs(model, draft, params, k, max_new, cuda)
    target = "target_graphs" if cuda else "target_plain"
    rounds = _run_rounds(model, configs, prompts, max_new, repeats)

    result = {
        **results_header(device), "benchmark": "decode", "device": device_name(device), "model": model.name,
        "weights": args.real or "random", "dtype": str(dtype).removeprefix("torch."), "samples": samples,
        "chunks": args.chunks, "prompt_tokens": [p.num_tokens for p in prompts], "max_new_tokens": max_new,
        "k_max": k, "repeats": repeats, "target_config": target, "configs": _aggregate(*rounds, target),
        "promotion": promotion_overhead(model, prompts[0], params, args.promotion_steps or (16 if args.quick else 48),
                                        repeats),
        "notes": ("greedy; stop_on_newline off (EOS still stops); spec_ngram_fixed uses k=min(k_max,4); "
                  "TPOT excludes the first token: per prompt the median decode time over repeats, summed over prompts"),
    }
    if cuda:
        result["graph_replay_ms"] = graph_replay_times(model, prompts[0], max_new, k)
    if cuda and dtype != torch.float32 and not args.no_fp32_check:
        result["fp32_exactness"] = fp32_exactness(args, device, prompts, max_new, k)
    return result


def _configs(model, draft, params, k: int, max_new: int, cuda: bool) -> dict:
    """name -> fn(prompt) -> (output, speculative steps) of every configuration this run times."""
    from kvblend.generation.drafters import ModelDrafter, NgramDrafter

    configs: dict[str, callable] = {"target_plain": lambda p: _plain(model, p, params, graphs=False)}
    if cuda:
        configs["target_graphs"] = lambda p: _plain(model, p, params, graphs=True)
    configs["spec_ngram"] = lambda p: _spec(model, p, NgramDrafter(p.chunk_ids), params, k, graphs=None)
    configs["spec_ngram_fixed"] = lambda p: _spec(model, p, NgramDrafter(p.chunk_ids), params, min(k, 4),
                                                  graphs=None, adaptive=False)
    if draft is not None:
        configs["spec_model"] = lambda p: _spec(
            model, p, ModelDrafter(draft, p, vocab_size=model.shape.vocab_size, extra_capacity=max_new + k + 2),
            params, min(k, 4), graphs=None)
    return configs


def _run_rounds(model, configs: dict, prompts, max_new: int, repeats: int) -> tuple:
    """Round 0 (uncounted warm-up), then `repeats` rounds: every prompt through every configuration, then HF.
    Returns (runs: name -> per prompt the decode stats of each counted round, tokens: name -> per prompt the
    last output ids, hf: per prompt HF's TPOT of each counted round, hf_ids: per prompt HF's last ids)."""
    from tqdm import tqdm

    runs: dict[str, list[list[dict]]] = {name: [[] for _ in prompts] for name in configs}
    tokens: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in configs}
    hf: list[list[float]] = [[] for _ in prompts]
    hf_ids: list[list[int]] = [[] for _ in prompts]
    jobs = [(r, i) for r in range(repeats + 1) for i in range(len(prompts))]  # round 0: uncounted warm-up
    for r, i in tqdm(jobs, desc="decode bench", unit="prompt", disable=not sys.stderr.isatty()):
        for name, fn in configs.items():
            out, steps = fn(prompts[i])
            tokens[name][i] = out.token_ids
            if r:
                runs[name][i].append(_decode_stats(out, steps))
        tpot, ids = _hf_tpot(model, prompts[i], max_new)
        hf_ids[i] = ids
        if r:
            hf[i].append(tpot)
    return runs, tokens, hf, hf_ids


def _aggregate(runs: dict, tokens: dict, hf: list, hf_ids: list, target: str) -> dict[str, dict]:
    """Per configuration (and hf_generate): TPOT, tokens/s, whether its output equals the target's."""
    result_configs: dict[str, dict] = {}
    for name in runs:
        per_prompt = [{key: median([run[key] for run in rs]) for key in rs[0]} for rs in runs[name]]
        decoded, ms = sum(p["decoded"] for p in per_prompt), sum(p["decode_ms"] for p in per_prompt)
        agg = {"tpot_ms": ms / decoded if decoded else float("nan"),
               "tokens_per_s": decoded / ms * 1e3 if ms else float("nan"),
               "tokens": sum(len(t) for t in tokens[name]),
               "identical_to_target": all(a == b for a, b in zip(tokens[name], tokens[target])),
               "per_prompt": per_prompt}
        if "acceptance_rate" in per_prompt[0]:
            drafted = sum(p["drafted"] for p in per_prompt)
            agg["acceptance_rate"] = sum(p["accepted"] for p in per_prompt) / drafted if drafted else 0.0
            agg["tokens_per_pass"] = median([p["tokens_per_pass"] for p in per_prompt])
        result_configs[name] = agg
    hf_tpot = median([median(v) for v in hf])
    result_configs["hf_generate"] = {
        "tpot_ms": hf_tpot, "tokens_per_s": 1e3 / hf_tpot if hf_tpot == hf_tpot else float("nan"),
        "tokens": sum(len(t) for t in hf_ids),
        "identical_to_target": all(a[:len(b)] == b or b[:len(a)] == a for a, b in zip(hf_ids, tokens[target]))}
    return result_configs


def graph_replay_times(model, prompt, max_new: int, k: int) -> dict:
    """Device time of one captured step of T tokens (CUDA events around the replay, median of 20), and the
    host-visible time of the same step (launch + reading the argmax), for T = 1 .. k+1: where a pass's time goes."""
    import torch

    from kvblend.model.runner import runner_of

    pre = runner_of(model).full_prefill(prompt, max_new + k + 2)
    out = {}
    runner = runner_of(model).decoder(pre.state, graphs=True)
    with torch.inference_mode():
        base = pre.state.length
        for t in sorted({1, 2, 3, 5, 8, k + 1}):
            ids = list(prompt.query_ids[:1]) * t
            dev, host = [], []
            for i in range(25):
                pre.state.truncate(base)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(model.device)
                torch.cuda._sleep(2_000_000)  # keep the device busy while the host queues: device time only
                start.record()
                runner.launch(ids)
                end.record()
                sync(model.device)
                pre.state.truncate(base)
                t0 = time.perf_counter()
                runner.launch(ids).argmax()
                host_ms = (time.perf_counter() - t0) * 1e3
                if i >= 5:
                    dev.append(start.elapsed_time(end))
                    host.append(host_ms)
            out[str(t)] = {"device_ms": median(dev), "host_ms": median(host)}
        pre.state.truncate(base)
    return out


def fp32_exactness(args, device, prompts, max_new: int, k: int) -> dict:
    """In fp32 (where exactness is expected): plain loop == captured == speculative, token for token."""
    import torch

    from kvblend.generation.drafters import NgramDrafter
    from kvblend.generation.sampling import SamplingParams

    model = _model(args, device, torch.float32, args.real or "random")
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_on_newline=False)
    out = {"plain_vs_graphs": True, "spec_vs_plain": True, "tokens": 0}
    for p in prompts:
        plain, _ = _plain(model, p, params, graphs=False)
        graphs, _ = _plain(model, p, params, graphs=True)
        spec, _ = _spec(model, p, NgramDrafter(p.chunk_ids), params, k, graphs=True)
        out["plain_vs_graphs"] &= plain.token_ids == graphs.token_ids
        out["spec_vs_plain"] &= spec.token_ids == plain.token_ids
        out["tokens"] += len(plain.token_ids)
    del model
    return out


def _staged_store(root: Path, model, chunks, resident, first_position: int):
    """A store with unbounded tiers holding `chunks` (the resident ones on the GPU tier, the others on the CPU
    tier) and their slots in prompt order from first_position."""
    from kvblend.fusion.layout import ChunkSlot
    from kvblend.kvstore.store import ChunkKVStore

    big = 1 << 40
    store = ChunkKVStore(root, big, big, big, device=model.device, model_name=model.name)
    slots, start = [], first_position
    for i, ck in enumerate(chunks):
        store.put(ck, "gpu" if resident[i] else "cpu")
        slots.append(ChunkSlot(i, ck.key, start, ck.num_tokens, 1.0, "gpu" if resident[i] else "cpu"))
        start += ck.num_tokens
    return store, slots


def promotion_overhead(model, prompt, params, num_steps: int, repeats: int) -> dict:
    """Median target step time (one token per step, the decode path of the device) with a chunk promotion in
    flight at every step vs without: chunks 0..n-3 resident, the last two CPU placeholders (pinned memory on
    CUDA); at every step the Promoter fuses the chunk whose copy it started the step before, demotes the other
    and starts its copy (side stream), exactly its proxy-driven path with the scores scripted."""
    from kvblend.fusion.blend import prefill
    from kvblend.generation.drafters import NgramDrafter
    from kvblend.generation.promotion import Promoter
    from kvblend.generation.sampling import SamplingParams
    from kvblend.generation.speculative import speculative_generate
    from kvblend.kvstore.builder import build_chunk_kv
    from kvblend.kvstore.residency import Residency

    n = len(prompt.chunk_ids)
    chunks = [build_chunk_kv(model, ids) for ids in prompt.chunk_ids]
    resident = [i < n - 2 for i in range(n)]
    ahead = 2  # extra room: every run decodes exactly num_steps tokens
    params = SamplingParams(max_new_tokens=num_steps + 1, temperature=0.0, stop_on_newline=False)

    class Scripted(Promoter):
        """The Promoter with scores scripted: always the placeholder that is not resident."""

        def _scores(self, state):
            want = next(i for i in (n - 2, n - 1) if i not in self.resident and i not in self.pending)
            return {i: (1.0 if i == want else 0.0) for i in range(n)}

    times: dict[str, list[float]] = {"without": [], "with": []}
    info: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store, slots = _staged_store(Path(tmp), model, chunks, resident, len(prompt.prefix_ids))
        for r in range(repeats + 1):  # round 0: warm-up
            for mode in ("without", "with"):
                pre = prefill(model, prompt, [c if res else None for c, res in zip(chunks, resident)], mode="reuse",
                              resident=resident, extra_capacity=num_steps + ahead)
                promoter = None
                residency = Residency(store, slots, gpu_chunks=n - 1, nbytes=[c.nbytes for c in chunks])
                if mode == "with":
                    for s in slots:
                        residency.load(s.index)  # the resident ones pinned, as a request's start does
                    promoter = Scripted(model, residency, proxy="ngram_source", threshold=0.5,
                                        pinned=[i for i in range(n - 2)])
                sync(model.device)
                out, steps = speculative_generate(model, pre, NgramDrafter([]), params, time.perf_counter(),
                                                  prompt_ids=prompt, k=0, on_step=promoter)
                residency.release()
                if promoter is not None:
                    promoted = sum(len(t.promoted) for t in promoter.trace)
                    info = {"promotions": promoted, "steps": len(steps),
                            "bytes_per_promotion": chunks[-1].nbytes}
                    for s in slots[n - 2:]:  # back to the CPU tier only: the next run copies them again
                        store.demote(s.key)
                if r:
                    times[mode].append(median([s.step_ms for s in steps[1:]]))
    without, with_ = median(times["without"]), median(times["with"])
    return {"step_ms_without": without, "step_ms_with": with_, "ratio": with_ / without, **info,
            "steps_per_run": num_steps, "method": "median step time per run, median over runs"}


def summary_entries(result: dict, source: str) -> dict[str, dict]:
    from kvblend.bench.summary import entry

    c = result["configs"]
    target = c[result["target_config"]]
    dev = f"{result['device']}, {result['model']} ({result['weights']} weights), {result['dtype']}"
    spec = c["spec_ngram"]
    values = {
        "P7_tpot_ms": (target["tpot_ms"], {"config": result["target_config"]}),
        "P7b_vs_hf_generate": (c["hf_generate"]["tpot_ms"] / target["tpot_ms"],
                               {"hf_tpot_ms": round(c["hf_generate"]["tpot_ms"], 3)}),
        "P4_spec_speedup": (spec["tokens_per_s"] / target["tokens_per_s"],
                            {"identical_output": spec["identical_to_target"],
                             "acceptance_rate": round(spec.get("acceptance_rate", 0.0), 3)}),
        "P5_promotion_overhead": (result["promotion"]["ratio"], {}),
    }
    steps = result.get("graph_replay_ms", {})
    if "8" in steps and "1" in steps:  # a captured step of 8 tokens / of 1 token, device time
        values["P4b_verify_step_cost"] = (steps["8"]["device_ms"] / steps["1"]["device_ms"],
                                          {"step_8_ms": steps["8"]["device_ms"], "step_1_ms": steps["1"]["device_ms"]})
    out = {}
    for key, (value, extra) in values.items():
        tgt, better = TARGETS[key]
        out[key] = entry(value, tgt, better, source, device=dev, **extra)
    return out


def _finish(result: dict, args, source: str) -> None:
    from kvblend.bench.summary import update_summary

    if args.summary:
        update_summary(args.summary, summary_entries(result, source))
        print(f"updated {args.summary}")
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")


def plot(result: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvblend.io import atomic_write_bytes

    names = list(result["configs"])
    values = [result["configs"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(names, values, color=["#4878a8" if n.startswith("target") else
                                         "#6a9a4a" if n.startswith("spec") else "#999999" for n in names])
    ax.bar_label(bars, fmt="%.0f", padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (after the first token; median)")
    ax.set_title(f"{result['model']} {result['dtype']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def table(result: dict) -> str:
    lines = [f"{result['model']} {result['dtype']} on {result['device']}, prompts of {result['prompt_tokens']} "
             f"tokens, up to {result['max_new_tokens']} new",
             f"{'config':18s} {'TPOT ms':>8s} {'tok/s':>8s} {'accept':>7s} {'tok/pass':>8s} {'same':>5s}"]
    for name, c in result["configs"].items():
        acc = f"{c['acceptance_rate']:.2f}" if "acceptance_rate" in c else "-"
        tpp = f"{c['tokens_per_pass']:.2f}" if "tokens_per_pass" in c else "-"
        lines.append(f"{name:18s} {c['tpot_ms']:8.3f} {c['tokens_per_s']:8.1f} {acc:>7s} {tpp:>8s} "
                     f"{str(c['identical_to_target']):>5s}")
    pr = result["promotion"]
    lines.append(f"promotion in flight: step {pr['step_ms_with']:.3f} ms vs {pr['step_ms_without']:.3f} ms "
                 f"without (x{pr['ratio']:.3f})")
    if "graph_replay_ms" in result:
        lines.append("captured step of T tokens, device / host ms: " + ", ".join(
            f"T={t}: {v['device_ms']:.3f}/{v['host_ms']:.3f}" for t, v in result["graph_replay_ms"].items()))
    if "fp32_exactness" in result:
        lines.append(f"fp32 exactness: {result['fp32_exactness']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m kvblend.bench.decode ...`: the same as `kvblend bench decode ...`."""
    parser = argparse.ArgumentParser(prog="kvblend bench decode", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
