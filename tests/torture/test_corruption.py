"""Corruption fuzzing: every damaged copy is refused as damaged, never crashes; good copies always pass.

``RADIODIFF_TORTURE=full`` runs the full deterministic set (every file × every mutation, every
mutation end to end through ``resume()``, the recursion-limit sweeps) instead of the CI sample.
``RADIODIFF_TORTURE_SEED`` changes the sample.
"""

from __future__ import annotations

import os
import random
import re
import typing as tp
from pathlib import Path

import pytest

from radiodiff_resume.checkpoint.manifest import MANIFEST
from tests.torture.corruption import (
    CRASHED,
    DETECTED,
    EDGE_FAMILIES,
    MISSED,
    NEWEST,
    Bench,
    Mutation,
    all_mutations,
    component_mutations,
    discovery_trial,
    edge_trials,
    manifest_mutations,
    run_trials,
    verdict_of,
    verify_trial,
)

FULL = os.environ.get("RADIODIFF_TORTURE") == "full"
SEED = int(os.environ.get("RADIODIFF_TORTURE_SEED", "20260"))
SAMPLE = 150
"""Verification trials in the CI sample (~0.05 s each on one thread)."""

MANIFEST_CASES = {m.name: m for m in manifest_mutations()}
COMPONENT_CASES = {f"{m.target}:{m.name}": m for m in component_mutations()}


@pytest.fixture(scope="module")
def bench(golden_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    """One verifying trainer for the module (rebuilt by the bench after any escape)."""
    return Bench(golden_results, tmp_path_factory.mktemp("bench"))


def assert_detected(bench: Bench, mutation: Mutation) -> None:
    outcome = verify_trial(bench, mutation, random.Random(f"{SEED}/{mutation.id}"), "case")
    assert outcome.verdict == DETECTED, f"{mutation.id}: {outcome.description} -> {outcome.verdict}: " \
                                        f"{outcome.detail}"
    if mutation.expect:
        assert re.search(mutation.expect, outcome.detail), f"{mutation.id}: {outcome.detail}"


def test_sampled_corruptions_are_all_detected_without_crash_or_false_alarm(
    golden_results: Path, tmp_path: Path
) -> None:
    summary = run_trials(golden_results, None if FULL else SAMPLE, SEED, workdir=tmp_path / "work")
    print()
    print(summary.report())
    assert summary.trials >= (len(all_mutations(golden_results)) if FULL else SAMPLE)
    assert summary.controls >= 5
    assert summary.false_alarms == 0, summary.report()
    assert summary.crashed == 0, summary.report()
    assert summary.detected + summary.accepted == summary.trials, summary.report()


@pytest.mark.parametrize("name", sorted(MANIFEST_CASES))
def test_resealed_manifest_damage_is_detected(name: str, bench: Bench) -> None:
    """A manifest rewritten with a valid checksum: only the semantic checks can refuse it."""
    assert_detected(bench, MANIFEST_CASES[name])


@pytest.mark.parametrize("name", sorted(COMPONENT_CASES))
def test_resealed_component_damage_is_detected(name: str, bench: Bench) -> None:
    """A component rewritten with its manifest record updated and the manifest resealed."""
    assert_detected(bench, COMPONENT_CASES[name])


SPECIAL = {(target, kind): expect for target in (MANIFEST, "model.safetensors", "rank-00000.json")
           for kind, expect in (("fifo", "not a regular file"), ("directory", "not a regular file"),
                                ("symlink-absolute", "not a regular file"),
                                ("symlink-relative", "not a regular file"),
                                ("delete", r"missing"), ("duplicate", "stray entries not in the manifest"),
                                ("truncate-zero", "has 0 bytes|not valid JSON"))}


@pytest.mark.parametrize(("target", "kind"), sorted(SPECIAL), ids=[f"{t}-{k}" for t, k in sorted(SPECIAL)])
def test_special_files_are_refused_without_hanging(target: str, kind: str, bench: Bench) -> None:
    """A FIFO must not block the reader; a symlink to an identical copy is refused all the same."""
    [mutation] = [m for m in all_mutations(bench.golden) if m.target == target and m.name == kind]
    assert_detected(bench, Mutation(mutation.name, target, mutation.apply, "file", SPECIAL[(target, kind)],
                                    timeout=20.0))


DISCOVERY = ("manifest.json:fifo", "manifest.json:path-dotdot", "model.safetensors:symlink-absolute",
             "ema.safetensors:nan", "optimizer.safetensors:truncate-random", "rank-00000.json:directory")


@pytest.mark.parametrize("mutation_id", DISCOVERY)
def test_discovery_quarantines_the_damaged_newest_unchanged_and_resumes_the_older(
    mutation_id: str, bench: Bench
) -> None:
    [mutation] = [m for m in all_mutations(bench.golden) if m.id == mutation_id]
    outcome = discovery_trial(bench, mutation, random.Random(f"{SEED}/{mutation_id}"), "discovery")
    assert outcome.verdict == DETECTED, f"{outcome.description} -> {outcome.verdict}: {outcome.detail}"


def test_discovery_of_an_untouched_checkpoint_resumes_it_and_moves_nothing(bench: Bench) -> None:
    outcome = discovery_trial(bench, None, random.Random(SEED), "discovery-control")
    assert outcome.verdict == "ok", outcome.detail


@pytest.mark.parametrize("frames", [0, 1])
@pytest.mark.parametrize("family", [f for f in EDGE_FAMILIES if f.target in (MANIFEST, "ema.json")],
                         ids=lambda f: f.name)
def test_nesting_at_the_recursion_limit_never_crashes(family: tp.Any, frames: int, bench: Bench) -> None:
    """Around the depth where parsing starts to fail, one recursive step may succeed and the next
    (the manifest checksum, a deepcopy while loading) fail: that must still be a report."""
    outcomes = edge_trials(bench, family, frames)
    crashed = [f"{o.mutation}: {o.detail}" for o in outcomes if o.verdict == CRASHED]
    assert crashed == [], "\n".join(crashed)
    wrong = [f"{o.mutation}: {o.detail}" for o in outcomes if o.verdict == MISSED]
    assert wrong == [], "\n".join(wrong)


def test_the_oracle_counts_an_unchanged_copy_as_missed(bench: Bench) -> None:
    """The harness can fail: a 'mutation' that changes nothing is a miss, in both kinds of trial."""
    noop = Mutation("no-op", "", lambda ckpt, rng: "nothing changed", "file")
    assert verify_trial(bench, noop, random.Random(0), "noop").verdict == MISSED
    assert discovery_trial(bench, noop, random.Random(0), "noop-discovery").verdict == MISSED
    assert verdict_of(None, "ValueError: boom") == (CRASHED, "ValueError: boom")


def test_every_file_of_the_checkpoint_gets_every_generic_mutation(golden_results: Path) -> None:
    files = sorted(p.name for p in (golden_results / "checkpoints" / NEWEST).iterdir())
    assert MANIFEST in files and len(files) == 16, files
    targets = {m.target for m in all_mutations(golden_results) if m.group == "file"}
    assert targets == set(files)
