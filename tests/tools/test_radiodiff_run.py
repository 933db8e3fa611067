"""A whole RadioDiff LDM run in and out: ``radiodiff-resume import model-N.pt`` of upstream's own file, one
real ``train`` step from the imported checkpoint, and ``radiodiff-resume export`` back to upstream's format.

The file is the reference fixture's ``model-60.pt`` (``tests/fixtures/radiodiff_reference/make_model_pt.py``:
upstream's ``Trainer.save`` layout at step 12000, 4.15 GiB; written once per session into a temporary folder
and deleted after), read with the config translated from a RadioDiff yaml
(``tests/compat/fixtures/radiodiff_ldm.yaml``) on synthetic 256 px maps. Every expectation comes from the
fixture (``keys.json``, the file itself) or from upstream's formulas, never from the code under test. The
full network has 225M parameters: the heavy commands run as subprocesses, one import of each file, one
``train`` step (about 50 s on 2 cores) and two exports of the full file.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from radiodiff_resume.checkpoint.verify import Checkpoint, open_checkpoint
from radiodiff_resume.cli import main
from radiodiff_resume.compat.radiodiff_ckpt import AUTOENCODER, to_diffusers
from radiodiff_resume.compat.radiodiff_ldm import step_from_name
from radiodiff_resume.config import load_config
from radiodiff_resume.data.synthetic import ensure_synthetic
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import sha256_file
from tests.conftest import REPO
from tests.models import oracle
from tests.models.test_radiodiff_parity import RADIODIFF_AUTOENCODER

pytestmark = pytest.mark.slow

Tensors = dict[str, torch.Tensor]
LDM_YAML = REPO / "tests" / "compat" / "fixtures" / "radiodiff_ldm.yaml"
MAKE = oracle.FOLDER / "make_model_pt.py"
FS, UNET, ONLINE, AVERAGE = "first_stage_model.", "model.", "online_model.", "ema_model."
STEP = 12000
"""make_model_pt.py's default step."""
TIMEOUT = 900


# ----- the RadioDiff files and our run's config ----------------------------------------------------


def make_model_pt(folder: Path, *args: str) -> Path:
    folder.mkdir(parents=True)
    subprocess.run([sys.executable, str(MAKE), "--out", str(folder), *args], check=True, timeout=TIMEOUT,
                   capture_output=True)
    (path,) = folder.glob("model-*.pt")
    return path


@pytest.fixture(scope="session")
def full_pt(tmp_path_factory: pytest.TempPathFactory) -> tp.Iterator[Path]:
    """Upstream's ``model-60.pt`` saved with ``enable_resume: True``: step, model, opt, lr_scheduler, ema,
    scaler."""
    folder = tmp_path_factory.mktemp("radiodiff-full")
    yield make_model_pt(folder / "pt")
    shutil.rmtree(folder)


@pytest.fixture(scope="session")
def model_only_pt(tmp_path_factory: pytest.TempPathFactory) -> tp.Iterator[Path]:
    """Upstream's ``model-60.pt`` as its configs save it (``enable_resume: False``): model alone."""
    folder = tmp_path_factory.mktemp("radiodiff-model-only")
    yield make_model_pt(folder / "pt", "--model-only")
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic maps at RadioMapSeer's 256 px, what RadioDiff's network runs on (64x64 latents)."""
    cache = tmp_path_factory.mktemp("synth256")
    ensure_synthetic(cache, num_maps=4, tx_per_map=2, seed=0, size=256)
    return cache


def run_overrides(results: Path, maps: Path, *more: str) -> list[str]:
    """The RadioDiff yaml on the synthetic maps, one map per step, no first-stage training."""
    return [f"trainer.results_folder={results}", "data.root=null", "data.split=maps",
            f"data.synthetic.cache_dir={maps}", "data.synthetic.num_maps=4", "data.synthetic.tx_per_map=2",
            "data.synthetic.size=256", "data.batch_size=1", "data.val_fraction=0.25",
            f"model.first_stage.ckpt_path={results / 'first_stage' / 'autoencoder.safetensors'}",
            "trainer.gradient_accumulate_every=1", "trainer.val_batches=1", "trainer.num_sample_images=1",
            "trainer.log_freq=1", *more]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radiodiff_resume.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)


def schedule() -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], oracle.keys()["optimizer"]["schedule"])


def upstream_lr(step: int) -> float:
    """Upstream's LambdaLR: ``lr × max((1 − step / N) ** 0.96, min_lr)``."""
    s = schedule()
    return float(s["base_lr"] * max((1 - step / s["train_num_steps"]) ** 0.96, s["min_lr"]))


