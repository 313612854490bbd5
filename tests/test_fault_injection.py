"""A sweep interrupted at named instants (SIGINT, SIGTERM, SIGKILL) leaves a store the next command repairs.

Each case starts `cli.py sweep` (two configurations × 2 seeds, one pass each) as a subprocess, signals it
at one point, then checks what it left: no FINISHED seed run under an unfinished ablation, and a clean
exit with one line for SIGINT/SIGTERM. A resumed sweep must then leave nothing RUNNING, every identity
FINISHED exactly once, and every run FINISHED before the signal kept (same run ids).

The subprocess runs cli.py's commands through orchestration.signals.run_cli, as cli.main does once it
installs the handlers. The instant "between-parent-and-children" is reached through the test-only hook
tracking.taming.fault_point (it sleeps there after creating a marker file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = "import sys, cli; from orchestration.signals import run_cli; sys.exit(run_cli(cli.cli, 'cli.py'))"
SWEEP = ["sweep", "--grid", "network.lambda_reg=1e-4,1e-3", "--seeds", "2", "--epochs", "20"]
SWEEP += ["--sae-epochs", "10", "--samples", "64", "--no-artifacts", "--batching", "per-config"]
DEADLINE_S = 60


def environment(**extra: str) -> dict[str, str]:
    values = {
        name: value for name, value in os.environ.items() if not name.startswith(("MLFLOW_", "POLYLAB"))
    }
    return values | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} | extra


def all_runs(client: MlflowClient) -> list:
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiments, "", max_results=1000)


def check_no_finished_child_under_unfinished_parent(runs: list) -> None:
    status = {run.info.run_id: run.info.status for run in runs}
    for run in runs:
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if run.data.tags.get("kind") == "seed" and run.info.status == "FINISHED":
            assert status.get(parent) == "FINISHED", (
                f"FINISHED seed {run.info.run_id} under {status.get(parent)}"
            )


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    started = time.monotonic()
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{process.stdout.read()}")
        assert time.monotonic() - started < DEADLINE_S, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.1)


def of_kind(client: MlflowClient, kind: str, status: str | None = None):
    return [
        run
        for run in all_runs(client)
        if run.data.tags.get("kind") == kind and (status is None or run.info.status == status)
    ]


CASES = [
    # (signal, when): when is "seed" (first seed run appears), "ablation" (first ablation FINISHED) or a
    # fault point of tracking.taming.record_ablation.
    (signal.SIGINT, "seed"),
    (signal.SIGTERM, "between-parent-and-children"),
    (signal.SIGKILL, "between-parent-and-children"),
    (signal.SIGKILL, "ablation"),
]


@pytest.mark.parametrize(("signum", "when"), CASES, ids=[f"{s.name}-{w}" for s, w in CASES])
def test_a_signalled_sweep_resumes_with_every_identity_finished_once(tmp_path, signum, when):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    marker = tmp_path / "fault-reached"
    extra = {"POLYLAB_TEST_FAULT_POINT": when, "POLYLAB_TEST_FAULT_MARKER": str(marker)}
    started = time.monotonic()
    victim = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *SWEEP, "--tracking-uri", uri],
        cwd=ROOT,
        env=environment(**(extra if when not in ("seed", "ablation") else {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        if when == "seed":
            wait_until(
                lambda: (tmp_path / "mlflow.db").exists() and of_kind(client, "seed"), victim, "seed run"
            )
        elif when == "ablation":
            wait_until(
                lambda: (tmp_path / "mlflow.db").exists() and of_kind(client, "ablation", "FINISHED"),
                victim,
                "FINISHED ablation",
            )
        else:
            wait_until(marker.exists, victim, f"fault point {when}")
        victim.send_signal(signum)
        output, _ = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    signalled_s = time.monotonic() - started

    left = all_runs(client)
    check_no_finished_child_under_unfinished_parent(left)
    finished_before = {run.info.run_id for run in left if run.info.status == "FINISHED"}
    if signum != signal.SIGKILL:
        assert victim.returncode == 128 + signum, output
        assert "Traceback" not in output, output
        assert f"Interrupted by {signum.name}" in output
        reasons = {run.data.tags.get("failure_reason") for run in left if run.info.status == "FAILED"}
        assert f"interrupted by {signum.name}" in reasons, reasons
    if when == "between-parent-and-children":
        # The ablation is FINISHED, its seeds (all logged) still RUNNING: completed by the next command.
        assert of_kind(client, "ablation", "FINISHED") and not of_kind(client, "seed", "FINISHED")
        completing = {run.info.run_id for run in of_kind(client, "seed", "RUNNING")}
        assert len(completing) == 2
    else:
        completing = set()

    resumed = subprocess.run(
        [sys.executable, "cli.py", *SWEEP, "--tracking-uri", uri],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = all_runs(client)
    check_no_finished_child_under_unfinished_parent(runs)
    assert [run.info.run_id for run in runs if run.info.status == "RUNNING"] == []
    finished = {run.info.run_id for run in runs if run.info.status == "FINISHED"}
    assert finished_before | completing <= finished  # nothing FINISHED before the signal lost
    ablations = Counter(run.data.tags["config_hash"] for run in of_kind(client, "ablation", "FINISHED"))
    assert sorted(ablations.values()) == [1, 1]
    seeds = Counter(
        (run.data.tags["config_hash"], run.data.tags["seed"]) for run in of_kind(client, "seed", "FINISHED")
    )
    assert len(seeds) == 4 and set(seeds.values()) == {1}
    print(
        f"\n{signum.name} at {when}: signalled after {signalled_s:.1f} s, total {time.monotonic() - started:.1f} s"
    )
