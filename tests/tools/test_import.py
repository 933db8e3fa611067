"""``radiodiff-resume import``: a folder written by accelerate's own ``save_state`` after a short real
training of a diffusers denoiser (AdamW, LambdaLR, a diffusers ``EMAModel`` saved with
``save_pretrained`` as the diffusers examples do) becomes a verified checkpoint that ``train`` resumes,
bit for bit in weights, optimizer state and EMA. Files that would run code when unpickled are refused
before any of it runs."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from radiodiff_resume.build import (
    build_datasets,
    build_first_stage,
    build_ldm,
    dataset_root,
    load_first_stage_weights,
)
from radiodiff_resume.checkpoint.verify import open_checkpoint
from radiodiff_resume.cli import main
from radiodiff_resume.config import build_config
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.tools.conftest import RunsCode

STEPS = 3
"""Optimizer steps of the source training; our ``train`` then continues it to ``trainer.train_num_steps``."""


@dataclass
class Source:
    cfg: Path
    folder: Path
    names: list[str]
    """Our trainable parameters in our optimizer's order (condition encoder, then denoiser)."""
    optimizer: dict[str, tp.Any]
    ema: list[torch.Tensor]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Source:
    """What a diffusers-example user has: their UNet trained for a few steps with a plain Accelerator."""
    root = tmp_path_factory.mktemp("import")
    raw = tiny_raw(root / "unused", synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(root / "ae.safetensors")
    raw["trainer"].update(train_num_steps=6, save_and_sample_every=6, val_batches=0, log_freq=3)
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    cfg = build_config(raw)
    first_stage = build_first_stage(cfg)
    load_first_stage_weights(first_stage, write_random_first_stage(cfg))
    torch.manual_seed(123)  # their own initialisation, not that of a fresh run of our config
    ldm = build_ldm(cfg, first_stage)
    ldm.cond_encoder.requires_grad_(False)
    unet = ldm.unet
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    ema = EMAModel(unet.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=unet.config)
    train_set, _ = build_datasets(cfg, dataset_root(cfg))
    batches = (b for _ in range(STEPS) for b in DataLoader(train_set, batch_size=4, shuffle=True))
    for _, batch in zip(range(STEPS), batches, strict=False):
        accelerator.backward(ldm(batch["image"], batch["cond"]))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
    folder = root / "accelerate-state"
    accelerator.save_state(str(folder))
    ema.save_pretrained(str(folder / "unet_ema"))
    names = {id(p): n for n, p in ldm.named_parameters()}
    return Source(root / "tiny.yaml", folder, [names[id(p)] for p in ldm.trainable_modules().parameters()],
                  optimizer.state_dict(), [t.clone() for t in ema.shadow_params])


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "radiodiff_resume.cli", *map(str, args)], capture_output=True, text=True,
        timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def import_here(capsys: pytest.CaptureFixture[str], src: Path, cfg: Path, out: Path,
                *overrides: str) -> tuple[int, str, str]:
    """The CLI in this process (faster than a subprocess where no run follows)."""
    code = main(["import", str(src), "--cfg", str(cfg), "--out", str(out), *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_import_is_exact_and_train_resumes_from_it(source: Source, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, report, err = import_here(capsys, source.folder, source.cfg, out)
    assert code == 0, err[-3000:]
    unet = load_file(str(source.folder / "model.safetensors"))
    assert f"model.safetensors ({len(unet)} tensors) → unet" in report
    assert "down_blocks.*" in report and "→ unet.down_blocks.*" in report
    assert f"← model.first_stage.ckpt_path {source.cfg.parent / 'ae.safetensors'}" in report
    assert "cond_encoder.*" in report and "initialised as a fresh run of this config" in report
    assert "measured by model.scale_by_std" in report
    assert f"step: {STEPS} (optimizer.bin per-parameter step {STEPS} = scheduler.bin last_epoch)" in report
    assert "weight_decay: 0.01 in the source, 0.0001 in this run" in report
    assert f"EMA: unet_ema/ ({len(unet)} parameters) → our EMA of unet (optimization_step {STEPS})" in report
    assert "random_states_0.pkl read with torch's weights-only unpickler" in report and "not in RNG" in report
    assert f"trainer.results_folder={out}" in report.splitlines()[-1]

    ckpt = open_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}", "ldm")  # hashes, structure
    assert ckpt.manifest.step == STEPS and ckpt.manifest.provenance[0].startswith("imported by")
    model, shared = ckpt.shared["model"], ckpt.shared
    assert all(torch.equal(model[f"unet.{k}"], v) for k, v in unet.items())
    assert float(model["scale_factor"]) != 1.0
    ours = {n: i for i, n in enumerate(source.names)}
    unet_names = [n for n in source.names if n.startswith("unet.")]
    for i, name in enumerate(unet_names):
        theirs, mine = source.optimizer["state"][i], shared["optimizer"]["state"][ours[name]]
        assert all(torch.equal(theirs[k], mine[k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
        assert torch.equal(shared["ema"]["shadow_params"][ours[name]], source.ema[i]), name
    stepped = [source.names[j] for j in shared["optimizer"]["state"]]
    assert len(stepped) == len(unet_names) and not any(n.startswith("cond_encoder.") for n in stepped)
    assert shared["ema"]["optimization_step"] == STEPS

    proc = cli("train", "--cfg", source.cfg, f"trainer.results_folder={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "imported"] == [STEPS]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [STEPS]
    assert [e["step"] for e in events if e["event"] == "checkpoint_saved"] == [STEPS, 6]
    assert (out / "final" / "model_ema.safetensors").is_file()


def test_several_models_wrapped_names_and_no_ema(source: Source, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """model_1.safetensors holds the denoiser under DDP and torch.compile names, model.safetensors a
    frozen model of theirs that is not ours; without an EMA folder ours starts from the imported weights."""
    folder = tmp_path / "state"
    shutil.copytree(source.folder, folder, ignore=shutil.ignore_patterns("unet_ema", "model.safetensors"))
    unet = load_file(str(source.folder / "model.safetensors"))
    save_file({f"module._orig_mod.{k}": v for k, v in unet.items()}, str(folder / "model_1.safetensors"))
    save_file({"proj.weight": torch.ones(3, 3)}, str(folder / "model.safetensors"))
    code, out, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 0, err
    assert (f"model_1.safetensors ({len(unet)} tensors) → unet; removed _orig_mod. (torch.compile), "
            "module. (DDP)") in out
    assert "model.safetensors (1 tensors): it fits no part of our model" in out
    assert "EMA: none in the source; ours starts from the imported online weights" in out
    assert "at step 3 by this config's schedule (trainer.lr_schedule=radiodiff, trainer.lr, warm-up)" in out
    model = load_file(str(tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
    assert all(torch.equal(model[f"unet.{k}"], v) for k, v in unet.items())

    code, _, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "already holds step-00000003" in err


def test_diffusers_save_hook_layout(source: Source, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The diffusers examples' save hook pops the weights from save_state and writes unet/ instead."""
    folder = tmp_path / "state"
    shutil.copytree(source.folder, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "unet").mkdir()
    shutil.copy(source.folder / "model.safetensors", folder / "unet" / "diffusion_pytorch_model.safetensors")
    code, out, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 0, err
    assert f"unet/ ({len(load_file(str(source.folder / 'model.safetensors')))} tensors) → unet" in out


@pytest.mark.parametrize("name, dump", [
    ("optimizer.bin", torch.save),
    ("scaler.pt", torch.save),
    ("random_states_0.pkl", lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2))),
    ("random_states_0.pkl", lambda obj, path: path.write_bytes(pickle.dumps(obj))),
])
def test_a_pickle_that_runs_code_is_refused_unrun(source: Source, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], name: str,
                                                 dump: tp.Callable[[tp.Any, Path], None]) -> None:
    folder = tmp_path / "state"
    shutil.copytree(source.folder, folder)
    marker = tmp_path / "code-ran"
    dump({"state": RunsCode(marker)}, folder / name)
    code, out, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"refusing {folder / name}: reading it needs full unpickling" in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists(), "refused before anything was built or written"


def test_user_errors_are_one_line(source: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = import_here(capsys, tmp_path / "missing", source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "missing does not exist" in err

    (tmp_path / "empty").mkdir()
    code, _, err = import_here(capsys, tmp_path / "empty", source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "is not an accelerate save_state folder" in err

    code, _, err = import_here(capsys, source.folder, source.cfg, tmp_path / "run",
                               f"model.first_stage.ckpt_path={tmp_path / 'ae.safetensors'}")
    assert code == 2 and err.count("\n") == 1 and "model.first_stage.ckpt_path" in err, err
    assert "never trains a first stage" in err

    for shard in ("pytorch_model_fsdp_0", "optimizer_0"):  # what FSDP's save_state writes
        (tmp_path / "fsdp" / shard).mkdir(parents=True)
    shutil.copy2(source.folder / "random_states_0.pkl", tmp_path / "fsdp")
    code, _, err = import_here(capsys, tmp_path / "fsdp", source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "accelerate merge-weights" in err, err

    code, _, err = import_here(capsys, source.folder, source.cfg, tmp_path / "run",
                               "model.unet.params.block_out_channels=[24,24]")
    assert code == 2 and err.count("\n") == 1, err
    assert "tensor conv_in.bias is (16,) torch.float32 in the source, our unet.conv_in.bias is (24,)" in err


def test_files_that_are_not_what_they_claim_are_one_line(source: Source, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A text file named optimizer.bin, and an EMA config.json nested 100 000 deep: one line each, exit 2
    (they used to end in an IndexError and a RecursionError traceback)."""
    text = tmp_path / "text"
    shutil.copytree(source.folder, text)
    (text / "optimizer.bin").write_text("Run 3: optimizer state lost, see the log\n")
    code, _, err = import_here(capsys, text, source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{text / 'optimizer.bin'} is not a readable torch file" in err and "runs whatever code" not in err

    deep = tmp_path / "deep"
    shutil.copytree(source.folder, deep)
    (deep / "unet_ema" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = import_here(capsys, deep, source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{deep / 'unet_ema' / 'config.json'} is nested too deeply" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_plain_pickle_is_not_said_to_run_code(source: Source, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], protocol: int) -> None:
    """Plain data pickled without torch.save names no code: the message says it is not a torch file, and
    does not claim code that is not there; the same scan still names code that is."""
    folder = tmp_path / "state"
    shutil.copytree(source.folder, folder)
    (folder / "optimizer.bin").write_bytes(pickle.dumps({"state": {}, "param_groups": []}, protocol=protocol))
    code, _, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    assert "holds pickled data that would run no code" in err and "runs whatever code" not in err, err

    marker = tmp_path / "code-ran"
    (folder / "optimizer.bin").write_bytes(pickle.dumps({"state": RunsCode(marker)}, protocol=protocol))
    code, _, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 2 and "runs whatever code the file carries (it calls io.open)" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("version, refused", [
    ("2.1.2", True), ("2.5.1+cu121", True), ("2.9.1", True), ("2.10.0a0+git1234abc", True),
    ("2.10.0", False), ("2.10.1+cu128", False), ("2.13.0+cpu", False), ("3.0.0", False),
])
def test_foreign_pickles_need_a_torch_without_known_bypasses(version: str, refused: bool) -> None:
    from radiodiff_resume.compat.torch_files import unpickler_refusal

    reason = unpickler_refusal(version)
    assert (reason is not None) == refused
    if reason is not None:
        assert f"needs torch >= 2.10, this is torch {version}" in reason and "CVE-2026-24747" in reason


def test_an_older_torch_reads_no_foreign_pickle(source: Source, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """torch 2.9 as far as the import can tell: refused before the pickle is opened, in one line."""
    folder = tmp_path / "state"
    shutil.copytree(source.folder, folder)
    marker = tmp_path / "code-ran"
    torch.save({"state": RunsCode(marker)}, folder / "optimizer.bin")
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu126")
    code, _, err = import_here(capsys, folder, source.cfg, tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{folder / 'optimizer.bin'}: reading it needs torch >= 2.10, this is torch 2.9.1+cu126" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
