"""The figures (matplotlib, headless Agg backend). Each function draws one PNG and writes it atomically."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kvblend.analysis.tables import Run, Sweep, Timeline  # noqa: E402
from kvblend.io import atomic_write_bytes  # noqa: E402

DPI = 110
GPU_COLOR, FLIGHT_COLOR, CPU_COLOR = "#4caf50", "#ffb74d", "#d9d9d9"


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


# retrieval ------------------------------------------------------------------------------------------
def plot_recall(rows: list[dict], path: Path) -> Path:
    """answer-recall@k per retrieval mode: a curve over k where recomputed, else the file's recall@k as a
    point; one panel per dataset."""
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.2), squeeze=False,
                             layout="constrained")
    for ax, dataset in zip(axes[0], datasets):
        kmax = 1
        styles = iter([("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")] * 4)
        for r in (r for r in rows if r["dataset"] == dataset):
            marker, ls = next(styles)  # distinct markers and dashes: equal curves stay visible
            label = r["mode"] + ("" if r["scope"] == "per_sample" else f" ({r['scope']})")
            label += f", n={r['num_samples']}"
            if r["curve"]:
                ks = sorted(r["curve"])
                ax.plot(ks, [r["curve"][k] for k in ks], marker=marker, linestyle=ls, markersize=7, alpha=0.85,
                        label=label)
                kmax = max(kmax, ks[-1])
            elif r["recall_at_k"] is not None:
                ax.plot([r["k"]], [r["recall_at_k"]], marker="s", linestyle="none", markersize=9, label=label)
                kmax = max(kmax, r["k"])
        ax.set_xticks(range(1, kmax + 1))
        ax.set_xlim(0.7, kmax + 0.3)
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("k (top-k retrieved passages)")
        ax.set_ylabel("answer-recall@k (fraction of questions)")
        ax.set_title(f"{dataset}: answer-recall@k per retrieval mode")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


# decoding -------------------------------------------------------------------------------------------
def plot_latency(dataset: str, runs: list[Run], path: Path) -> Path:
    """Mean TTFT and TPOT per run (bars), each sample as a dot."""
    # the fetch part of TTFT is drawn where it is visible (over 0.5% of a run's TTFT)
    show_fetch = any((r.mean_fetch_ms or 0.0) > 0.005 * (r.mean_ttft_ms or float("inf")) for r in runs)
    height = max(3.2, 0.45 * len(runs) + 1.6)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, height), sharey=True, layout="constrained")
    ys = list(range(len(runs)))
    colors = ["#1f77b4" if r.kind == "decode" else "#9467bd" for r in runs]
    for ax, attr, values, unit, title in (
            (ax1, "mean_ttft_ms", "ttft_ms", "ms", "time to first token (TTFT)"),
            (ax2, "mean_tpot_ms", "tpot_ms", "ms per output token", "time per output token (TPOT)")):
        means = [getattr(r, attr) or 0.0 for r in runs]
        top = max([m for m in means] + [p for r in runs for p in getattr(r, values)] + [1.0])
        scale = 1e3 if top >= 10_000 else 1.0  # long CPU runs: seconds read better than 6-digit ms
        if scale > 1:
            unit = unit.replace("ms", "s")
        means = [m / scale for m in means]
        top /= scale
        ax.barh(ys, means, color=colors, alpha=0.75, height=0.7)
        if attr == "mean_ttft_ms" and show_fetch:  # the fetch part of TTFT
            ax.barh(ys, [(r.mean_fetch_ms or 0.0) / scale for r in runs], height=0.35, color="#444444", alpha=0.8)
        for y, r in zip(ys, runs):
            pts = [p / scale for p in getattr(r, values)]
            ax.scatter(pts, [y] * len(pts), color="black", s=12, zorder=3)
        for y, m in zip(ys, means):
            ax.text(m + top * 0.01, y + 0.28, f"{m:,.0f}" if m >= 100 else f"{m:.1f}", fontsize=8, va="center")
        ax.set_xlim(0, top * 1.15)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    ax1.set_yticks(ys, [r.label for r in runs])
    ax1.set_ylim(len(runs) - 0.5, -0.5)  # first run on top; a single run keeps a normal bar height
    handles = [Patch(color="#1f77b4", alpha=0.75, label="plain decoding (mean)")] * any(r.kind == "decode" for r in runs)
    handles += [Patch(color="#9467bd", alpha=0.75, label="speculative (mean)")] * any(r.kind == "spec" for r in runs)
    handles.append(Line2D([], [], marker="o", color="black", linestyle="none", markersize=4, label="one sample"))
    if show_fetch:
        handles.append(Patch(color="#444444", alpha=0.8, label="of TTFT: fetching chunks to GPU tier (mean)"))
    ax2.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    meta = sorted({f"{r.model}, {r.dtype}, {r.doc.get('device', '?')}" for r in runs})
    fig.suptitle(f"{dataset}: TTFT and TPOT per mode ({'; '.join(meta)})", fontsize=11)
    return _save(fig, path)


def plot_quality(dataset: str, runs: list[Run], path: Path) -> Path:
    """Score and fidelity to the full-prefill answers per run (grouped horizontal bars, 0..1)."""
    metrics = sorted({r.metric for r in runs})
    series = [("score", f"score ({'/'.join(metrics)}) vs gold", "#1f77b4"),
              ("fidelity_exact", "fidelity: answer == full prefill's", "#2ca02c"),
              ("fidelity_rougeL", "fidelity: Rouge-L to full prefill's", "#ff7f0e")]
    height = max(3.0, 0.6 * len(runs) + 1.4)
    fig, ax = plt.subplots(figsize=(10, height), layout="constrained")
    bar = 0.8 / len(series)
    for i, (attr, label, color) in enumerate(series):
        ys = [j + (i - 1) * bar for j in range(len(runs))]
        vals = [getattr(r, attr) for r in runs]
        ax.barh(ys, [v or 0.0 for v in vals], height=bar, color=color, label=label)
        for y, v in zip(ys, vals):
            ax.text((v or 0.0) + 0.01, y, "n/a" if v is None else f"{v:.2f}", fontsize=7, va="center")
    ax.set_yticks(range(len(runs)), [f"{r.label} (n={len(r.samples)})" for r in runs])
    ax.set_ylim(len(runs) - 0.5, -0.5)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("mean over samples (0 to 1, higher is better)")
    ax.set_title(f"{dataset}: quality and fidelity to full prefill per mode")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


# budget sweep ---------------------------------------------------------------------------------------
def plot_sweep(sweep: Sweep, path: Path) -> Path:
    """Quality and latency against the number of GPU-resident chunks, with and without promotions."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    proxies = sorted({r["proxy"] for r in sweep.runs}, key=lambda p: (p != "none", p))
    styles = {p: ("#7f7f7f", "--", "s") if p == "none" else (c, "-", "o")
              for p, c in zip(proxies, ["#7f7f7f", "#d62728", "#9467bd", "#17becf"])}
    for proxy in proxies:
        rows = sorted((r for r in sweep.runs if r["proxy"] == proxy), key=lambda r: r["gpu_chunks"])
        xs = [r["gpu_chunks"] for r in rows]
        color, ls, marker = styles[proxy]
        label = "no promotions" if proxy == "none" else f"promotions by {proxy}"

        def plot(ax, key, lab, ls=ls, marker=marker):
            pts = [(x, r.get(key)) for x, r in zip(xs, rows) if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle=ls, marker=marker,
                        label=lab)
        metric = next((r.get("metric") for r in rows if r.get("metric")), "score")
        plot(ax1, "score", f"{metric} vs gold, {label}")
        plot(ax1, "fidelity_rougeL", f"Rouge-L to all-resident answer, {label}", ls=":", marker="^")
        plot(ax2, "mean_ttft_ms", label)
        plot(ax3, "mean_tpot_ms", label)
    budgets = sorted({r["gpu_chunks"] for r in sweep.runs})
    for ax, ylabel, title in ((ax1, "mean over samples (0 to 1)", "quality"),
                              (ax2, "mean TTFT (ms)", "time to first token"),
                              (ax3, "mean TPOT (ms per output token)", "time per output token")):
        ax.set_xticks(budgets)
        ax.set_xlabel("chunks resident on the GPU tier at the start")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1 if ax is ax1 else 2)
    ax1.set_ylim(-0.03, 1.05)
    fig.suptitle(f"Budget sweep: {sweep.title}", fontsize=11)
    return _save(fig, path)


