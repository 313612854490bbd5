"""Re-running an incidental sweep resumes it: FINISHED points are reused, never trained twice.

In-process checks with a trainer that counts its calls (a re-run, a crash on the second point, a killed
invocation's RUNNING leftovers, --force), then the real thing: `python cli.py incidental collisions` killed
with SIGKILL after its first point, re-run to completion, and reported on.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.experiments.incidental import collisions_points, noise_points, run_point
from tracking.incidental import load_study, point_identity, track_points
from tracking.recorder import read_csv_artifact, search_all
from tracking.store import open_store

ROOT = Path(__file__).resolve().parent.parent
# Every point converges (encoding sparsity ≥ 0.985 at step 2000, measured), so the sweep fits a slope.
COLLISIONS = collisions_points(
    n=16, ms=(16, 24, 32), l1_values=(1e-2,), instances=2, steps=2000, lr=1e-2, curve_every=500
)
NOISE = noise_points(
    n=4,
    m=8,
    instances=2,
    steps=30,
    curve_every=10,
    sigmas=(0.1,),
    noise_types=("bipolar", "gaussian", "laplace"),
)


class CountingTrainer:
    """`run_point` that remembers what it trained and can crash on its `fail_at`-th call (1-based)."""

    def __init__(self, fail_at: int | None = None):
        self.trained: list = []
        self.fail_at = fail_at

    def __call__(self, config):
        self.trained.append(config)
        if len(self.trained) == self.fail_at:
            raise RuntimeError("simulated crash")
        return run_point(config)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the in-process tests (each uses its own experiment); artifacts sit beside it."""
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('resume') / 'mlflow.db'}")
    store.experiment_id("warm-up")  # creates the database once, before any test is timed
    return store


def point_runs_by_status(store, experiment_id: str, status: str) -> list:
    return search_all(store, [experiment_id], f"tags.kind = 'point' and attributes.status = '{status}'")


def finished_per_identity(store, experiment_id: str) -> Counter:
    """How many FINISHED point runs each config hash has."""
    return Counter(
        run.data.tags["config_hash"] for run in point_runs_by_status(store, experiment_id, "FINISHED")
    )


def summary_metrics(metrics: dict) -> dict:
    return {name: value for name, value in metrics.items() if not name.startswith("points_")}


@pytest.mark.parametrize(("command", "configs"), [("collisions", COLLISIONS), ("noise", NOISE)])
def test_rerun_reuses_finished_points_and_force_retrains_them(store, command, configs):
    experiment_id = store.experiment_id(f"rerun-{command}")
    first_trainer = CountingTrainer()
    first = track_points(store, experiment_id, command, configs, trainer=first_trainer)
    assert first_trainer.trained == configs and first.reused == []

    again, told = CountingTrainer(), []
    second = track_points(
        store, experiment_id, command, configs, trainer=again, on_reuse=lambda c, r: told.append((c, r))
    )
    assert again.trained == []
    assert second.run_ids == second.reused == first.run_ids and told == list(
        zip(configs, first.run_ids, strict=True)
    )
    # The summary is the one the training produced: same table, same slope metrics, same points read back.
    pd.testing.assert_frame_equal(second.table.drop(columns="reused"), first.table.drop(columns="reused"))
    assert list(first.table["reused"]) == [False] * 3 and list(second.table["reused"]) == [True] * 3
    if command == "collisions":
        assert first.metrics["loglog_slope_points"] == 3 and math.isfinite(first.metrics["loglog_slope"])
    np.testing.assert_equal(summary_metrics(second.metrics), summary_metrics(first.metrics))
    assert (second.metrics["points_trained"], second.metrics["points_reused"]) == (0, 3)
    for trained, read in zip(first.results, second.results, strict=True):
        pd.testing.assert_frame_equal(read.per_instance, trained.per_instance, check_dtype=False)
        np.testing.assert_array_equal(list(read.metrics.values()), list(trained.metrics.values()))
        assert read.curves.keys() == trained.curves.keys()
        for name, values in trained.curves.items():
            np.testing.assert_array_equal(read.curves[name], values)
        assert read.convergence == trained.convergence
    logged = read_csv_artifact(store, second.sweep_run_id, f"{command}.csv")
    assert list(logged["run_id"]) == first.run_ids and logged["reused"].all()
    sweep = store.client.get_run(second.sweep_run_id)
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["points_reused"] == 3
    assert sorted(finished_per_identity(store, experiment_id).values()) == [1, 1, 1]
    # The report reads the reused points through the new sweep, each once even with both sweeps selected.
    for sweep_ids in ([second.sweep_id], [first.sweep_id, second.sweep_id], []):
        records = load_study(store, experiment_id, sweep_ids)
        frame = records.collisions_instances if command == "collisions" else records.noise_instances
        assert len(frame) == 3 * 2 and set(frame["run_id"]) == set(first.run_ids)

    forced_trainer = CountingTrainer()
    forced = track_points(store, experiment_id, command, configs, trainer=forced_trainer, force=True)
    assert forced_trainer.trained == configs and forced.reused == []
    assert set(forced.run_ids).isdisjoint(first.run_ids) and sorted(forced.retired) == sorted(first.run_ids)
    assert forced.metrics["points_retired"] == 3
    assert sorted(finished_per_identity(store, experiment_id).values()) == [1, 1, 1]
    assert {run.info.run_id for run in point_runs_by_status(store, experiment_id, "FINISHED")} == set(
        forced.run_ids
    )
    assert all(store.client.get_run(run_id).info.lifecycle_stage == "deleted" for run_id in first.run_ids)
    latest = load_study(store, experiment_id)  # the newest sweep: the forced one
    frame = latest.collisions_instances if command == "collisions" else latest.noise_instances
    assert set(frame["run_id"]) == set(forced.run_ids)


