"""Answer quality beyond plain CacheBlend: the frontier suite (`kvblend frontier`), its named variants,
statistics, plots and the docs/QUALITY.md report. Importing this package does not import torch."""
