"""Provenance of frontier results (torch-free): which pass, command and git sha made each sample and run.

Every pass (one `kvblend frontier` command; its --jobs workers share one pass) is listed in doc["passes"] as
{"id", "command", "git_sha", "hardware", "started"}; every sample records the pass that created it ("pass",
"git_sha", "command", "hardware"), every run and promotion record the pass that computed it ("pass"). Samples
written before per-sample provenance get the file's last sha, marked "provenance": "inferred".
"""

from __future__ import annotations

import time
from typing import Sequence

PROVENANCE = ("pass", "git_sha", "command", "hardware", "provenance")


def new_pass(command: str, sha: str, hw: str, started: float) -> dict:
    """This pass's entry; its id is the same in every worker of one --jobs command (same command, sha,
    hardware and start time, which the parent hands its workers)."""
    import hashlib

    ident = hashlib.sha1(f"{command}|{sha}|{hw}|{started:.3f}".encode()).hexdigest()[:10]
    return {"id": ident, "command": command, "git_sha": sha, "hardware": hw,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}


def with_provenance(doc: dict) -> dict:
    """doc with "passes" and per-sample provenance; a file written before them gets one inferred pass (the
    file's last git sha and its command history) that its samples point at."""
    passes = list(doc.get("passes") or [])
    if any("pass" not in smp for smp in doc.get("samples", [])):
        sha = doc.get("git_sha") or "?"
        legacy = {"id": f"file-{sha[:10]}", "command": " ; ".join(doc.get("commands") or [doc.get("command", "")]),
                  "git_sha": sha, "hardware": doc.get("hardware", "?"), "started": "", "inferred": True}
        if legacy["id"] not in {x["id"] for x in passes}:
            passes.insert(0, legacy)
        for smp in doc["samples"]:
            if "pass" not in smp:
                smp.update({"pass": legacy["id"], "git_sha": sha, "command": legacy["command"],
                            "provenance": "inferred"})
                smp.setdefault("hardware", doc.get("hardware", "?"))
    doc["passes"] = passes
    return doc


def merge_passes(*lists: Sequence[dict]) -> list[dict]:
    out: dict[str, dict] = {}
    for lst in lists:
        for x in lst or ():
            out.setdefault(x["id"], x)
    return sorted(out.values(), key=lambda x: (not x.get("inferred"), x.get("started", "")))


def merge_record(old: dict | None, new: dict) -> dict:
    """One sample's record from an older and a newer one: the union of their runs and promotion records (the
    newer wins a key both have); the sample keeps the provenance of the pass that created it."""
    if not old:
        return new
    out = {**old, **new}
    out["runs"] = {**old.get("runs", {}), **new.get("runs", {})}
    promos = {**(old.get("promotion") or {}), **(new.get("promotion") or {})}
    if promos:
        out["promotion"] = promos
    for k in PROVENANCE:
        if k in old:
            out[k] = old[k]
        elif k in new:
            out[k] = new[k]
    return out


def sha_counts(samples: Sequence[dict], passes: Sequence[dict]) -> list[dict]:
    """Distinct git shas: samples created at each (and runs computed at each), in pass order."""
    from collections import Counter

    sha_of = {x["id"]: x.get("git_sha") or "?" for x in passes}
    created = Counter(smp.get("git_sha") or "?" for smp in samples)
    runs = Counter(sha_of.get(r.get("pass"), smp.get("git_sha") or "?") for smp in samples
                   for r in smp.get("runs", {}).values())
    inferred = Counter(smp.get("git_sha") or "?" for smp in samples if smp.get("provenance") == "inferred")
    order = list(dict.fromkeys([*(sha_of[x["id"]] for x in passes), *created, *runs]))
    return [{"git_sha": sha, "samples": created.get(sha, 0), "runs": runs.get(sha, 0),
             "inferred_samples": inferred.get(sha, 0)} for sha in order if created.get(sha) or runs.get(sha)]