def test_crash_on_the_second_point_keeps_the_first_and_the_rerun_trains_the_rest(store):
    experiment_id = store.experiment_id("crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        track_points(store, experiment_id, "collisions", COLLISIONS, trainer=CountingTrainer(fail_at=2))
    (kept,) = point_runs_by_status(store, experiment_id, "FINISHED")
    (crashed,) = point_runs_by_status(store, experiment_id, "FAILED")
    assert kept.data.params["m"] == "16" and crashed.data.params["m"] == "24"

    retry = CountingTrainer()
    resumed = track_points(store, experiment_id, "collisions", COLLISIONS, trainer=retry)
    assert retry.trained == COLLISIONS[1:]
    assert resumed.reused == [kept.info.run_id] and resumed.run_ids[0] == kept.info.run_id
    assert crashed.info.run_id not in resumed.run_ids
    assert store.client.get_run(crashed.info.run_id).info.status == "FAILED"  # left as it was, not reused
    assert sorted(finished_per_identity(store, experiment_id).values()) == [1, 1, 1]
    assert store.client.get_run(resumed.sweep_run_id).data.metrics["points_trained"] == 2


def test_runs_a_killed_invocation_left_running_are_superseded_and_retrained(store):
    """What SIGKILL leaves (a RUNNING sweep with a RUNNING point) is closed as FAILED by the re-run."""
    experiment_id = store.experiment_id("killed")
    client = store.client
    dead_sweep = client.create_run(experiment_id, tags={"kind": "sweep", "study": "incidental"}).info.run_id
    identity = point_identity("collisions", COLLISIONS[0])
    dead_point = client.create_run(
        experiment_id, tags={"kind": "point", **identity, MLFLOW_PARENT_RUN_ID: dead_sweep}
    ).info.run_id
    trainer = CountingTrainer()
    resumed = track_points(store, experiment_id, "collisions", COLLISIONS, trainer=trainer)
    assert trainer.trained == COLLISIONS and dead_point not in resumed.run_ids
    for run_id in (dead_point, dead_sweep):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"] == f"superseded by a re-run (sweep {resumed.sweep_id})"
    assert sorted(finished_per_identity(store, experiment_id).values()) == [1, 1, 1]


def test_a_repeated_config_is_refused_before_anything_is_written(store):
    experiment_id = store.experiment_id("repeated")
    with pytest.raises(ValueError, match="repeat a configuration"):
        track_points(store, experiment_id, "collisions", COLLISIONS[:1] * 2, trainer=CountingTrainer())
    assert search_all(store, [experiment_id], "") == []


# ------------------------------------------------------------------------------------------------------------
# End to end: SIGKILL, re-run, report

# About a second per point on one thread (150 µs a step at n = 8; measured). One torch thread: on a shared
# 2-core machine two threads fighting over tiny tensors run several times slower, and unevenly.
E2E_STEPS = "6000"
E2E_MS = (8, 12, 16, 20)


def finished_points_in(database: Path) -> list[str]:
    """Run ids of FINISHED point runs, read straight from the SQLite file (read-only, so the CLI that is
    creating and writing the store is never disturbed); [] while its tables do not exist yet."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            rows = connection.execute(
                "SELECT runs.run_uuid FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                "WHERE tags.key = 'kind' AND tags.value = 'point' AND runs.status = 'FINISHED'"
            ).fetchall()
    except sqlite3.Error:
        return []
    return [row[0] for row in rows]


def test_a_killed_collisions_sweep_resumes_and_reports(tmp_path):
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    command = [sys.executable, str(ROOT / "cli.py"), "incidental", "collisions", "--n", "8"]
    command += [
        "--m",
        ",".join(map(str, E2E_MS)),
        "--instances",
        "2",
        "--steps",
        E2E_STEPS,
        "--tracking-uri",
        uri,
    ]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_")}
    environment |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    started = time.monotonic()
    victim = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    before: list[str] = []
    while not before:
        if victim.poll() is not None:
            pytest.fail(f"the sweep ended before it was killed:\n{victim.stdout.read().decode()}")
        assert time.monotonic() - started < 60, "no point finished within 60 s"
        time.sleep(0.05)
        before = finished_points_in(database)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic() - started

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("incidental").experiment_id
    (dead_sweep,) = client.search_runs([experiment_id], "tags.kind = 'sweep'")
    assert dead_sweep.info.status == "RUNNING"  # killed mid-sweep: nothing could close it
    assert len(before) < len(E2E_MS)

    rerun_started = time.monotonic()
    rerun = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )
    rerun_s = time.monotonic() - rerun_started
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    (sweep,) = client.search_runs([experiment_id], "tags.kind = 'sweep' and attributes.status = 'FINISHED'")
    table = read_csv_artifact(open_store(uri), sweep.info.run_id, "collisions.csv")
    assert list(table["m"]) == list(E2E_MS)
    # The points finished before the kill are the same runs, reused: older than the re-run, not retrained.
    assert sorted(table["run_id"][table["reused"]]) == sorted(before)
    assert sweep.data.metrics["points_reused"] == len(before)
    assert sweep.data.metrics["points_trained"] == len(E2E_MS) - len(before)
    for run_id in before:
        run = client.get_run(run_id)
        assert run.info.start_time < sweep.info.start_time
        assert run.data.tags["sweep_id"] == dead_sweep.data.tags["sweep_id"]
    # Every identity FINISHED exactly once; nothing left RUNNING; the killed sweep closed as superseded.
    points = client.search_runs([experiment_id], "tags.kind = 'point' and attributes.status = 'FINISHED'")
    assert sorted(Counter(run.data.tags["config_hash"] for run in points).values()) == [1] * len(E2E_MS)
    assert set(table["run_id"]) == {run.info.run_id for run in points}
    assert client.search_runs([experiment_id], "attributes.status = 'RUNNING'") == []
    dead = client.get_run(dead_sweep.info.run_id)
    assert dead.info.status == "FAILED" and dead.data.tags["failure_reason"].startswith(
        "superseded by a re-run"
    )

    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "incidental", "report", "--tracking-uri", uri, "--no-log"]
        + ["--out", str(out), "--resamples", "200"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert list(pd.read_csv(out / "collisions.csv")["m"]) == list(E2E_MS)
    assert set(pd.read_csv(out / "per_instance.csv")["run_id"]) == set(table["run_id"])
    print(
        f"\nkilled at {killed_at:.1f} s with {len(before)} of {len(E2E_MS)} points FINISHED; re-run "
        f"{rerun_s:.1f} s; total {time.monotonic() - started:.1f} s"
    )
