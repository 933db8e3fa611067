"""``doctor`` given a folder that is not a checkpoint: one line saying what it is, exit 2, never a raw
``[Errno 2]`` in a failed check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from radiodiff_resume.cli import main


def test_a_final_weights_folder_is_not_a_checkpoint(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    final = tmp_path / "run" / "final"  # what the LDM trainer writes at the end of a run
    final.mkdir(parents=True)
    for name in ("model.safetensors", "model_ema.safetensors"):
        save_file({"unet.conv_in.weight": torch.ones(2, 2)}, str(final / name), metadata={"step": "4"})
    assert main(["doctor", str(final)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    assert captured.err.startswith(f"error: {final} is not a checkpoint folder (no manifest.json, no "
                                   "config.yaml: its .safetensors are weights only")
    assert "Errno" not in captured.err
