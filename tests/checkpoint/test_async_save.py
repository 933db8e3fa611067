"""Background (asynchronous) saves: training goes on while the writer thread commits, the checkpoint
holds the state of the step it was taken at, and a failure in the writer reaches the training thread.

The commit is held open by the test's own subclass of the store, whose rename into place waits until
the test lets it go: an event ordering, not a timing.
"""

from __future__ import annotations

import copy
import threading
import typing as tp

import pytest
import torch

from radiodiff_resume.checkpoint.files import read_manifest
from radiodiff_resume.checkpoint.manifest import MANIFEST
from radiodiff_resume.checkpoint.store import CheckpointStore
from radiodiff_resume.config import Config
from radiodiff_resume.errors import HaltError
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer
from tests.checkpoint.helpers import FAST, build, committed, events, read_shared, tensor_equal_trees
from tests.conftest import write_random_first_stage

GATE_S = 120
"""Only a deadlock breaker: on the code under test the gate opens as soon as the next step is done."""


class GatedStore(CheckpointStore):
    """A store whose commit (manifest, rename) waits until ``gate`` is opened, recording the order."""

    gate: threading.Event
    order: list[str]

    def _commit(self, *args: tp.Any) -> None:
        opened = self.gate.wait(GATE_S)
        super()._commit(*args)
        self.order.append("committed" if opened else "committed without waiting for the gate")


def gated(trainer: LatentDiffusionTrainer) -> GatedStore:
    store = trainer.checkpointer.store
    store.__class__ = GatedStore
    assert isinstance(store, GatedStore)
    store.gate, store.order = threading.Event(), []
    return store


def trained(make_cfg: tp.Callable[..., Config], *overrides: str) -> LatentDiffusionTrainer:
    cfg = make_cfg(*FAST, "trainer.train_num_steps=6", *overrides)
    write_random_first_stage(cfg)
    trainer = build(cfg)
    trainer.restore()
    step(trainer)
    return trainer


def wait_for(condition: tp.Callable[[], bool]) -> bool:
    done = threading.Event()
    for _ in range(GATE_S * 100):
        if condition():
            return True
        done.wait(0.01)
    return False


def step(trainer: LatentDiffusionTrainer) -> None:
    assert trainer.train_step().stepped
    trainer.state.step += 1


def test_training_goes_on_while_the_commit_is_under_way(make_cfg: tp.Callable[..., Config]) -> None:
    trainer = trained(make_cfg)
    results = trainer.results_folder
    saved = copy.deepcopy(trainer.state_dict())
    store = gated(trainer)

    trainer.save_checkpoint(background=True)
    step(trainer)  # updates the parameters, the optimizer and the EMA in place
    store.order.append("next step done")
    store.gate.set()
    trainer.checkpointer.settle()

    assert store.order == ["next step done", "committed"]
    assert committed(results) == ["step-00000001"]
    assert [e["step"] for e in events(results, "checkpoint_saved")] == [1]
    on_disk = read_shared(results / "checkpoints" / "step-00000001")
    for name in ("model", "ema", "optimizer", "train_state", "data"):
        assert tensor_equal_trees(on_disk[name], saved[name]), f"{name}: not the state of the saved step"
    assert not tensor_equal_trees(saved["model"], trainer.state_dict()["model"]), "the step changed nothing"


