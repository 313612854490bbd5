"""Distributed sweeps on a real Dask cluster against a real `mlflow server`, with faults survived.

Loopback only: one `mlflow server` (SQLite backend, `--serve-artifacts`; no folder shared with the
workers) and one Dask LocalCluster of two single-threaded worker processes serve the whole module.
Every wait has a deadline, and the server, the cluster and every subprocess are stopped however a test
ends. The server-restart test comes last because it stops and restarts the shared server.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack, suppress
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
from pipeline.config import preset_configs
from pipeline.experiments.pool import seed_chunks, total_work
from pipeline.experiments.taming import run_ablations
from tests.conftest import tiny_config

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None,
    reason='the Dask executor needs Dask distributed: pip install "dask[distributed]>=2024.1"',
)

# running_server and its helpers; imported inside fixtures, so that pytest rewrites the plugin's asserts.
pytest_plugins = ["tests.servers"]

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--seeds", "2", "--epochs", "20", "--sae-epochs", "10", "--samples", "64", "--no-artifacts"]
SWEEP_TIMEOUT_S = 150.0
NAMES = [config.name for config in preset_configs("strategic")]
# MLflow's HTTP client: retries with backoff 0, 1, 2, 4, 8, 16 s (+ up to 1 s jitter each), about half a
# minute in all: enough to ride out a server restart of ~12 s on 2 cores.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class RestartableServer:
    """tests.servers.running_server on a port kept across a stop and a start (same database, artifacts)."""

    def __init__(self, folder: Path) -> None:
        from tests import servers

        self.servers = servers
        self.folder = folder
        self.port = servers.free_port()
        self.uri = f"http://{servers.HOST}:{self.port}"
        self.stack: ExitStack | None = None

    def start(self) -> None:
        stack = ExitStack()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(self.servers, "free_port", lambda: self.port)
            server = stack.enter_context(self.servers.running_server(self.folder))
        assert server.uri == self.uri
        self.server, self.stack = server, stack

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    restartable = RestartableServer(tmp_path_factory.mktemp("dask-server"))
    restartable.start()
    try:
        yield restartable
    finally:
        restartable.stop()


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 single-threaded worker processes, and a client of the test's own."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local,
        Client(local, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        yield local.scheduler_address, client


def sweep_arguments(uri: str, experiment: str, *extra: str) -> list[str]:
    return [
        "sweep",
        "--preset",
        "strategic",
        *TINY,
        "--executor",
        "dask",
        "--tracking-uri",
        uri,
        "--experiment",
        experiment,
        *extra,
    ]


def start_cli(arguments: list[str], folder: Path) -> subprocess.Popen:
    """`python cli.py ...` in its own process group (so it can be stopped with all its children)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *arguments],
        cwd=folder,
        env={**os.environ, **HTTP_RETRIES},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = SWEEP_TIMEOUT_S) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        output, _ = process.communicate()
        pytest.fail(f"the sweep did not finish within {timeout:.0f} s:\n{output[-4000:]}")
    return process.returncode, output


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def experiment_runs(uri: str, experiment: str, kind: str) -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.kind = '{kind}'", max_results=1000)


def assert_each_identity_finished_once(uri: str, experiment: str) -> None:
    """8 ablations × 2 seeds: one FINISHED ablation run per configuration, one FINISHED seed run per seed."""
    ablations = [run for run in experiment_runs(uri, experiment, "ablation") if run.info.status == "FINISHED"]
    assert Counter(run.data.tags["config_name"] for run in ablations) == Counter(dict.fromkeys(NAMES, 1))
    finished_parents = {run.info.run_id for run in ablations}
    seeds = [
        run
        for run in experiment_runs(uri, experiment, "seed")
        if run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] in finished_parents
    ]
    assert Counter((run.data.tags["config_name"], run.data.tags["seed"]) for run in seeds) == Counter(
        {(name, seed): 1 for name in NAMES for seed in ("0", "1")}
    )
    sweeps = experiment_runs(uri, experiment, "sweep")
    assert any(run.info.status == "FINISHED" for run in sweeps)