def keys_of_a_full_file() -> list[str]:
    return tp.cast(list[str], oracle.keys()["checkpoint"]["enable_resume_true"])


def upstream_params() -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in oracle.keys()["optimizer"]["params"]]


def without_state() -> set[int]:
    return {int(i) for i in oracle.keys()["optimizer"]["indices_without_state"]}


def our_trainable() -> list[str]:
    """Our optimizer's parameters: upstream's minus the ones no forward reaches (frozen here)."""
    return ["unet." + n[len(UNET):] for i, n in enumerate(upstream_params()) if i not in without_state()]


def first_stage_in_our_names(model: Tensors) -> dict[str, str]:
    """Our first stage's key → upstream's, by diffusers' conversion (checked bit for bit in its own tests)."""
    autoencoder = {k[len(FS):]: v for k, v in model.items()
                   if k.startswith(FS) and k[len(FS):].split(".")[0] in AUTOENCODER}
    with torch.device("meta"):
        config = AutoencoderKL(**RADIODIFF_AUTOENCODER).config
    _, origin = to_diffusers(autoencoder, config)
    return {f"first_stage.{k}": FS + v for k, v in origin.items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def identical(a: tp.Any, b: tp.Any, path: str = "") -> list[str]:
    """Where two loaded model-N.pt trees differ: keys and their order, types, values, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and same(a, b) else [path]
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys differ"]
        return [d for k in a for d in identical(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in identical(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def load(path: Path) -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def checkpoint(results: Path, step: int) -> Checkpoint:
    return open_checkpoint(results / "checkpoints" / f"step-{step:08d}", "ldm")


# ----- the import of a whole run -------------------------------------------------------------------


@dataclass
class Imported:
    results: Path
    overrides: list[str]
    out: str


@pytest.fixture(scope="module")
def imported(full_pt: Path, maps: Path, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    results = tmp_path_factory.mktemp("imported") / "run"
    overrides = run_overrides(results, maps)
    done = cli("import", full_pt, "--cfg", LDM_YAML, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    return Imported(results, overrides, done.stdout)


def test_import_places_every_tensor_of_the_file(imported: Imported, full_pt: Path) -> None:
    src, ckpt = load(full_pt), checkpoint(imported.results, STEP)
    model, ours = src["model"], ckpt.shared["model"]
    first_stage = first_stage_in_our_names(model)
    where = {**{"unet." + k[len(UNET):]: k for k in model if k.startswith(UNET)}, **first_stage,
             "scale_factor": "scale_factor"}
    assert set(ours) == set(where), "our model holds the file's denoiser, first stage and scale_factor"
    moved = [k for k, t in where.items() if not same(ours[k].reshape(model[t].shape), model[t])]
    assert moved == []
    written = load_file(str(imported.results / "first_stage" / "autoencoder.safetensors"))
    assert written.keys() == {k[len("first_stage."):] for k in first_stage}
    assert all(same(v, ours["first_stage." + k]) for k, v in written.items())

    # Adam: by parameter name, every moment and step of the file's 1047 states
    names, theirs = our_trainable(), src["opt"]["state"]
    state = ckpt.shared["optimizer"]["state"]
    by_name = {n: i for i, n in enumerate(upstream_params())}
    assert len(state) == len(names) == len(theirs) == 1047
    for j, name in enumerate(names):
        i = by_name[UNET + name[len("unet."):]]
        assert all(same(state[j][e], theirs[i][e]) for e in ("step", "exp_avg", "exp_avg_sq")), name
    assert [g["lr"] for g in ckpt.shared["optimizer"]["param_groups"]] == [upstream_lr(STEP)]

    # EMA: the average of every trainable parameter, counting upstream's optimizer steps
    ema = ckpt.shared["ema"]
    assert ema["optimization_step"] == STEP == ckpt.shared["train_state"]["step"] == src["step"]
    assert all(same(p, src["ema"][AVERAGE + UNET + n[len("unet."):]])
               for n, p in zip(names, ema["shadow_params"], strict=True))

    # everything else the file holds, unchanged, beside the run for export
    passengers_file = imported.results / "radiodiff" / "passengers.safetensors"
    passengers = load_file(str(passengers_file))
    trained = {AVERAGE + UNET + n[len("unet."):] for n in names}
    expected = {**{f"model/{k}": v for k, v in model.items() if k not in set(where.values())},
                **{f"ema/{k}": v for k, v in src["ema"].items()
                   if k.startswith(AVERAGE) and k not in trained}}
    assert passengers.keys() == expected.keys()
    assert all(same(passengers[k], v) for k, v in expected.items())
    assert len([k for k in expected if k.startswith("model/first_stage_model.loss")]) == 3 * 56
    digest = sha256_file(passengers_file)
    record = json.loads((passengers_file.parent / "passengers.json").read_text())
    assert record["sha256"] == digest and record["import_step"] == STEP
    assert any(line.startswith(f"radiodiff passengers: {passengers_file} sha256 {digest} ")
               for line in ckpt.manifest.provenance)

    out = imported.out
    assert f"import: RadioDiff LDM run (train_cond_ldm.py) {full_pt}" in out
    assert "step: 12000 (the file's step, = model-60.pt['opt'] per-parameter step 12000 = lr_scheduler " \
           "last_epoch)" in out
    assert "6 of the file's 1053 AdamW parameters" in out and "the file holds no Adam state for them" in out
    assert f"written: {imported.results / 'checkpoints' / 'step-00012000'} (structure ok, finite ok, " \
           "scale_factor ok, keys ok, probe ok)" in out
    assert out.splitlines()[-1].startswith(f"resume with: radiodiff-resume train --cfg {LDM_YAML} ")


# ----- evaluate the file itself and its import (before `train` goes on from the import) ---------------------


def test_evaluate_weights_samples_the_file_as_its_import_does(imported: Imported, full_pt: Path,
                                                             tmp_path: Path) -> None:
    """``--weights model-N.pt`` loads the file as upstream's sample_cond_ldm.py does; its maps and scores
    equal, bit for bit, those of the checkpoint ``import`` made of the same file."""
    common = ["--cfg", LDM_YAML, *imported.overrides, "--split", "train", "--limit", "1",
              "--sampling-timesteps", "1", "--online"]
    by_file = cli("evaluate", *common, "--weights", full_pt, "--out", tmp_path / "file")
    assert by_file.returncode == 0, by_file.stderr[-3000:]
    by_import = cli("evaluate", *common, "--checkpoint", imported.results / "checkpoints" / "step-00012000",
                    "--out", tmp_path / "import")
    assert by_import.returncode == 0, by_import.stderr[-3000:]
    a, b = tmp_path / "file", tmp_path / "import"
    pngs = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pngs)
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    document = json.loads((a / "evaluate.json").read_text())
    assert document["weights"]["source"] == "weights"
    assert document["weights"]["step"] == STEP
    assert document["weights"]["content"] == sha256_file(full_pt)[:16]


# ----- one real step of `train` from it ------------------------------------------------------------


@pytest.fixture(scope="module")
def continued(imported: Imported) -> Path:
    """``train`` on the imported run, stopped by SIGUSR1 during its first step: it commits step 12001."""
    proc = subprocess.Popen([sys.executable, "-m", "radiodiff_resume.cli", "train", "--cfg", str(LDM_YAML),
                             *imported.overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    log: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line)
        if "ldm: training steps 12000..50000" in line:
            time.sleep(5)  # past the stop check before the first step, which takes tens of seconds
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.communicate(timeout=TIMEOUT)[1]
    log.append(rest)
    assert proc.returncode == 3, "".join(log)[-3000:]
    assert "ldm: probe" in "".join(log) and "bit-exact (identical environment)" in "".join(log)
    return imported.results


def test_train_continues_at_the_next_step_with_upstreams_lr_moments_and_ema(
        continued: Path, full_pt: Path) -> None:
    events = [json.loads(x) for x in (continued / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [(e["step"], "probe ok" in e["levels"]) for e in resumed] == [(STEP, True)]
    metrics = [json.loads(x) for x in (continued / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["lr"]) for m in metrics if "lr" in m] == [(STEP + 1, upstream_lr(STEP + 1))]

    src, after = load(full_pt), checkpoint(continued, STEP + 1).shared
    names, state = our_trainable(), after["optimizer"]["state"]
    by_name = {n: i for i, n in enumerate(upstream_params())}
    beta1, beta2 = oracle.keys()["optimizer"]["param_group"]["betas"]
    for j, name in enumerate(names):
        before = src["opt"]["state"][by_name[UNET + name[len("unet."):]]]
        now = state[j]
        assert float(now["step"]) == STEP + 1, name
        # one Adam update from the file's moments: m' - b1 m = (1 - b1) g and v' - b2 v = (1 - b2) g², up to
        # the float32 rounding of v' (its increment is a thousandth of it); from zero moments they disagree
        g = (now["exp_avg"].double() - beta1 * before["exp_avg"].double()) / (1 - beta1)
        g2 = (now["exp_avg_sq"].double() - beta2 * before["exp_avg_sq"].double()) / (1 - beta2)
        rounding = float(now["exp_avg_sq"].double().sum()) * 2**-24 / (1 - beta2)
        assert float(g.square().sum()) == pytest.approx(float(g2.sum()), rel=1e-3, abs=rounding), name

    config = oracle.keys()["ema"]["config"]
    epoch = STEP - config["update_after_step"]  # ema-pytorch: step.item() - update_after_step - 1, after +1
    decay = min(1 - (1 + epoch / config["inv_gamma"]) ** -config["power"], config["beta"])
    model = after["model"]
    for name, shadow in zip(names, after["ema"]["shadow_params"], strict=True):
        expected = src["ema"][AVERAGE + UNET + name[len("unet."):]].lerp(model[name], 1 - decay)
        torch.testing.assert_close(shadow, expected, rtol=1e-5, atol=2e-7, msg=name)
    assert after["ema"]["optimization_step"] == STEP + 1
    changed = [n for n in names if not same(model[n], src["model"][UNET + n[len("unet."):]])]
    assert len(changed) > len(names) // 2, "the step trained the network"


# ----- export back ---------------------------------------------------------------------------------


def test_export_of_the_imported_checkpoint_is_the_file_bit_for_bit(imported: Imported, full_pt: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "model-60.pt"
    done = cli("export", imported.results / "checkpoints" / "step-00012000", out)
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        exported = load(out)
        assert identical(load(full_pt), exported) == []
        model, ema = exported["model"], exported["ema"]
        assert all(ema[ONLINE + k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                   for k, v in model.items()), "stored once, as upstream's own files"
        assert "ema_model.*: 1047 from our EMA, 489 from passengers" in done.stdout
        assert "with trainer.enable_resume: True, trainer.resume_milestone: 60" in done.stdout
    finally:
        out.unlink(missing_ok=True)


def test_export_of_the_trained_checkpoint_loads_by_upstreams_rules(continued: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-60.pt"
    done = cli("export", continued / "checkpoints" / "step-00012001", out)
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        exported, ours = load(out), checkpoint(continued, STEP + 1).shared
        keys = oracle.keys()
        assert list(exported) == keys_of_a_full_file() and exported["step"] == STEP + 1
        assert exported["scaler"] is None
        model, ema, opt = exported["model"], exported["ema"], exported["opt"]
        assert [[k, list(v.shape), str(v.dtype)] for k, v in model.items()] == \
            [e[:3] for e in keys["model"]["entries"]]
        assert [[k, list(v.shape), str(v.dtype)] for k, v in ema.items()] == \
            [e[:3] for e in keys["ema"]["entries"]]
        assert all(ema[ONLINE + k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                   for k, v in model.items())
        assert float(ema["initted"][0]) == 1.0 and ema["step"].tolist() == [STEP + 1]

        # upstream's own loaders: AdamW over its 1053 parameters in its order, then its LambdaLR
        shapes = {e[0]: e[1] for e in keys["model"]["entries"]}
        params = [torch.empty(shapes[n], device="meta", requires_grad=True) for n in upstream_params()]
        group = keys["optimizer"]["param_group"]
        adamw = torch.optim.AdamW(params, lr=group["lr"], weight_decay=group["weight_decay"])
        s = schedule()
        lambda_lr = torch.optim.lr_scheduler.LambdaLR(
            adamw, lambda it: max((1 - it / s["train_num_steps"]) ** 0.96, s["min_lr"]))
        adamw.load_state_dict(opt)
        lambda_lr.load_state_dict(exported["lr_scheduler"])
        assert sorted(opt["state"]) == sorted(int(i) for i in keys["optimizer"]["indices_with_state"])
        assert [list(v) for v in opt["state"].values()] == [keys["optimizer"]["state_entries"]] * 1047
        assert list(opt["param_groups"][0]) == [*group, "params"]
        assert opt["param_groups"][0]["betas"] == (0.9, 0.999)
        assert list(exported["lr_scheduler"]) == list(keys["lr_scheduler"]["state_dict_template"])
        assert adamw.param_groups[0]["lr"] == lambda_lr.get_last_lr()[0] == upstream_lr(STEP + 1)
        assert lambda_lr.last_epoch == STEP + 1

        # the values: ours under upstream's names
        names, by_name = our_trainable(), {n: i for i, n in enumerate(upstream_params())}
        for j, name in enumerate(names):
            theirs = UNET + name[len("unet."):]
            assert same(model[theirs], ours["model"][name]), name
            assert same(ema[AVERAGE + theirs], ours["ema"]["shadow_params"][j]), name
            assert same(opt["state"][by_name[theirs]]["exp_avg"], ours["optimizer"]["state"][j]["exp_avg"])
    finally:
        out.unlink(missing_ok=True)


# ----- a file with the model alone -----------------------------------------------------------------


def test_model_only_file_starts_a_fine_tune_at_step_0_and_exports_in_full(
        model_only_pt: Path, maps: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "run"
    overrides = run_overrides(results, maps)  # cond_weights=imagenet: train restores step 0, loads no Swin
    done = cli("import", model_only_pt, "--cfg", LDM_YAML, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 0: a fine-tune from step 0, as RadioDiff's finetune.ckpt_path starts one" in done.stdout
    assert "optimizer: none in the source" in done.stdout
    src, ckpt = load(model_only_pt)["model"], checkpoint(results, 0)
    ours = ckpt.shared["model"]
    where = {**{"unet." + k[len(UNET):]: k for k in src if k.startswith(UNET)},
             **first_stage_in_our_names(src), "scale_factor": "scale_factor"}
    assert set(ours) == set(where)
    assert all(same(ours[k].reshape(src[t].shape), src[t]) for k, t in where.items())
    assert ckpt.shared["optimizer"]["state"] == {} and ckpt.shared["train_state"]["step"] == 0
    names = our_trainable()
    assert all(same(p, ours[n]) for n, p in zip(names, ckpt.shared["ema"]["shadow_params"], strict=True))
    assert [g["lr"] for g in ckpt.shared["optimizer"]["param_groups"]] == [upstream_lr(0)]

    no_ema = cli("evaluate", "--cfg", LDM_YAML, *overrides, "--weights", model_only_pt, "--ema")
    error = no_ema.stderr.strip().splitlines()[-1]
    assert no_ema.returncode == 2 and "Traceback" not in no_ema.stderr, no_ema.stderr[-3000:]
    assert error.startswith("error: evaluate --weights: model-60.pt holds no EMA to sample with --ema")
    assert error.endswith("pass --online")
    poisoned, bias = tmp_path / "model-61.pt", "model.init_conv_mask.first_coonv.0.bias"
    torch.save({"model": {**src, bias: torch.full_like(src[bias], float("nan"))}}, poisoned)
    nan = cli("evaluate", "--cfg", LDM_YAML, *overrides, "--weights", poisoned)
    assert nan.returncode == 2 and "Traceback" not in nan.stderr, nan.stderr[-3000:]
    assert nan.stderr.strip().splitlines()[-1].startswith(f"error: evaluate --weights: {poisoned}: tensor "
                                                          "unet.init_conv_mask.first_coonv.0.bias of the "
                                                          "online weights holds NaN/Inf")
    poisoned.unlink()

    out = tmp_path / "back.pt"
    done = cli("export", results / "checkpoints" / "step-00000000", out)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = load(out)
    assert list(exported) == keys_of_a_full_file() and exported["step"] == 0
    assert identical(src, exported["model"]) == []
    copies = {k: exported["ema"][AVERAGE + k] for k in exported["model"]}
    assert all(same(c, exported["model"][k]) and c.data_ptr() != exported["model"][k].data_ptr()
               for k, c in copies.items()), "RadioDiff's EMA starts as a copy of the model"
    assert exported["opt"]["state"] == {} and len(exported["opt"]["param_groups"][0]["params"]) == 1053
    sched = exported["lr_scheduler"]
    assert sched["last_epoch"] == 0 and sched["_last_lr"] == [upstream_lr(0)]
    out.unlink()

    # the passengers are checked before anything is written
    passengers = results / "radiodiff" / "passengers.safetensors"
    data = bytearray(passengers.read_bytes())
    data[-1] ^= 1
    passengers.write_bytes(data)
    code = main(["export", str(results / "checkpoints" / "step-00000000"), str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sha256 mismatch" in err, err
    assert not out.exists()


def test_step_from_name_is_the_milestone_times_the_save_interval(full_pt: Path, maps: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(LDM_YAML, ["data.root=/data", "trainer.save_and_sample_every=200"])
    assert step_from_name(Path("model-60.pt"), cfg) == STEP
    with pytest.raises(UserError, match="is not named model-<milestone>.pt"):
        step_from_name(Path("ldm.pt"), cfg)
    results = tmp_path / "run"
    code = main(["import", str(full_pt), "--cfg", str(LDM_YAML), "--step-from-name",
                 *run_overrides(results, maps)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model-60.pt records its step" in err, err


def test_export_refuses_a_run_that_was_never_imported(tool_run: tp.Callable[..., Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    step = sorted((cfg.parent / "run" / "checkpoints").glob("step-*"))[-1]
    code = main(["export", str(step), str(tmp_path / "model-2.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "is not of a run imported from a RadioDiff model-N.pt" in err
    assert "LPIPS/discriminator losses are trained weights only a RadioDiff file holds" in err
    assert not (tmp_path / "model-2.pt").exists()
