"""What the checkpointer needs from a trainer: state dicts, the probe, a few facts.

A protocol rather than the ``Trainer`` class, so the checkpoint package does not import the
trainer (which imports it) and any object with these members can be checkpointed. The trainer
answers from its parts (``trainer/parts.py``: the state dicts) and its probe (``trainer/probe.py``).
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from radiodiff_resume.checkpoint.manifest import Manifest
from radiodiff_resume.config import LoopConfig

Tensors = tp.Mapping[str, torch.Tensor]
ProbeOf = tp.Callable[[Tensors, Tensors], torch.Tensor]
"""``(model_state, inputs) -> probe``: the probe of the model holding ``model_state``."""


class Counters(tp.Protocol):
    step: int


class Checkpointable(tp.Protocol):
    stage: str
    results_folder: Path
    loop: LoopConfig
    state: Counters
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    run_config: dict[str, tp.Any]
    config_yaml: str
    config_hash: str

    @property
    def unwrapped(self) -> nn.Module: ...

    def sync_buffers(self) -> None: ...

    def state_dict(self) -> dict[str, tp.Any]: ...

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None: ...

    def rank_state_dict(self) -> dict[str, tp.Any]: ...

    def load_rank_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None: ...

    def reseed_rank(self, step: int) -> None: ...

    def probe_inputs(self) -> dict[str, torch.Tensor]: ...

    def probe_value(self, inputs: tp.Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def probe_later(self) -> ProbeOf:
        """On the training thread: ready a function ``(model_state, inputs) -> probe`` that computes, on
        any thread, the probe of the model holding ``model_state`` (a CPU snapshot of
        ``state_dict()["model"]``) without touching the training module."""
        ...

    def probe_dtype(self) -> str: ...

    def scale_factor_value(self) -> float | None: ...

    def resume_conflict(self, manifest: Manifest) -> str | None: ...
