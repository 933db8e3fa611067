"""A BACKGROUND write that fails on one rank of a real 2-process run (CPU, gloo) stops every rank at a
later step with the same SaveFailed, before the run's next save, with the earlier checkpoint intact and
no staging folder left.

The failing rank writes under ``RLIMIT_FSIZE`` (see dist_save_fail.py): the kernel answers its
checkpoint write with EFBIG in the writer thread while the training thread has gone on; the writer's
failed flag rides the next step's stop agreement.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoint.helpers import STEP2, committed, events, hashes
from tests.checkpoint.test_save_failure import (
    LIMITS,
    SCRIPT,
    Committed,
    committed_step2,
    launch,
    rank_reports,
)

__all__ = ["committed_step2"]  # the fixture, used by name


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [1])
def test_background_write_error_stops_every_rank_at_a_later_step(committed_step2: Committed, tmp_path: Path,
                                                                  fail_rank: int) -> None:
    cfg = committed_step2.cfg
    results = committed_step2.reset()
    checkpoints = results / "checkpoints"
    before = hashes(checkpoints / STEP2)

    out = tmp_path / "out"
    out.mkdir()
    code, log = launch(str(SCRIPT), str(cfg), str(out), str(fail_rank), str(LIMITS[fail_rank]),
                       "trainer.train_num_steps=12", "checkpoint.every=4")
    assert code != 0, log[-6000:]
    reports = rank_reports(out)
    for rank, report in enumerate(reports):
        assert report["type"] == "SaveFailed", (rank, report, log[-6000:])
        message = report["message"]
        assert "checkpoint of step 4 could not be written" in message, message
        assert f"rank {fail_rank}: OSError: [Errno 27] File too large" in message, message
        assert f"the newest committed checkpoint is {checkpoints / STEP2}" in message, message
    assert reports[0]["message"] == reports[1]["message"], "every rank stops with the same message"

    failed = events(results, "save_failed")
    assert [e["step"] for e in failed] == [4], failed
    assert 4 < failed[0]["noticed_at"] < 8, "noticed by training after the save, before the next save"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert committed(results) == [STEP2]
    assert hashes(checkpoints / STEP2) == before
