"""Experiment trackers across a restart and a rollback, with real trackers writing real files:
tensorboard (the default where it is installed), read back with tensorboard's own
``EventAccumulator``, and wandb in offline mode, read back from its own run folders and ``.wandb``
transaction logs (wandb's record protobufs in LevelDB's log framing).

One results folder, two real ``train_cond_ldm.py`` processes: the first SIGKILLs itself at step 7
(:mod:`tests.checkpoint.dying_unet`), after logging steps 2, 4 and 6 and committing step 4; the
second resumes from step 4, writes NaN into a weight at step 11 (:mod:`tests.guard.recovery_plugins`)
so the guard rolls back to step 8, and finishes at step 12. Steps 5 to 6 and 9 to 11 run twice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.config import build_config, default_trackers
from radiodiff_resume.errors import ConfigError
from radiodiff_resume.trainer.trackers import RUNS_FILE, WANDB_ID
from tests.conftest import REPO, tiny_raw

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is an optional dependency (pip install -e .[test])")
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is an optional dependency (pip install -e .[test])")
WANDB = "trainer.log_with=[wandb]"

RUN = ("trainer.train_num_steps=12", "trainer.log_freq=2", "trainer.save_and_sample_every=100",
       "trainer.val_batches=0", "trainer.num_sample_images=1", "checkpoint.every=4",
       "guard.norm_stats.check_every=1")


def train(cfg: Path, *overrides: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra_env)
    return subprocess.run([sys.executable, str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg), *RUN,
                           *overrides], env=env, cwd=cfg.parent, capture_output=True, text=True, timeout=600)


def run_yaml(tmp_path: Path, synth_cache: Path, first_stage: bool = True) -> tuple[Path, Path]:
    """``(results folder, config file)`` of a tiny run in ``tmp_path``, with an untrained first stage
    written where the config expects one (``first_stage``)."""
    results = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(results, synth_cache)))
    if first_stage:
        write_untrained_first_stage(build_config(tiny_raw(results, synth_cache)))
    return results, cfg


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """Every point of ``tag`` in the event files of ``folder``, in the order they were written
    (nothing purged: a step written twice, or going back, shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), purge_orphaned_data=False)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@needs_tensorboard
