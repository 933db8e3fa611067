"""Faults injected for real, through the plug-in points a user has (``data.train``,
``model.unet``): datasets that yield NaN / Inf / huge values at chosen indices, and a denoiser
that produces an Inf loss, a loss spike, a NaN gradient or a lasting change of the loss level at
chosen training forwards.
"""

from __future__ import annotations

import os
import typing as tp

import torch
from diffusers import UNet2DModel
from torch.utils.data import Dataset

from radiodiff_resume.data.radiomapseer import RadioMapSeer


class FaultyMaps(Dataset):
    """RadioMapSeer with faults at fixed indices: ``nan_image`` (one NaN pixel), ``inf_cond``
    (one +Inf condition value), ``scaled`` (the whole image times 1e6), ``scaled_cond`` (the whole
    condition times 1e6)."""

    def __init__(self, root: str, split: str = "train", nan_image: tp.Sequence[int] = (),
                 inf_cond: tp.Sequence[int] = (), scaled: tp.Sequence[int] = (),
                 scaled_cond: tp.Sequence[int] = (), **params: tp.Any) -> None:
        self.inner = RadioMapSeer(root, split=split, **params)
        self.nan_image, self.inf_cond, self.scaled = set(nan_image), set(inf_cond), set(scaled)
        self.scaled_cond = set(scaled_cond)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, tp.Any]:
        item = dict(self.inner[index])
        if index in self.nan_image:
            item["image"] = item["image"].clone()
            item["image"][0, 3, 5] = float("nan")
        if index in self.inf_cond:
            item["cond"] = item["cond"].clone()
            item["cond"][1, 2, 2] = float("inf")
        if index in self.scaled:
            item["image"] = item["image"] * 1e6
        if index in self.scaled_cond:
            item["cond"] = item["cond"] * 1e6
        return item


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx: tp.Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: tp.Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


class FaultyUNet(UNet2DModel):
    """A diffusers ``UNet2DModel`` that misbehaves at chosen training forwards (1-based count of
    forwards in train mode of this process): ``inf_loss_at`` (output Inf), ``spike_at`` (output
    times 1e3), ``nan_grad_at`` (NaN gradient), ``shift_from`` (output plus ``shift`` from that forward
    on: the loss rises to a new level for good, the gradients stay well-behaved). ``only_rank`` limits
    the faults to one rank."""

    def __init__(self, *args: tp.Any, inf_loss_at: tp.Sequence[int] = (), spike_at: tp.Sequence[int] = (),
                 nan_grad_at: tp.Sequence[int] = (), shift_from: int | None = None, shift: float = 3.0,
                 only_rank: int | None = None, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = {"inf": set(inf_loss_at), "spike": set(spike_at), "nan_grad": set(nan_grad_at)}
        self.shift_from, self.shift = shift_from, shift
        self.only_rank = only_rank
        self.training_calls = 0

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        out = super().forward(*args, **kwargs)
        if not self.training:
            return out
        self.training_calls += 1
        if self.only_rank is not None and int(os.environ.get("RANK", "0")) != self.only_rank:
            return out
        n, sample = self.training_calls, out.sample
        if n in self.faults["inf"]:
            sample = sample * float("inf")
        if n in self.faults["spike"]:
            sample = sample * 1e3
        if n in self.faults["nan_grad"]:
            sample = _PoisonGrad.apply(sample)
        if self.shift_from is not None and n >= self.shift_from:
            sample = sample + self.shift
        out.sample = sample
        return out