@needs_dask
def test_dask_sweep_on_a_local_cluster_records_every_configuration_once(server, tmp_path):
    """No --scheduler: the CLI starts its own LocalCluster of 2 worker processes."""
    result = CliRunner().invoke(cli.cli, sweep_arguments(server.uri, "dask-local", "--workers", "2"))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}\n{server.server.log_tail()}"
    assert "random·bipolar·l1·relu" in result.output and "macs" in result.output
    assert_each_identity_finished_once(server.uri, "dask-local")
    (sweep,) = experiment_runs(server.uri, "dask-local", "sweep")
    assert sweep.data.params["preset"] == "strategic" and sweep.info.status == "FINISHED"
    assert sweep.data.metrics["ablations_finished"] == 8
    # The sweep's summary.csv names every ablation run, as the report reads it.
    from tracking.analysis import sweep_ablation_run_ids
    from tracking.store import open_store

    store = open_store(server.uri)
    ablation_ids = {run.info.run_id for run in experiment_runs(server.uri, "dask-local", "ablation")}
    listed = sweep_ablation_run_ids(store, sweep.info.experiment_id, sweep.data.tags["sweep_id"])
    assert set(listed) == ablation_ids and len(listed) == 8
    # A re-run reuses all 8 without starting any work.
    again = CliRunner().invoke(cli.cli, sweep_arguments(server.uri, "dask-local", "--workers", "2"))
    assert again.exit_code == 0 and "Reused 8 FINISHED configuration(s)" in again.output
    assert len(experiment_runs(server.uri, "dask-local", "ablation")) == 8


@needs_dask
def test_a_killed_worker_is_retried_and_its_run_superseded(server, cluster, tmp_path):
    """The first task to train exits its worker process (os._exit) with its ablation run RUNNING."""
    from orchestration.distributed import EXIT_ONCE_VARIABLE

    address, client = cluster
    marker = tmp_path / "worker-exited"

    def set_variable(value: str | None) -> None:
        # Defined here so that Dask ships it by value (a bound os.environ method would carry a copy).
        import os

        if value is None:
            os.environ.pop(EXIT_ONCE_VARIABLE, None)
        else:
            os.environ[EXIT_ONCE_VARIABLE] = value

    client.run(set_variable, str(marker))
    try:
        result = CliRunner().invoke(cli.cli, sweep_arguments(server.uri, "killed", "--scheduler", address))
    finally:
        with suppress(Exception):
            client.run(set_variable, None)
    assert marker.exists(), "no worker exited: the fault was not injected"
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert_each_identity_finished_once(server.uri, "killed")
    failed = [
        run for run in experiment_runs(server.uri, "killed", "ablation") if run.info.status != "FINISHED"
    ]
    assert len(failed) == 1
    assert failed[0].info.status == "FAILED"
    assert failed[0].data.tags["failure_reason"] == "superseded by a retry"
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the worker that exited


