"""Metrics: one JSON line per record in ``metrics.jsonl``, mirrored to accelerate's trackers
(:mod:`radiodiff_resume.trainer.trackers`), and a PNG of the curves at the end of a run.

Only finite numbers are written as numbers; anything else is recorded as ``null``
with the key listed under ``invalid``, so a NaN can never pass for a real value.
"""

from __future__ import annotations

import json
import math
import time
import typing as tp
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from radiodiff_resume.io import MAX_LOG_BYTES, append_line, json_objects, read_regular  # noqa: E402
from radiodiff_resume.trainer.trackers import TrackerLog  # noqa: E402


class LogInterval:
    """Loss and gradient-norm sums since the last log line; the loss stays on the device, read (a host
    sync) only when a line is written."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0
        self.grad_norms: list[float] = []

    def add(self, loss: torch.Tensor, grad_norm: float | None) -> None:
        self.loss_sum += loss
        self.count += 1
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """The interval's mean loss (over every rank) and mean finite gradient norm (when any)."""
        values = {"loss": accelerator.reduce(self.loss_sum / self.count, "mean").item()}
        if self.grad_norms:
            values["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        return values

    def clear(self) -> None:
        """Empty the sums (after a log line, and after a rollback discarded the steps they hold)."""
        self.loss_sum.zero_()
        self.count = 0
        self.grad_norms.clear()


class RunLog:
    """Writes metrics from the main process; other ranks hold a no-op instance."""

    def __init__(self, folder: Path, accelerator: Accelerator, name: str, enabled: bool) -> None:
        self.path = folder / "metrics.jsonl"
        self.name = name
        self.enabled = enabled
        """Whether this process writes (the main process, unless the run is read-only)."""
        if self.enabled:
            folder.mkdir(parents=True, exist_ok=True)
        tracked = self.enabled and bool(accelerator.trackers)
        self.trackers = TrackerLog(accelerator, name, self.records() if tracked else (), tracked)

    def write(self, step: int, values: tp.Mapping[str, tp.Any]) -> None:
        clean: dict[str, tp.Any] = {}
        invalid = []
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                clean[k] = None
                invalid.append(k)
            else:
                clean[k] = v
        record = {"stage": self.name, "step": step, "time": round(time.time(), 3), **clean}
        if invalid:
            record["invalid"] = invalid
        if self.enabled:
            append_line(self.path, json.dumps(record) + "\n")
        self.trackers.log(step, clean)

    def records(self) -> list[dict[str, tp.Any]]:
        """This stage's records; a line that is not a JSON object (a torn last line) is skipped."""
        try:
            data = read_regular(self.path, MAX_LOG_BYTES)
        except FileNotFoundError:
            return []
        return [r for r in json_objects(data) if r.get("stage") == self.name]

    def plot(self, path: Path) -> None:
        """Training loss and validation metrics against step, as a PNG."""
        if not self.enabled:
            return
        records = self.records()
        loss = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        val_keys = sorted({k for r in records for k in r if k.startswith("val/")} - {
            "val/evaluated", "val/total", "val/valid"})
        fig, axes = plt.subplots(1, 1 + bool(val_keys), figsize=(6 + 5 * bool(val_keys), 4),
                                 squeeze=False)
        ax = axes[0][0]
        if loss:
            ax.plot(*zip(*loss, strict=True), marker=".")
            ax.set_yscale("log")
        ax.set(title=f"{self.name}: training loss", xlabel="step", ylabel="loss")
        if val_keys:
            vax = axes[0][1]
            for k in val_keys:
                pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
                if pts:
                    vax.plot(*zip(*pts, strict=True), marker="o", label=k.removeprefix("val/"))
            vax.set(title=f"{self.name}: validation", xlabel="step")
            vax.set_yscale("symlog", linthresh=1e-2)
            vax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
