"""The probe: a fixed scalar that the state of a stage computes on inputs stored with its checkpoint,
recorded at save and compared at load, so a checkpoint that loads but does not compute what was saved
is caught. The stage says what the inputs and the scalar are (``make_inputs``, ``function``).
"""

from __future__ import annotations

import copy
import typing as tp

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset

from radiodiff_resume.checkpoint.protocol import Tensors
from radiodiff_resume.guard.sanitize import finite_batch
from radiodiff_resume.trainer.state import derive_seed

PROBE_SAMPLES = 1
"""One sample: the scalar depends on every weight the forward reads, so one catches a wrong load as two
did (the probe tests in tests/checkpoint and tests/torture hold with it), and the forward is the largest
part of what a background save blocks and of what load adds to ``load_state``."""


class Probe:
    """The probe of one stage: its inputs (built once) and its value on a module."""

    def __init__(self, accelerator: Accelerator, val_set: Dataset, seed: int, stage: str,
                 make_inputs: tp.Callable[[dict[str, tp.Any], torch.Generator], dict[str, torch.Tensor]],
                 function: tp.Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        self.accelerator = accelerator
        self.val_set = val_set
        self.seed = seed
        self.stage = stage
        self.make_inputs = make_inputs
        self.function = function
        self._inputs: dict[str, torch.Tensor] | None = None
        self._on_device: dict[str, torch.Tensor] | None = None
        self._twin: nn.Module | None = None

    def inputs(self) -> dict[str, torch.Tensor]:
        """What the probe runs on: the first validation samples and fixed noise (CPU tensors).

        Stored in every checkpoint, so verifying it never depends on today's data or config.
        """
        if self._inputs is None:
            samples = finite_samples(self.val_set, PROBE_SAMPLES)
            batch = finite_batch(torch.utils.data.default_collate(samples))[0]
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.stage, "probe"))
            self._inputs = self.make_inputs(batch, generator)
        return self._inputs

    def dtype(self) -> str:
        """The autocast dtype the probe really ran in (accelerate ignores fp16 on a CPU)."""
        if not self.accelerator.native_amp:
            return "float32"
        return {"fp16": "float16", "bf16": "bfloat16"}.get(self.accelerator.mixed_precision, "float32")

    def value(self, module: nn.Module, inputs: tp.Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The probe of ``module``'s current state on ``inputs``, in eval mode under the run's autocast.
        No host sync on a GPU: the stored inputs are kept on the device after their first use (a copy
        from pageable memory would wait for the stream), and the value stays on the device."""
        was_training = module.training
        module.eval()
        with torch.no_grad(), self.accelerator.autocast():
            value = self.function(module, self._device_inputs(inputs)).double()
        module.train(was_training)
        return value

    def twin(self, module: nn.Module) -> nn.Module:
        """A second instance of ``module`` whose state is assigned, not copied, by :meth:`value_of`:
        made once by a deep copy in which every tensor of the state is an empty meta tensor, so it
        costs no memory for the state. Call it on the training thread (it reads ``module``)."""
        if self._twin is None:
            memo: dict[int, tp.Any] = {}
            for tensor in module.state_dict(keep_vars=True).values():
                empty = torch.empty_like(tensor, device="meta")
                if isinstance(tensor, nn.Parameter):
                    empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
                memo[id(tensor)] = empty
            self._twin = copy.deepcopy(module, memo).eval()
        return self._twin

    def value_of(self, state: Tensors, inputs: Tensors) -> torch.Tensor:
        """The probe of the twin holding ``state`` (a CPU snapshot of the module's ``state_dict``,
        whose tensors it then shares): what :meth:`value` gives on a module loaded with ``state``,
        computed off the training thread while the module itself trains on. CPU runs only."""
        twin = tp.cast(nn.Module, self._twin)
        twin.load_state_dict(state, assign=True)
        return self.value(twin, inputs)

    def _device_inputs(self, inputs: tp.Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if inputs is not self._inputs:
            return {k: v.to(self.accelerator.device) for k, v in inputs.items()}
        if self._on_device is None:
            self._on_device = {k: v.to(self.accelerator.device) for k, v in inputs.items()}
        return self._on_device


def finite_samples(dataset: Dataset, n: int) -> list[dict[str, tp.Any]]:
    """The first ``n`` samples of ``dataset`` without NaN/Inf (the first ``n`` if there are not enough)."""
    size = len(dataset)  # type: ignore[arg-type]
    chosen = []
    for i in range(size):
        item = dataset[i]
        floats = [v for v in item.values() if torch.is_tensor(v) and v.is_floating_point()]
        if all(torch.isfinite(v).all() for v in floats):
            chosen.append(item)
        if len(chosen) == n:
            return chosen
    return [dataset[i] for i in range(min(n, size))]
