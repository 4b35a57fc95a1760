"""Named blend variants compared by the frontier: a chunk precompute context plus a selection policy.

Torch-free. Each variant is a set of EngineConfig values (chunk_sink, score_on, select_first_tokens,
select_layers), so any variant can be run by the pipeline too (`kvblend decode --chunk-sink prefix
--score-on k_attn_product ...`); except a variant whose signal is only in fusion/select.py's EXTRA_SIGNALS
(k_tail_product), which the frontier runs directly until kvblend.vocab.SCORE_ON lists it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    chunk_sink: str  # auto | none | prefix | text
    score_on: str  # k | v | attn | k_attn_rank | k_attn_product | k_tail_product (fusion/select.py SIGNALS)
    select_first_tokens: int = 0
    select_layers: int = 1
    what: str = ""

    def settings(self) -> dict:
        d = asdict(self)
        d.pop("name")
        d.pop("what")
        return d


_ALL = (
    Variant("plain", "auto", "k", what="plain CacheBlend: chunks prefilled alone (BOS sink if any), K deviation at layer 1"),
    Variant("plain_v", "auto", "v", what="chunks alone, V deviation (the original CacheBlend code)"),
    Variant("plain_epic", "auto", "k", 8, what="chunks alone, each chunk's first 8 tokens always + K deviation (EPIC)"),
    Variant("text", "text", "k", what="chunks after a fixed short sink text, K deviation"),
    Variant("prefix", "prefix", "k", what="chunks after the prompt's shared prefix, K deviation"),
    Variant("prefix_v", "prefix", "v", what="prefix context, V deviation"),
    Variant("prefix_attn", "prefix", "attn", what="prefix context, the query's attention onto chunk tokens at layer 1"),
    Variant("prefix_rank", "prefix", "k_attn_rank", what="prefix context, rank sum of K deviation and query attention"),
    Variant("prefix_product", "prefix", "k_attn_product", what="prefix context, K deviation x query attention"),
    Variant("prefix_epic", "prefix", "k", 8, what="prefix context, first 8 tokens of each chunk always + K deviation"),
    Variant("prefix_narrow", "prefix", "k", 0, 3, what="prefix context, K deviation narrowed over layers 1-3 (3r, 2r, r)"),
    Variant("prefix_product_narrow", "prefix", "k_attn_product", 0, 3,
            what="prefix context, K deviation x query attention narrowed over layers 1-3"),
    Variant("prefix_attn_narrow", "prefix", "attn", 0, 3,
            what="prefix context, query attention narrowed over layers 1-3"),
    # candidates aimed at samsum (the worse dataset of Q2): the two best there were prefix_epic and
    # prefix_product_narrow, so combine them; narrow deeper; and count only the attention of the query's tail
    Variant("prefix_epic_product_narrow", "prefix", "k_attn_product", 8, 3,
            what="prefix context, first 8 tokens of each chunk always + K deviation x query attention narrowed "
                 "over layers 1-3"),
    Variant("prefix_product_narrow5", "prefix", "k_attn_product", 0, 5,
            what="prefix context, K deviation x query attention narrowed over layers 1-5 (5r, ..., r)"),
    # the two best of those, combined (a CPU probe of first-token KL pointed at it: samsum 0.101 vs 0.133)
    Variant("prefix_epic_product_narrow5", "prefix", "k_attn_product", 8, 5,
            what="prefix context, first 8 tokens of each chunk always + K deviation x query attention narrowed "
                 "over layers 1-5 (5r, ..., r)"),
    # CacheClip: a draft model's attention over the whole prompt instead of the check layer's (needs
    # kvblend frontier --draft-model; with the target itself as the draft, the signal's ceiling)
    Variant("prefix_draft_product", "prefix", "k_draft_product", 0, 1,
            what="prefix context, K deviation x the draft model's query attention over the whole prompt (CacheClip)"),
    Variant("prefix_tail_product_narrow", "prefix", "k_tail_product", 0, 3,
            what="prefix context, K deviation x attention from the query's last 16 tokens, narrowed over "
                 "layers 1-3 (samsum's long dialogue query spreads whole-query attention)"),
)
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}
BASELINE = "plain"


def main_variants() -> list[str]:
    """plain CacheBlend, prefix context alone, and the EngineConfig default."""
    from kvblend.config import EngineConfig

    return list(dict.fromkeys([BASELINE, "prefix", variant_of_config(EngineConfig()) or BASELINE]))


def without_draft(names: list[str]) -> list[str]:
    """The names whose selection needs no draft model (the draft-signal variants are asked for by name, with
    kvblend frontier --draft-model)."""
    return [n for n in names if VARIANTS[n].score_on not in ("draft_attn", "k_draft_product")]


def parse_variants(text: str) -> list[str]:
    """'all' (every variant that needs no draft model), 'main' (main_variants) or a comma-separated list of
    names -> names (baseline first, no duplicates); ValueError if unknown."""
    text = text.strip()
    names = without_draft(list(VARIANTS)) if text == "all" else main_variants() if text == "main" else \
        [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    return list(dict.fromkeys(names))


def variant_of_config(config) -> str | None:
    """The name of the variant an EngineConfig's blend settings match (None if none)."""
    for v in _ALL:
        if all(getattr(config, k) == val for k, val in v.settings().items()):
            return v.name
    return None