# promotion timeline ---------------------------------------------------------------------------------
def _step_label(step: int) -> str:
    return {-2: "start", -1: "warm"}.get(step, str(step))


def plot_timeline(t: Timeline, path: Path) -> Path:
    """Per decode step: each chunk's tier (GPU / copy in flight / CPU placeholder), when promotions were
    requested and fused, the proxy scores against the threshold, and drafted vs accepted tokens."""
    steps = t.steps
    n, k = len(steps), max(1, t.num_chunks)
    has_scores = any(s.get("proxy_scores") for s in steps)
    panels = 3 if has_scores else 2
    fig, axes = plt.subplots(panels, 1, figsize=(max(7.5, 0.42 * n + 3.5), 2.2 + 0.42 * k + 2.3 * (panels - 1)),
                             sharex=True, gridspec_kw={"height_ratios": [max(1.2, 0.42 * k)] + [1.6] * (panels - 1)})
    ax = axes[0]
    xs = list(range(n))
    # tier grid: 0 CPU placeholder, 1 copy in flight (requested; fused before the next pass), 2 attended on GPU
    grid = [[0] * n for _ in range(k)]
    for x, s in enumerate(steps):
        for c in s["gpu_chunks"]:
            if c < k:  # a chunk requested at a pass is fused before the next one (the warm start fuses at once)
                grid[c][x] = 1 if c in s["requested"] and s["step"] >= 0 else 2
    ax.imshow(grid, aspect="auto", cmap=ListedColormap([CPU_COLOR, FLIGHT_COLOR, GPU_COLOR]), vmin=0, vmax=2,
              interpolation="nearest", extent=(-0.5, n - 0.5, k - 0.5, -0.5))
    for x, s in enumerate(steps):
        for c in s["requested"]:
            ax.scatter(x, c, marker=">", s=60, color="#e65100", edgecolors="black", linewidths=0.5, zorder=3)
        for c in s["promoted"]:
            ax.scatter(x, c, marker="*", s=170, color="#1b5e20", edgecolors="white", linewidths=0.6, zorder=4)
        for c in s["demoted"]:
            ax.scatter(x, c, marker="x", s=70, color="#b71c1c", linewidths=2, zorder=4)
    ax.set_yticks(range(k), [f"chunk {c} (rank {c + 1})" for c in range(k)])
    ax.set_ylabel("retrieved chunk")
    if not t.has_tiers:
        ax.text(n / 2 - 0.5, (k - 1) / 2, "this trace records no GPU/CPU chunk sets", ha="center", va="center")
    legend = [Patch(color=GPU_COLOR, label="on GPU, attended"), Patch(color=FLIGHT_COLOR, label="copy in flight"),
              Patch(color=CPU_COLOR, label="CPU placeholder (masked)"),
              Line2D([], [], marker=">", color="#e65100", linestyle="none", label="promotion requested"),
              Line2D([], [], marker="*", color="#1b5e20", linestyle="none", markersize=11, label="fused into KV"),
              Line2D([], [], marker="x", color="#b71c1c", linestyle="none", label="demoted")]
    ax.legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    cfg = t.config
    ax.set_title(f"{t.dataset} {t.sample_id}: promotions timeline\n{cfg.get('drafter', '?')} drafts, proxy "
                 f"{cfg.get('proxy', '?')}, threshold {cfg.get('threshold', '?')}, chunks on GPU at start: "
                 f"{cfg.get('gpu_chunks', '?')}; model {cfg.get('model', '?')}", fontsize=10)
    if has_scores:
        axs = axes[1]
        for c in range(k):
            pts = [(x, float(s["proxy_scores"][str(c)])) for x, s in enumerate(steps)
                   if isinstance(s.get("proxy_scores"), dict) and str(c) in s["proxy_scores"]]
            if pts:
                axs.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"chunk {c}")
        threshold = cfg.get("threshold")
        if isinstance(threshold, (int, float)):
            axs.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
        axs.set_ylabel("proxy score\n(share of attention)")
        axs.set_ylim(bottom=0)
        axs.grid(alpha=0.3)
        axs.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axt = axes[-1]
    drafted = [len(s.get("drafted") or []) for s in steps]
    accepted = [int(s.get("accepted") or 0) for s in steps]
    emitted = [len(s.get("emitted") or []) for s in steps]
    axt.bar(xs, drafted, color="#c6dbef", label="drafted tokens", width=0.8)
    axt.bar(xs, accepted, color="#2171b5", label="accepted draft tokens", width=0.5)
    if any(emitted):  # none before the first pass (start, warm-start round)
        pts = [(x, e) for x, e, s in zip(xs, emitted, steps) if s["step"] >= 0]
        axt.plot([p[0] for p in pts], [p[1] for p in pts], color="black", marker="o", markersize=3, linestyle="none",
                 label="tokens emitted (accepted + target's own)")
    axt.set_ylabel("tokens per step")
    axt.set_xlabel("decode step (verification pass); 'start' = initial placement, 'warm' = warm-start round "
                   "before the first token")
    axt.grid(axis="y", alpha=0.3)
    axt.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axt.set_xticks(xs, [_step_label(s["step"]) for s in steps])
    if n > 30:
        for label in axt.get_xticklabels():
            label.set_rotation(90)
    return _save(fig, path)
