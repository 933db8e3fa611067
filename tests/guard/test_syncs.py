"""Host syncs on the per-step path: a guarded optimizer step reads the device exactly once.

Every way a tensor value reaches Python is instrumented (``item``, ``__bool__``, ``__float__``,
``__int__``, ``__index__``, ``tolist``, ``cpu``, ``numpy``) and counted while real training steps
run. Excluded, and only these: reads that torch's own optimizers make of their step counters,
which torch keeps on the CPU by design (``capturable=False``), so they never wait for a GPU.
The batches are real ones from the run's own stream, fetched before counting (the DataLoader's
index bookkeeping is host work, not a device read).
"""

from __future__ import annotations

import sys
import typing as tp
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from radiodiff_resume.config import Config
from radiodiff_resume.run import build_ldm_trainer
from radiodiff_resume.trainer.base import Trainer
from tests.checkpoint.helpers import FAST
from tests.conftest import write_random_first_stage
from tests.trainer.test_grad_scaler import accelerator_with_scaler

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
OPTIMIZER_COUNTERS = str(Path(torch.optim.__file__).parent)


class SyncCounter:
    def __init__(self) -> None:
        self.where: list[str] = []

    def __enter__(self) -> SyncCounter:
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name: str, original: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
        counter = self

        def read(tensor: torch.Tensor, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(OPTIMIZER_COUNTERS):
                counter.where.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(tensor, *args, **kwargs)

        return read


def steps_with_real_batches(trainer: Trainer, steps: int) -> None:
    per_step = trainer.loop.gradient_accumulate_every
    trainer.train_stream = iter([next(trainer.train_stream) for _ in range(steps * per_step)])  # type: ignore[assignment]


def guarded_steps_syncs(trainer: Trainer, steps: int) -> tuple[int, list[str]]:
    """``steps`` training steps on real batches: how many were taken, and where each host sync was."""
    trainer.model.train()
    steps_with_real_batches(trainer, steps)
    stepped = 0
    with SyncCounter() as syncs:
        for _ in range(steps):
            stepped += trainer.train_step().stepped
    return stepped, syncs.where


@pytest.mark.parametrize("overrides, scaler", [
    ((), False),
    (("trainer.gradient_accumulate_every=2",), False),
    (("guard.clip.mode=zscore", "guard.clip.warmup=2", "guard.loss.warmup=2"), False),
    (("guard.clip.mode=agc",), False),
    ((), True),
], ids=["default", "accumulate-2", "zscore-live", "agc", "fp16-scaler"])
def test_a_guarded_step_reads_the_device_exactly_once(
        make_cfg: tp.Callable[..., Config], overrides: tuple[str, ...], scaler: bool) -> None:
    cfg = make_cfg(*FAST, *overrides)
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, accelerator_with_scaler() if scaler else Accelerator(cpu=True))
    steps = 6
    stepped, where = guarded_steps_syncs(trainer, steps)
    assert stepped == steps, "a clean run: every step taken"
    assert len(where) == steps, "\n".join(where)
    assert all("guard/policy.py" in w for w in where), where


def test_the_counter_sees_a_read() -> None:
    """The instrument itself: an ``if tensor`` in our code is counted."""
    with SyncCounter() as syncs:
        if torch.ones(()) > 0:
            pass
        float(torch.ones(()))
    assert len(syncs.where) == 2


@pytest.mark.slow
@pytest.mark.parametrize("guard", ["true", "false"], ids=["guarded", "guards-off"])
def test_one_collective_per_step_carries_the_stop(tmp_path: Path, synth_cache: Path, guard: str) -> None:
    """A real 2-process run (gloo): every step's collectives from Python, counted by wrapping
    ``torch.distributed`` in the child, are one all-reduce — the guard's, which carries the stop flag
    (with the guards off, the flag's own). Rank 1 alone gets a SIGUSR1 during step 4's all-reduce
    (after it took its flag): both ranks agree on step 5's and stop after step 5, rank 0 naming rank
    1's signal."""
    import json

    import yaml

    from radiodiff_resume.config import build_config
    from tests.conftest import REPO, tiny_raw
    from tests.trainer.count_collectives import SIGNAL_AFTER
    from tests.trainer.test_multiprocess import accelerate_launch

    raw = tiny_raw(tmp_path / "run", synth_cache)
    raw["trainer"].update(train_num_steps=12, save_and_sample_every=12, val_batches=0, log_freq=12)
    raw["checkpoint"] = {"every": 12}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    write_random_first_stage(build_config(raw))
    out = tmp_path / "out"
    out.mkdir()
    proc = accelerate_launch(str(REPO / "tests" / "trainer" / "count_collectives.py"), str(cfg), str(out),
                             f"guard.enabled={guard}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    stop_at = SIGNAL_AFTER + 2
    for record in ranks:
        assert record["stopped"] == stop_at, record
        for step in range(1, stop_at - 1):  # steps 2..4: no start-up, no stop in them
            assert record["per_step"][str(step)] == ["all_reduce"], (step, record["per_step"])
    assert "SIGUSR1 on rank 1" in ranks[0]["message"], ranks[0]["message"]
