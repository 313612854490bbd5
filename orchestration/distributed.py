"""Distributed sweeps on Dask: one task per configuration's seed batch, recorded by the worker itself.

    client (cli.py sweep --executor dask)            worker process
      sweep run (kind=sweep), RUNNING                  train_and_record(task, config):
      one task per configuration not FINISHED            FINISHED run of this identity? reuse it
      progress over configurations                       RUNNING run of this identity and sweep? a dead
      summary.csv with every ablation run id;             attempt's: FAILED, "superseded by a retry"
      the sweep run FINISHED (FAILED if one failed)      open the ablation run, train, log every seed
                                                         and the summary straight to the server

This is orchestration: it wires training (`pipeline`) to recording (`tracking`); the
vectorized engine stays the inner loop (all seeds of a configuration in one batched pass). Workers log to
the tracking server themselves: it must be an http(s) server every worker reaches (with
`--serve-artifacts`, so no shared folder is needed), and every worker must run the client's code version.

Faults: Dask reruns the task of a worker that died on another worker (up to `distributed.scheduler.
allowed-failures` times) and a task that raised up to `retries` times. MLflow's HTTP client retries
refused connections and 5xx answers with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR; set on the client, they are handed to the workers), so a tracking
server restarted within that window costs nothing; past it the task fails, and a re-run of the sweep
resumes: FINISHED work is reused, never lost. Two sweeps of one identity at once can both train it (each
checks before either finishes; the local executor's claim, tracking/taming.py `_contest`, is not used
here, since a task that waited would hold a worker); the report counts such duplicates once.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlflow import MlflowClient

from pipeline.config import AblationConfig
from tracking.recorder import reason_of, recover_experiment
from tracking.store import Store, TrackingError, code_version, fail_run
from tracking.taming import (
    AblationOutcome,
    SweepNaming,
    finish_sweep_run,
    finished_runs_for,
    new_sweep_id,
    partition_reused,
    record_ablation,
    reused_outcome,
    start_ablation_run,
    start_sweep_run,
    supersede_running_runs,
)

# MLflow's HTTP retry settings, passed from the client's environment to every task.
HTTP_RETRY_VARIABLES = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)
# Fault injection for the tests only: a path; the first task to create that file exits its worker
# process right after training, leaving its ablation run RUNNING as a killed worker would.
EXIT_ONCE_VARIABLE = "POLYLAB_TEST_EXIT_WORKER_ONCE"
TASK_RETRIES = 2


@dataclass(frozen=True)
class SweepTask:
    """Everything a worker needs besides the configuration (small and picklable)."""

    tracking_uri: str
    experiment_id: str
    sweep_id: str
    naming: SweepNaming
    seeds: tuple[int, ...]
    force: bool = False
    artifacts: bool = True
    device: str = "cpu"
    environment: dict[str, str] = field(default_factory=dict)


def _exit_once_for_tests() -> None:
    marker = os.environ.get(EXIT_ONCE_VARIABLE)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(70)


def train_and_record(task: SweepTask, config: AblationConfig) -> AblationOutcome:
    """On a worker: reuse, or supersede a dead attempt, train all seeds of `config` and record them."""
    from pipeline.experiments.taming import run_ablations

    os.environ.update(task.environment)
    store = Store(task.tracking_uri, MlflowClient(tracking_uri=task.tracking_uri))
    seeds = list(task.seeds)
    if not task.force:
        existing = finished_runs_for(store, task.experiment_id, config, seeds, task.artifacts)
        if existing:
            return reused_outcome(existing[0], config, task.naming)
    supersede_running_runs(store, task.experiment_id, config, seeds, task.sweep_id)
    run_id = start_ablation_run(
        store,
        task.experiment_id,
        config,
        seeds,
        sweep_id=task.sweep_id,
        naming=task.naming,
        artifacts=task.artifacts,
    )
    try:
        result = run_ablations([config], seeds, device=task.device)[0]
        _exit_once_for_tests()
        return record_ablation(
            store,
            task.experiment_id,
            run_id,
            result,
            seeds,
            sweep_id=task.sweep_id,
            artifacts=task.artifacts,
            force=task.force,
            naming=task.naming,
        )
    except BaseException as error:
        fail_run(store, run_id, reason_of(error))
        raise


def _connect(scheduler: str | None, workers: int):
    """A Dask client: to `scheduler`, else to a new LocalCluster of `workers` single-threaded processes."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="15s"), None
        except (OSError, TimeoutError) as error:
            raise TrackingError(f"--scheduler {scheduler} is unreachable ({error})") from error
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _check_worker_code_versions(client) -> None:
    versions = client.run(code_version)
    mine = code_version()
    different = {worker: version for worker, version in versions.items() if version != mine}
    if different:
        raise TrackingError(
            f"Dask worker(s) run another version of pipeline/ than this checkout ({mine}): {different}; "
            "start the workers from the same checkout"
        )


