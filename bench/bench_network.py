"""RadioDiff's network beside the default one: one training step and one 1-step sample at 256×256, batch 1.

Both LDMs are built by the same builder ``train`` uses, from the shipped configs (``configs/radiodiff.yaml``:
RadioDiff's Swin-conditioned U-Net and objective; ``configs/radio_train.yaml``: the diffusers U-Net with
a CNN condition encoder), with random weights (the figures do not depend on their values). The two are
measured round by round in one process; the ``bench_network`` section of ``bench/RESULTS.md`` gives each
median and the ratio measured in the same invocation (speed is measured, never asserted).

    python bench/bench_network.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
import typing as tp
from pathlib import Path

import torch
from results import cpu_model, write_section

from radiodiff_resume.build import build_first_stage, build_ldm
from radiodiff_resume.config import load_config
from radiodiff_resume.models.ldm import ConditionalLDM

REPO = Path(__file__).resolve().parents[1]
NETWORKS = {
    "RadioDiff (RadioDiffUNet, Swin-B condition encoder, const-SDE)": REPO / "configs" / "radiodiff.yaml",
    "default (diffusers UNet2DModel + CNN condition encoder, DDPM)": REPO / "configs" / "radio_train.yaml",
}
OVERRIDES = ["data.root=/nonexistent", "model.unet.params.cond_weights=none"]


def build(path: Path) -> tuple[ConditionalLDM, torch.optim.Optimizer]:
    overrides = OVERRIDES if "radiodiff.yaml" in path.name else OVERRIDES[:1]
    cfg = load_config(path, overrides)
    torch.manual_seed(0)
    ldm = build_ldm(cfg, build_first_stage(cfg))
    params = [p for p in ldm.trainable_modules().parameters() if p.requires_grad]
    return ldm, torch.optim.AdamW(params, lr=1e-5)


def train_step(ldm: ConditionalLDM, optimizer: torch.optim.Optimizer, image: torch.Tensor,
               cond: torch.Tensor) -> None:
    ldm.train()
    loss = ldm(image, cond, generator=torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sample(ldm: ConditionalLDM, cond: torch.Tensor) -> None:
    ldm.eval()
    with torch.no_grad():
        ldm.sample(cond, generator=torch.Generator().manual_seed(0), steps=1)


def seconds(fn: tp.Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md",
                        help="results file; only its bench_network section is replaced")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = torch.rand(1, 1, 256, 256) * 2 - 1
    cond = torch.rand(1, 3, 256, 256) * 2 - 1
    built = {name: build(path) for name, path in NETWORKS.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "sample": []} for name in built}
    for round_ in range(args.repeats + 1):  # round 0 warms up and is not counted
        for name, (ldm, optimizer) in built.items():
            step = seconds(lambda ldm=ldm, optimizer=optimizer: train_step(ldm, optimizer, image, cond))
            drawn = seconds(lambda ldm=ldm: sample(ldm, cond))
            if round_:
                times[name]["train"].append(step)
                times[name]["sample"].append(drawn)
    radiodiff, default = built
    rows = []
    for name, (ldm, _) in built.items():
        unet = sum(p.numel() for p in ldm.unet.parameters())
        cond_encoder = sum(p.numel() for p in ldm.cond_encoder.parameters())
        trained = sum(p.numel() for p in ldm.trainable_modules().parameters() if p.requires_grad)
        median = {k: statistics.median(v) for k, v in times[name].items()}
        rows.append(f"| {name} | {unet:,} | {cond_encoder:,} | {trained:,} | {median['train']:.2f} | "
                    f"{median['sample']:.2f} |")
    ratio = {k: statistics.median(times[radiodiff][k]) / statistics.median(times[default][k])
             for k in ("train", "sample")}
    body = "\n".join([
        "## RadioDiff's network beside the default (`bench/bench_network.py`)",
        "",
        f"{dt.date.today()}, {cpu_model()}, {args.threads} threads, torch {torch.__version__}, float32, "
        f"batch 1, 256×256 maps, median of {args.repeats} rounds after one warm-up round, both networks "
        "measured round by round in one process. Training step: loss, backward and AdamW step. Sample: "
        "one sampling step (RadioDiff's sampler calls the U-Net twice: the step and the final one to 0). "
        "Not measured on a GPU.",
        "",
        "| network | U-Net parameters | condition encoder (separate) | trained | training step (s) | "
        "1-step sample (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"RadioDiff / default, same run: training step {ratio['train']:.2f}×, 1-step sample "
        f"{ratio['sample']:.2f}×.",
    ])
    write_section(args.out, "bench_network", body)
    print(body)


if __name__ == "__main__":
    main()
