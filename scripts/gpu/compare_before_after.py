"""Before / after table of scripts/gpu/before_after.sh results (one GPU run): per case the median ms of the
earlier tree, of this one, and after/before (> 1.03 = slower by more than 3%). Writes Markdown and JSON.

usage: python scripts/gpu/compare_before_after.py DIR OUT_PREFIX [--before-sha SHA --after-sha SHA]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _prefill_rows(doc: dict) -> dict[str, float]:
    out = {}
    for res in doc.get("results", []):
        label = f"{res['label']} {res.get('num_tokens')} tok"
        for case, m in res.get("prefill", {}).items():
            out[f"{label} prefill {case}"] = m["median_ms"]
        for case, m in res.get("e2e", {}).items():
            out[f"{label} e2e {case}"] = m["median_ms"]
        for stage, ms in res.get("stages_blend", {}).items():
            if isinstance(ms, float):
                out[f"{label} stage {stage}"] = ms
    return out


def _decode_rows(doc: dict) -> dict[str, float]:
    out = {f"decode {k} tpot": v["tpot_ms"] for k, v in doc.get("configs", {}).items() if "tpot_ms" in v}
    out.update({f"decode step T={t} device": v["device_ms"] for t, v in doc.get("graph_replay_ms", {}).items()})
    p = doc.get("promotion") or {}
    if "step_ms_with" in p:
        out["decode step with promotion in flight"] = p["step_ms_with"]
        out["decode step without promotion"] = p["step_ms_without"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", help="folders holding {prefill,decode}_{before,after}_TAG.json")
    ap.add_argument("--out", required=True, help="output prefix (.md and .json are written)")
    ap.add_argument("--before-sha", default="before")
    ap.add_argument("--after-sha", default="after")
    args = ap.parse_args()
    rows = []
    for d in map(Path, args.dirs):
        for before in sorted(d.glob("*_before_*.json")):
            after = before.with_name(before.name.replace("_before_", "_after_"))
            if not after.exists():
                continue
            kind = "decode" if before.name.startswith("decode") else "prefill"
            pick = _decode_rows if kind == "decode" else _prefill_rows
            a, b = pick(json.loads(before.read_text())), pick(json.loads(after.read_text()))
            for key in a:
                if key in b and a[key]:
                    rows.append({"case": key, "before_ms": a[key], "after_ms": b[key], "ratio": b[key] / a[key]})
    lines = [f"| case | {args.before_sha} ms | {args.after_sha} ms | after / before |", "|---|---:|---:|---:|"]
    for r in rows:
        flag = " **slower**" if r["ratio"] > 1.03 else ""
        lines.append(f"| {r['case']} | {r['before_ms']:.3f} | {r['after_ms']:.3f} | {r['ratio']:.3f}{flag} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"before": args.before_sha, "after": args.after_sha,
                                                    "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