def run_dask_sweep(
    store: Store,
    experiment_id: str,
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    *,
    scheduler: str | None = None,
    workers: int = 2,
    naming: SweepNaming | None = None,
    design: dict | None = None,
    force: bool = False,
    artifacts: bool = True,
    device: str = "cpu",
    adopted_run_id: str | None = None,
    on_reuse: Callable[[AblationConfig, str], None] | None = None,
    on_plan: Callable[[list[AblationConfig]], None] | None = None,
    on_done: Callable[[AblationOutcome], None] | None = None,
) -> tuple[str, list[AblationOutcome]]:
    """Train and record every configuration not already FINISHED as one Dask task each.

    Returns (sweep id, outcomes in order), like `tracking.taming.run_tracked_sweep`. A task that still
    fails after its retries is a "failed" outcome (its run FAILED where the server could be reached);
    the sweep run then ends FAILED, and a re-run picks up what is missing.
    """
    if urllib.parse.urlparse(store.uri).scheme not in ("http", "https"):
        raise TrackingError(
            f"--executor dask needs an MLflow server every worker reaches (http:// or https://); "
            f"got {store.uri}"
        )
    seeds = list(seeds)
    naming = naming or SweepNaming()
    sweep_id = new_sweep_id()
    outcomes: list[AblationOutcome | None] = [None] * len(configs)
    # What dead commands left open is closed first (runs of live sweeps are left alone).
    recover_experiment(store, experiment_id)
    pending = partition_reused(
        store, experiment_id, configs, seeds, outcomes, force, on_reuse, naming, artifacts
    )
    # Connect (and check the workers) before the first write, so a bad --scheduler leaves nothing behind.
    client, cluster = _connect(scheduler, workers) if pending else (None, None)
    try:
        if client is not None:
            _check_worker_code_versions(client)
        sweep_run_id = start_sweep_run(
            store, experiment_id, sweep_id, len(configs), seeds, naming, adopted_run_id, design
        )
        task = SweepTask(
            tracking_uri=store.uri,
            experiment_id=experiment_id,
            sweep_id=sweep_id,
            naming=naming,
            seeds=tuple(seeds),
            force=force,
            artifacts=artifacts,
            device=device,
            environment={name: os.environ[name] for name in HTTP_RETRY_VARIABLES if name in os.environ},
        )
        try:
            if on_plan is not None:
                on_plan([configs[index] for index in pending])
            if pending:
                _submit_and_collect(client, task, configs, pending, outcomes, on_done)
            finish_sweep_run(store, sweep_run_id, outcomes)  # type: ignore[arg-type]
        except BaseException as error:
            fail_run(store, sweep_run_id, reason_of(error))
            raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return sweep_id, outcomes  # type: ignore[return-value]


def _submit_and_collect(client, task: SweepTask, configs, pending, outcomes, on_done) -> None:
    """One task per pending configuration; outcomes filled in as they complete."""
    from distributed import as_completed

    futures = {
        client.submit(
            train_and_record,
            task,
            configs[index],
            key=f"ablation-{configs[index].hash()}-{task.sweep_id}",
            retries=TASK_RETRIES,
            pure=False,
        ): index
        for index in pending
    }
    try:
        for future in as_completed(futures):
            index = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # noqa: BLE001 - one configuration's failure, reported
                outcome = AblationOutcome(
                    configs[index], "", "failed", failure=f"{type(error).__name__}: {error}"
                )
            outcomes[index] = outcome
            if on_done is not None:
                on_done(outcome)
    except BaseException:
        client.cancel(list(futures))
        raise