@pytest.mark.slow
def test_one_tracker_run_across_a_kill_a_restart_and_a_rollback_steps_never_go_back(
    tmp_path: Path, synth_cache: Path
) -> None:
    results, cfg = run_yaml(tmp_path, synth_cache)
    assert build_config(tiny_raw(results, synth_cache)).trainer.log_with == ["tensorboard"], "the default"

    first = train(cfg, "model.unet.target=tests.checkpoint.dying_unet.DiesAtForwardUNet",
                  "model.unet.params.die_at=7")
    assert first.returncode == -9, first.stderr[-3000:]
    board = results / "radiodiff_resume"
    assert [s for s, _ in scalars(board, "ldm/loss")] == [2, 4, 6]
    kept = json.loads((results / RUNS_FILE).read_text())
    assert kept == {"tensorboard": "radiodiff_resume"}

    second = train(cfg, "model.unet.target=tests.guard.recovery_plugins.PoisonedUNet",
                   "model.unet.params.poison_at=[7]")
    assert second.returncode == 0, second.stderr[-3000:]
    log = [json.loads(line) for line in (results / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["to_step"]) for e in log if e["event"] == "rolled_back"] == [(11, 8)]
    assert [r["step"] for r in map(json.loads, (results / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [2, 4, 6, 6, 8, 10, 10, 12], "metrics.jsonl keeps every record, replays too"

    loss = scalars(board, "ldm/loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8, 10, 12], "each step once, never going back"
    assert [s for s, _ in scalars(board, "ldm/lr")] == [2, 4, 6, 8, 10, 12]
    assert scalars(board, "ldm/rolled_back_to_step") == [(11, 8.0)], "the rollback, as an event"
    assert json.loads((results / RUNS_FILE).read_text()) == kept, "the same run after the restart"
    assert sorted(p.name for p in board.iterdir() if p.is_file())[0].startswith("events.out.tfevents")


@needs_tensorboard
def test_log_with_defaults_to_tensorboard_where_installed_and_names_are_checked(
    tmp_path: Path, synth_cache: Path
) -> None:
    raw = tiny_raw(tmp_path / "run", synth_cache)
    assert default_trackers() == ["tensorboard"]
    assert build_config(raw, ["trainer.log_with=[]"]).trainer.log_with == []
    with pytest.raises(ConfigError, match=r"log_with: got 'tensorbored'; allowed: tensorboard, wandb"):
        build_config(raw, ["trainer.log_with=[tensorbored]"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"log_with: wandb is not installed here; pip install wandb"):
            build_config(raw, ["trainer.log_with=[wandb]"])


def offline_wandb(tmp_path: Path) -> dict[str, str]:
    """wandb offline (no network here), quiet, with every folder of its own under ``tmp_path``:
    ``WANDB_DIR`` is where a run would go if ``dir=`` were not passed."""
    home = tmp_path / "wandb-home"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home / "dir"),
            "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data")}


def wandb_records(path: Path) -> tp.Iterator[tp.Any]:
    """The records of a ``.wandb`` transaction log: a 7-byte header, then LevelDB log framing (32 KiB
    blocks of chunks: checksum, length, type 1 full / 2 first / 3 middle / 4 last) around wandb's
    ``Record`` protobufs. The last chunks of a killed process may be missing, never half-read."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            return
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            record = b""
            yield parsed


def wandb_run(folder: Path) -> tuple[set[str], list[dict[str, tp.Any]]]:
    """The run ids an offline run folder's log names, and its history rows in order."""
    (log,) = folder.glob("run-*.wandb")
    ids, rows = set(), []
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return ids, rows


def stage_steps(rows: list[dict[str, tp.Any]], key: str) -> list[tuple[int, float]]:
    """``(ldm/step, value)`` of each row that logs ``key``: the x-axis wandb plots ``key`` against."""
    return [(row["ldm/step"], row[key]) for row in rows if key in row]


@needs_wandb
@pytest.mark.slow
def test_a_wandb_run_is_resumed_across_a_kill_and_a_restart_and_its_steps_never_go_back(
    tmp_path: Path, synth_cache: Path
) -> None:
    results, cfg = run_yaml(tmp_path, synth_cache)
    env = offline_wandb(tmp_path)

    first = train(cfg, WANDB, "model.unet.target=tests.checkpoint.dying_unet.DiesAtForwardUNet",
                  "model.unet.params.die_at=7", **env)
    assert first.returncode == -9, first.stderr[-3000:]
    kept = json.loads((results / RUNS_FILE).read_text())
    assert set(kept) == {"wandb"} and WANDB_ID.fullmatch(kept["wandb"]), kept
    run_id = kept["wandb"]
    assert [p.name.rsplit("-", 1)[1] for p in (results / "wandb").glob("offline-run-*")] == [run_id]

    second = train(cfg, WANDB, "model.unet.target=tests.guard.recovery_plugins.PoisonedUNet",
                   "model.unet.params.poison_at=[7]", **env)
    assert second.returncode == 0, second.stderr[-3000:]
    log = [json.loads(line) for line in (results / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["to_step"]) for e in log if e["event"] == "rolled_back"] == [(11, 8)]
    assert json.loads((results / RUNS_FILE).read_text()) == kept, "the same run after the restart"

    folders = sorted((results / "wandb").glob("offline-run-*"))  # named offline-run-<time>-<run id>
    assert [p.name.rsplit("-", 1)[1] for p in folders] == [run_id, run_id], "one run, two processes"
    (ids_1, rows_1), (ids_2, rows_2) = map(wandb_run, folders)
    # wandb writes its log every 15 s, so what the SIGKILLed process logged may not all be there.
    assert ids_1 <= {run_id} and ids_2 == {run_id}
    assert not list(Path(env["WANDB_DIR"]).rglob("offline-run-*")), "the run is in the results folder"
    assert rows_2[0]["_step"] == 0, "offline, a resumed process starts wandb's own step at 0 again"
    assert [s for s, _ in stage_steps(rows_1, "ldm/loss")] == [2, 4, 6][:len(stage_steps(rows_1, "ldm/loss"))]
    assert [s for s, _ in stage_steps(rows_2, "ldm/loss")] == [8, 10, 12], "replayed steps not logged again"
    assert [s for s, _ in stage_steps(rows_2, "ldm/lr")] == [8, 10, 12]
    assert stage_steps(rows_2, "ldm/rolled_back_to_step") == [(11, 8)], "the rollback, as an event"
    for key in {k for row in rows_1 + rows_2 for k in row if k.startswith("ldm/") and k != "ldm/step"}:
        steps = [s for s, _ in stage_steps(rows_1 + rows_2, key)]
        assert steps == sorted(set(steps)), f"{key} went back: {steps}"


@needs_wandb
@pytest.mark.parametrize("text", ['{"wandb": "Abc-123/.."}', '{"wandb": 12345678}',
                                  '{"wandb": "' + "a" * 65 + '"}', '["wandb"]', "{not json"])
def test_a_kept_wandb_run_id_is_data_checked_before_wandb_starts(
    tmp_path: Path, synth_cache: Path, text: str
) -> None:
    from accelerate import Accelerator

    from radiodiff_resume.errors import UserError
    from radiodiff_resume.trainer.trackers import init_kwargs

    (tmp_path / RUNS_FILE).write_text(text)
    with pytest.raises(UserError, match=rf"^{tmp_path / RUNS_FILE}[: ]"):
        init_kwargs(Accelerator(cpu=True, project_dir=str(tmp_path)), ["wandb"])
    assert (tmp_path / RUNS_FILE).read_text() == text, "left as it was"
    assert init_kwargs(Accelerator(cpu=True, project_dir=str(tmp_path)), ["tensorboard"]) == {}


@needs_wandb
def test_the_first_start_keeps_a_new_wandb_run_id_and_every_later_one_reuses_it(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from radiodiff_resume.trainer.trackers import init_kwargs

    (tmp_path / RUNS_FILE).write_text('{"tensorboard": "radiodiff_resume"}\n')
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    first = init_kwargs(accelerator, ["tensorboard", "wandb"])
    run_id = first["wandb"]["id"]
    assert WANDB_ID.fullmatch(run_id) and len(run_id) == 8
    assert first == {"wandb": {"id": run_id, "resume": "allow", "dir": str(tmp_path)}}
    kept = json.loads((tmp_path / RUNS_FILE).read_text())
    assert kept == {"tensorboard": "radiodiff_resume", "wandb": run_id}
    assert init_kwargs(accelerator, ["wandb"]) == first


@needs_wandb
@pytest.mark.slow
def test_a_bad_kept_wandb_run_id_stops_the_run_with_one_line(tmp_path: Path, synth_cache: Path) -> None:
    results, cfg = run_yaml(tmp_path, synth_cache, first_stage=False)
    results.mkdir()
    (results / RUNS_FILE).write_text('{"wandb": "__import__(\'os\')"}')
    done = train(cfg, WANDB, **offline_wandb(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"{results / RUNS_FILE}: the kept wandb run id" in done.stderr.strip().splitlines()[-1]
    assert not (results / "wandb").exists(), "wandb never started"


@needs_wandb
def test_a_second_stage_starting_again_at_step_1_is_kept_in_the_same_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first stage trains, then the LDM, in one process and one wandb run: the LDM's steps
    start again at 1, below the first stage's, and are all kept (wandb drops a row logged at a step
    below its own)."""
    import wandb
    from accelerate import Accelerator

    from radiodiff_resume.trainer.trackers import TrackerLog, init_kwargs

    for name, value in offline_wandb(tmp_path).items():
        monkeypatch.setenv(name, value)
    accelerator = Accelerator(cpu=True, log_with="wandb", project_dir=str(tmp_path))
    accelerator.init_trackers("radiodiff_resume", init_kwargs=init_kwargs(accelerator, ["wandb"]))
    first = TrackerLog(accelerator, "first_stage", [], enabled=True)
    for step in (2, 4, 6):
        first.log(step, {"loss": 1.0 / step})
    ldm = TrackerLog(accelerator, "ldm", [], enabled=True)
    for step in (2, 4):
        ldm.log(step, {"loss": 2.0 / step})
    accelerator.end_training()
    wandb.teardown()  # what a process does at exit: wandb's finish returns before its log is written

    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    ids, rows = wandb_run(folder)
    assert ids == {folder.name.rsplit("-", 1)[1]}
    assert [(r["first_stage/step"], r["first_stage/loss"]) for r in rows if "first_stage/loss" in r] == [
        (2, 0.5), (4, 0.25), (6, 1.0 / 6)]
    assert stage_steps(rows, "ldm/loss") == [(2, 1.0), (4, 0.5)]
