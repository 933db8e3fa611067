"""PNG grids: condition | target | prediction, one row per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image


def _to_rgb(x: torch.Tensor) -> np.ndarray:
    """[C,H,W] in [-1,1] → uint8 HxWx3: 3 channels as RGB, 1 channel through viridis."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    rgb = colormaps["viridis"](x[0])[..., :3] if x.shape[0] == 1 else np.moveaxis(x[:3], 0, -1)
    return (rgb * 255).round().astype(np.uint8)


def save_grid(path: Path, columns: list[torch.Tensor], pad: int = 2) -> None:
    """Write columns of [B,C,H,W] images (same H, W) as one PNG grid."""
    rows = []
    for i in range(columns[0].shape[0]):
        cells = [_to_rgb(col[i]) for col in columns]
        h = cells[0].shape[0]
        spacer = np.full((h, pad, 3), 255, np.uint8)
        row = np.concatenate([c for cell in cells for c in (cell, spacer)][:-1], axis=1)
        rows += [row, np.full((pad, row.shape[1], 3), 255, np.uint8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(path)
