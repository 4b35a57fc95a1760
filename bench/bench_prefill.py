#!/usr/bin/env python3
"""Thin wrapper: the prefill benchmark lives in the package (`kvblend bench prefill`, kvblend/bench/prefill.py).

  PYTHONPATH=. python3 bench/bench_prefill.py --device cuda ...   ==   kvblend bench prefill --device cuda ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvblend.bench import prefill  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_prefill.py", description=prefill.__doc__.split("\n\n")[0])
    prefill.add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return prefill.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
