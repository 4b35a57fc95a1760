"""Benchmarks (`kvblend bench prefill | decode | serve`): each writes its full JSON under results/bench/ and its
target entries into docs/results/bench/summary.json (through `summary.update_summary`, never by hand)."""