def test_the_probe_runs_off_the_training_thread(make_cfg: tp.Callable[..., Config]) -> None:
    """On a CPU run the writer computes the probe with a twin of the model holding the snapshot, after
    the next step changed the module; on a GPU (scripts/gpu_check.sh) the forward is enqueued on the
    training stream before that step. Either way the manifest holds the saved state's probe bit for
    bit, which a resume then verifies."""
    cfg = make_cfg(*FAST, "trainer.train_num_steps=6")
    write_random_first_stage(cfg)
    trainer = build(cfg)
    trainer.restore()
    step(trainer)
    results = trainer.results_folder
    saved = float(trainer.probe_value(trainer.probe_inputs()))
    real, threads, stepped = trainer.probe.function, [], threading.Event()

    def recording(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            assert stepped.wait(GATE_S), "the next step never ended"
        return real(module, inputs)

    trainer.probe.function = recording
    store = gated(trainer)
    store.gate.set()
    trainer.save_checkpoint(background=True)
    step(trainer)
    stepped.set()
    trainer.checkpointer.settle()
    trainer.probe.function = real

    on_cpu = trainer.accelerator.device.type == "cpu"
    assert threads == ["checkpoint-writer-ldm-1" if on_cpu else "MainThread"], f"the probe ran on {threads}"
    assert float(trainer.probe_value(trainer.probe_inputs())) != saved, "the step changed nothing"
    assert read_manifest(results / "checkpoints" / "step-00000001").probe.loss == saved
    again = build(cfg)
    assert again.restore() is not None and again.state.step == 1
    assert again.checkpointer.verified is not None and again.checkpointer.verified.levels["probe"].ok


def test_a_refusal_in_the_writer_reaches_the_next_step(make_cfg: tp.Callable[..., Config]) -> None:
    """Non-finite optimizer state (the weights and the probe stay finite) is refused by the writer,
    on the snapshot; the training thread learns it from the host flag its stop wish carries."""
    trainer = trained(make_cfg)
    results = trainer.results_folder
    state = next(iter(trainer.optimizer.state.values()))
    state["exp_avg"].view(-1)[0] = float("nan")
    store = gated(trainer)
    store.gate.set()

    trainer.save_checkpoint(background=True)
    assert wait_for(lambda: trainer.checkpointer.failed), "the writer never reported its refusal"
    assert trainer.wants_stop(), "a failed background save must join the stop agreed at the next step"
    with pytest.raises(HaltError, match="refusing to save step 1: non-finite values in 1 tensor"):
        trainer.checkpointer.settle()
    assert committed(results) == []
    assert not list(results.glob("checkpoints/.*")), "nothing of the refused save is left"
    assert [e["step"] for e in events(results, "save_failed")] == [1]
    assert not trainer.wants_stop()


def test_async_save_false_commits_before_training_goes_on(make_cfg: tp.Callable[..., Config]) -> None:
    trainer = trained(make_cfg, "checkpoint.async_save=false")
    store = gated(trainer)
    store.gate.set()
    trainer.save_checkpoint(background=True)
    assert (trainer.results_folder / "checkpoints" / "step-00000001" / MANIFEST).is_file()
    assert store.order == ["committed"]


def test_host_buffers_are_reused_and_never_alias_the_state() -> None:
    from radiodiff_resume.checkpoint.background import HostBuffers

    weight = torch.arange(6.0).reshape(2, 3)
    tree = {"w": weight, "again": weight, "t": (weight.t(), 3), "n": [1.5, "x"]}
    buffers = HostBuffers()
    first = buffers.snapshot(tree)
    assert first["again"] is first["w"], "one tensor stays one buffer (stored once)"
    assert first["w"].data_ptr() != weight.data_ptr()
    weight += 1
    assert torch.equal(first["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(first["t"][0], torch.arange(6.0).reshape(2, 3).t()) and first["t"][1] == 3
    second = buffers.snapshot(tree)
    assert second["w"].data_ptr() == first["w"].data_ptr(), "the buffer is reused"
    assert torch.equal(second["w"], weight)
    assert second["n"] == [1.5, "x"] and second["n"] is not tree["n"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_tensors_go_to_pinned_buffers_on_the_training_stream() -> None:
    from radiodiff_resume.checkpoint.background import HostBuffers

    weight = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    buffers = HostBuffers()
    copy = buffers.snapshot({"w": weight})["w"]
    weight.add_(1)  # queued after the copy on the same stream: the snapshot keeps the old values
    buffers.ready()
    assert copy.is_pinned() and copy.device.type == "cpu"
    assert torch.equal(copy, torch.arange(1 << 20, dtype=torch.float32))


def test_an_error_exit_waits_for_the_commit_under_way(make_cfg: tp.Callable[..., Config]) -> None:
    """An error after a background save (here a failing data read at the next step) leaves ``fit`` only
    once that save is committed: the run lock is released and the process exits after the commit,
    never with a writer still busy."""
    cfg = make_cfg(*FAST, "trainer.train_num_steps=6", "trainer.save_and_sample_every=2")
    write_random_first_stage(cfg)
    trainer = build(cfg)
    store = gated(trainer)
    real_step = trainer.train_step

    def failing_step() -> tp.Any:
        if trainer.state.step == 2:
            store.order.append("error raised")
            raise OSError("the data went away")
        return real_step()

    trainer.train_step = failing_step  # type: ignore[method-assign]

    def open_after_the_error() -> None:
        assert wait_for(lambda: "error raised" in store.order)
        store.gate.set()

    opener = threading.Thread(target=open_after_the_error)
    opener.start()
    with pytest.raises(OSError, match="the data went away"):
        trainer.fit()
    store.order.append("fit returned")
    opener.join()
    trainer.checkpointer.settle()
    assert store.order == ["error raised", "committed", "fit returned"]
    assert committed(trainer.results_folder) == ["step-00000002"]
