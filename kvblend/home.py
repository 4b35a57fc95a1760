"""$KVBLEND_HOME: the folder of converted models, the chunk store and kept decisions (default ~/.cache/kvblend).

Torch-free and importing nothing of kvblend, so any module can find the home without an import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path


def kvblend_home() -> Path:
    return Path(os.environ.get("KVBLEND_HOME", Path.home() / ".cache" / "kvblend")).expanduser()
