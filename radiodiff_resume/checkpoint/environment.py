"""What a numerical result depends on besides the state: device, kernels, library builds, flags.

The probe is compared bit for bit only when this fingerprint is identical; a requeued
job on another node, GPU model, driver or torch build gets the tolerance instead, with
the differences named in the log.
"""

from __future__ import annotations

import functools
import platform
import typing as tp
from importlib import metadata
from pathlib import Path

import torch


def fingerprint(device: torch.device) -> dict[str, str]:
    """The environment a forward pass on ``device`` runs in, as strings (JSON-stable)."""
    env = {
        "device_type": device.type,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "deterministic": str(torch.are_deterministic_algorithms_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        env.update({
            "gpu": torch.cuda.get_device_name(index),
            "gpu_capability": f"{major}.{minor}",
            "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()),
            "cudnn_deterministic": str(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": str(torch.backends.cudnn.benchmark),
            "tf32_matmul": str(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": str(torch.backends.cudnn.allow_tf32),
        })
    return env


def differences(saved: tp.Mapping[str, str], now: tp.Mapping[str, str]) -> list[str]:
    """``key: saved → now`` for every entry that differs (missing on either side included)."""
    return [f"{k}: {saved.get(k, '-')} → {now.get(k, '-')}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


@functools.cache
def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@functools.cache
def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "accelerate", "diffusers", "safetensors", "radiodiff-resume"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
