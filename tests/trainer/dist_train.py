"""Run under ``accelerate launch``: train a tiny config, then each rank writes a digest of
its full model state (parameters and buffers) so the test can compare ranks."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from radiodiff_resume.config import load_config
from radiodiff_resume.run import make_accelerator, train


def digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def main() -> None:
    cfg_path, out, *overrides = sys.argv[1:]
    cfg = load_config(cfg_path, overrides)
    accelerator = make_accelerator(cfg)
    trainer = train(cfg, accelerator)
    rank = accelerator.process_index
    first_batch = trainer.train_stream.rank_batches(0)[0]
    record = {
        "world_size": accelerator.num_processes,
        "model": digest(trainer.ldm.state_dict()),
        "ema": [hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in trainer.ema.shadow_params],
        "first_batch": first_batch,
        "scale_factor": float(trainer.ldm.scale_factor),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
