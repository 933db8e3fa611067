"""What both RadioDiff data test modules take from upstream: its map shuffle (its own calls, run in a
fresh interpreter so this process's global RNG is not used) and fewer transmitters per map."""

from __future__ import annotations

RADIODIFF_SHUFFLE = (
    "import json, numpy as np\n"
    "maps_inds = np.arange(0, 700, 1, dtype=np.int16)\n"
    "np.random.seed(42)\n"
    "np.random.shuffle(maps_inds)\n"
    "print(json.dumps([int(i) for i in maps_inds]))\n"
)
"""RadioDiff's own calls (``lib/loaders.py``, ``RadioUNet_c``)."""

TX = 2
"""Transmitters per map in the test folders: RadioDiff's 80 would be 8,000+ files (slow on a busy disk),
so :data:`RADIODIFF_TX_PER_MAP` is patched to this while the folders are read."""
