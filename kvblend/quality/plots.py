"""PNG plots of a frontier results document: KL vs ratio and fidelity vs ratio, one line per variant."""

from __future__ import annotations

from pathlib import Path

from kvblend.io import atomic_write_bytes


def _series(doc: dict, variant: str, metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in doc["ratios"]:
        cell = doc["aggregate"].get(f"{variant}@{r:g}")
        if cell and cell.get(metric) and cell[metric].get("mean") is not None:
            xs.append(r)
            ys.append(cell[metric]["mean"])
    return xs, ys


def plot_frontier(doc: dict, stem: str | Path) -> list[Path]:
    """Writes <stem>_kl.png and <stem>_fidelity.png; returns their paths."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = doc["setup"]
    n = doc["aggregate"].get("full", {}).get("n", 0)
    title = f"{setup['dataset']}, {setup['model']}, {setup['dtype']}, {n} samples"
    out = []
    for metric, label, suffix, logy in (("kl_first", "first-token KL(full || x)", "kl", True),
                                        ("exact", "answers equal to full prefill (fraction)", "fidelity", False)):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for i, v in enumerate(doc["variants"]):
            xs, ys = _series(doc, v, metric)
            if logy:
                xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ((), ())
            if xs:
                ax.plot(xs, ys, marker="os^"[i // 10 % 3], ms=3, ls=("-", "--", ":")[i // 10 % 3],
                        color=f"C{i % 10}", lw=2.4 if v == "plain" else 1.2, label=v)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("recompute ratio")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = Path(f"{stem}_{suffix}.png")
        atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out