@needs_dask
def test_two_sweeps_at_once_lose_nothing_and_report_counts_duplicates_once(server, cluster, tmp_path):
    address, _ = cluster
    processes = [
        start_cli(sweep_arguments(server.uri, "concurrent", "--scheduler", address), tmp_path)
        for _ in range(2)
    ]
    try:
        results = [finish(process) for process in processes]
    finally:
        for process in processes:
            stop(process)
    for returncode, output in results:
        assert returncode == 0, output[-4000:]
    ablations = experiment_runs(server.uri, "concurrent", "ablation")
    assert all(run.info.status == "FINISHED" for run in ablations)
    assert {run.data.tags["config_name"] for run in ablations} == set(NAMES)
    seeds = [
        run for run in experiment_runs(server.uri, "concurrent", "seed") if run.info.status == "FINISHED"
    ]
    pairs = Counter((run.data.tags["config_name"], run.data.tags["seed"]) for run in seeds)
    assert set(pairs) == {(name, seed) for name in NAMES for seed in ("0", "1")}
    duplicates = sum(pairs.values()) - len(pairs)
    print(f"two sweeps at once: {duplicates} duplicate FINISHED seed run(s)")
    report = CliRunner().invoke(
        cli.cli,
        [
            "report",
            "--experiment",
            "concurrent",
            "--tracking-uri",
            server.uri,
            "--no-log",
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert report.exit_code == 0, report.output
    per_seed = pd.read_csv(tmp_path / "report" / "per_seed.csv")
    assert len(per_seed) == 16 and not per_seed.duplicated(["config", "seed"]).any()
    if duplicates:
        assert f"{duplicates} duplicate FINISHED seed runs" in report.output


@needs_dask
def test_a_server_restart_mid_sweep_is_survived_or_resumed(server, cluster, tmp_path):
    """Stop the server once the first configuration is FINISHED, restart it on the same port and data."""
    address, _ = cluster
    arguments = sweep_arguments(server.uri, "restart", "--scheduler", address)
    process = start_cli(arguments, tmp_path)
    client = MlflowClient(server.uri)
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while True:
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no configuration FINISHED in time"
            experiment = client.get_experiment_by_name("restart")
            if experiment is not None and client.search_runs(
                [experiment.experiment_id], "tags.kind = 'ablation' and attributes.status = 'FINISHED'"
            ):
                break
            time.sleep(0.1)
        server.stop()
        unfinished_when_stopped = process.poll() is None
        time.sleep(1.0)
        server.start()
        returncode, output = finish(process)
    finally:
        stop(process)
    assert unfinished_when_stopped, "the sweep ended before the server stopped; nothing was exercised"
    print(f"server restart: the sweep {'completed' if returncode == 0 else 'stopped'} on its first try")
    if returncode != 0:
        # Past MLflow's retries the sweep must stop clearly, and a re-run must resume it.
        assert "re-run the same command to resume" in output.lower(), output[-4000:]
        returncode, output = finish(start_cli(arguments, tmp_path))
    assert returncode == 0, output[-4000:]
    assert_each_identity_finished_once(server.uri, "restart")


def test_local_workers_split_passes_by_seed_and_match_one_process():
    """--workers 2 (local): each pass split into seed chunks over 2 processes, same results as 1."""
    configs = preset_configs("strategic", tiny_config())[:3]
    members = [(index, seed) for index in range(3) for seed in (0, 1, 2)]
    chunks = seed_chunks(members, 2)
    assert [sorted({seed for _, seed in chunk}) for chunk in chunks] == [[0, 1], [2]]
    assert sorted(member for chunk in chunks for member in chunk) == sorted(members)
    progress: list[int] = []
    one = run_ablations(configs, range(3))
    two = run_ablations(configs, range(3), workers=2, progress=progress.append)
    assert sum(progress) == total_work(configs, range(3), workers=2)
    for result_one, result_two in zip(one, two, strict=True):
        assert [seed.seed for seed in result_two.seeds] == [0, 1, 2]
        for seed_one, seed_two in zip(result_one.seeds, result_two.seeds, strict=True):
            for name, value in seed_one.metrics.items():
                assert math.isclose(value, seed_two.metrics[name], rel_tol=1e-6, abs_tol=1e-9) or (
                    math.isnan(value) and math.isnan(seed_two.metrics[name])
                ), name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--scheduler", "tcp://127.0.0.1:1"], "use it with --executor dask"),
        (["--executor", "dask", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "drop one"),
        (["--executor", "dask"], "must be an MLflow server every worker reaches"),
    ],
)
def test_bad_executor_options_stop_with_exit_2_and_write_nothing(tmp_path, arguments, message):
    store = tmp_path / "mlflow.db"
    result = CliRunner().invoke(cli.cli, ["sweep", *TINY, "--tracking-uri", f"sqlite:///{store}", *arguments])
    assert result.exit_code == 2 and message in result.output
    assert not store.exists()
