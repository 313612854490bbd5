"""Running a taming sweep: the design's configurations trained (`pipeline`) and recorded (`tracking`).

This is the one place that composes the two: it picks the executor (this process, a local worker pool,
or Dask), opens the store, shows progress, and hands every trained seed to the recorder. `cli.py` only
parses options into a design and calls `run_sweep`; tests and notebooks can call it the same way.

Order matters for speed on a small machine: nothing here imports torch or MLflow before the worker
processes are started, so their start-up overlaps with those imports.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Processes for `sweep --workers` with Dask (the local default is chosen per sweep by `auto_workers`).
DEFAULT_DASK_WORKERS = max(1, min(os.cpu_count() or 1, 4))


class InputError(ValueError):
    """The request cannot run as given (a bad option or store); the message is one sentence for the user."""


@dataclass(frozen=True)
class SweepRequest:
    """What to run and where. `configs[i]` is named `labels[i]`; `axes` are the dotted paths that vary."""

    configs: Sequence
    labels: Sequence[str]
    axes: tuple[str, ...]
    design_name: str
    seeds: Sequence[int]
    design: dict | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    device: str = "cpu"
    share_passes: bool = True
    force: bool = False
    artifacts: bool = True
    executor: str = "local"
    scheduler: str | None = None
    workers: int | None = None
    adopt_as: str = "sweep"


@dataclass
class SweepResult:
    sweep_id: str
    experiment_id: str
    experiment_name: str
    store_uri: str
    outcomes: list
    reused: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list:
        return [outcome for outcome in self.outcomes if outcome.status == "failed"]

    @property
    def retired(self) -> list[str]:
        """Ablation run ids deleted (with their seed runs) because this sweep replaced them: older runs of
        an identity it retrained with --force, and --no-artifacts runs of one it recorded with artifacts."""
        return [run_id for outcome in self.outcomes for run_id in getattr(outcome, "retired", [])]


def _progress_bar(total: int, description: str, unit: str = "epoch"):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=description, unit=unit, unit_scale=True, dynamic_ncols=True, mininterval=0.5
    )


def open_store(tracking_uri: str | None, *, writing: bool = True):
    """The checked store, or InputError with the store's one-sentence problem. `writing=False` for
    commands that only read: a missing store is an error (none is created), and a read-only one works."""
    from tracking.store import TrackingError
    from tracking.store import open_store as open_tracking_store

    try:
        return open_tracking_store(tracking_uri, writing=writing)
    except TrackingError as error:
        raise InputError(str(error)) from None


def adopted_run(store, experiment_id: str | None = None):
    """The run `mlflow run` created for this process (MLFLOW_RUN_ID), if any, not yet used, and (when
    `experiment_id` is given) in that experiment."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = store.client.get_run(run_id)
    except MlflowException:
        # A stale MLFLOW_RUN_ID from another store or shell: not ours to adopt.
        return None
    if run.data.tags.get("kind"):
        return None
    if experiment_id is not None and run.info.experiment_id != experiment_id:
        return None
    return run


def experiment_for(store, name: str | None, *, create: bool = True) -> tuple[str, str]:
    """(id, name) of the experiment a command works in: --experiment, else the one `mlflow run` hands
    over, else 'taming'."""
    from tracking.store import TrackingError

    try:
        experiment_id = store.experiment_id(name, create=create)
    except TrackingError as error:
        raise InputError(str(error)) from None
    return experiment_id, store.client.get_experiment(experiment_id).name


def experiment_and_adopted_run(store, name: str | None, *, create: bool = True, lookup=None):
    """(experiment id, name, adopted run or None) for every command: the run `mlflow run` created decides
    the experiment when --experiment is not given; with --experiment naming another one it is not adopted.

    `lookup(store, name, create)` → (id, name) resolves --experiment (default: `experiment_for`, whose
    default experiment is 'taming'); the incidental study passes its own.
    """
    adopted = adopted_run(store)
    if adopted is not None and name is None:
        experiment_id = adopted.info.experiment_id
        store.declare_experiment_kind(experiment_id)  # `mlflow run` made it, without our tag
        return experiment_id, store.client.get_experiment(experiment_id).name, adopted
    experiment_id, experiment_name = (lookup or experiment_for)(store, name, create=create)
    if adopted is not None and adopted.info.experiment_id != experiment_id:
        adopted = None
    return experiment_id, experiment_name, adopted


class StoreUnavailable(RuntimeError):
    """The tracking store failed mid-command (a full disk, a lost server, a damaged database); the
    message is one sentence, and what was FINISHED is kept."""


def reports_store_faults(command: Callable) -> Callable:
    """Decorate an orchestration command so that a store fault inside it is StoreUnavailable, one sentence
    from `tracking.store.describe_store_failure` (exit 1), and a store the user named wrongly is InputError
    (exit 2). Open runs are already closed FAILED on the way out, where the store still accepts writes.

    The store is the command's `tracking_uri` keyword or its request's `tracking_uri`. Any other error
    (a bug, an interruption) passes through unchanged.
    """

    @functools.wraps(command)
    def wrapper(*arguments, **keywords):
        from tracking.uri import TrackingError  # not tracking.store: MLflow (1 s) waits for the workers

        try:
            return command(*arguments, **keywords)
        except (InputError, StoreUnavailable):
            raise
        except TrackingError as error:
            raise InputError(str(error)) from None
        except Exception as error:
            from tracking.store import describe_store_failure, is_store_failure, resolve_tracking_uri

            if not is_store_failure(error):
                raise
            option = keywords.get(
                "tracking_uri", getattr(arguments[0] if arguments else None, "tracking_uri", None)
            )
            raise StoreUnavailable(describe_store_failure(error, resolve_tracking_uri(option))) from error

    return wrapper


def _check_request(request: SweepRequest) -> int:
    """Problems found before anything starts; returns the worker count."""
    from pipeline.experiments.pool import auto_workers

    if request.device != "cpu":
        from pipeline.train import resolve_device

        try:
            resolve_device(request.device)
        except ValueError as error:
            raise InputError(f"--device: {error}") from None
    if request.scheduler is not None and request.executor != "dask":
        raise InputError("--scheduler names a Dask scheduler; use it with --executor dask")
    if request.scheduler is not None and request.workers is not None:
        raise InputError(
            "--workers sizes the local executor or the LocalCluster started without --scheduler; drop one"
        )
    if request.executor == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise InputError(
                '--executor dask needs Dask distributed: pip install "dask[distributed]>=2024.1"'
            ) from None
        return request.workers or DEFAULT_DASK_WORKERS
    return request.workers or auto_workers(request.configs, list(request.seeds), request.device)


@reports_store_faults
def run_sweep(request: SweepRequest) -> SweepResult:
    """Train every configuration of the request not already FINISHED in the store, record everything.

    Raises InputError before anything is written when the request cannot run (a bad device, URI or
    executor combination); the caller turns it into exit code 2.
    """
    from pipeline.experiments.pool import PassPool

    workers = _check_request(request)
    from tracking.uri import TrackingError, check_tracking_uri, is_new_sqlite_store, resolve_tracking_uri

    uri = resolve_tracking_uri(request.tracking_uri)
    try:
        # Before any worker starts or MLflow is imported, so a mistyped URI is reported at once.
        check_tracking_uri(uri)
    except TrackingError as error:
        raise InputError(str(error)) from None
    if request.executor == "dask" and not uri.startswith(("http://", "https://")):
        raise InputError(
            f"--executor dask: workers log straight to the tracking server, so --tracking-uri must be "
            f"an MLflow server every worker reaches (http:// or https://); got {uri}"
        )
    from pipeline.runtime import retain_freed_memory

    retain_freed_memory()  # this process unpickles and records every trained seed
    pool = None
    if request.executor == "local" and workers > 1:
        # Started before the store is opened: the workers import torch while this process sets up MLflow.
        pool = PassPool(workers).start()
        if request.artifacts:
            pool.paint_overlaps(
                {config.hash(): label for config, label in zip(request.configs, request.labels, strict=True)}
            )
        if is_new_sqlite_store(uri):
            # A new store holds nothing to reuse, so everything will train: start it now, while MLflow
            # creates the database (about 2 s on a 2-core machine).
            pool.prefetch(request.configs, list(request.seeds), request.share_passes, request.device)
    try:
        return _sweep_into_store(request, workers, pool)
    finally:
        if pool is not None:
            pool.close()


def _sweep_into_store(request: SweepRequest, workers: int, pool) -> SweepResult:
    from pipeline.experiments.pool import plan_passes, total_work
    from pipeline.experiments.taming import run_ablations
    from tracking.taming import SweepNaming, run_tracked_sweep

    store = open_store(request.tracking_uri)
    experiment_id, experiment_name, adopted = experiment_and_adopted_run(store, request.experiment)
    seeds = list(request.seeds)
    naming = SweepNaming(
        design=request.design_name,
        labels={config.hash(): label for config, label in zip(request.configs, request.labels, strict=True)},
        axes=tuple(request.axes),
    )
    bar = None
    reused: list[str] = []
    passes = {"planned": 0, "trained": 0}

    def plan(pending) -> None:
        nonlocal bar
        if request.executor == "dask":
            if pending:
                bar = _progress_bar(
                    len(pending), f"{len(pending)} config(s) × {len(seeds)} seeds on Dask", "config"
                )
            return
        # run_tracked_sweep calls the trainer once per group of configurations sharing a pass.
        passes["planned"] = len(plan_passes(pending, seeds, request.share_passes)) if pending else 0
        if pending:
            bar = _progress_bar(
                total_work(pending, seeds, request.share_passes, workers),
                f"{len(pending)} config(s) × {len(seeds)} seeds",
            )

    def trainer(group, seed_list, share_passes, progress, on_seed):
        results = run_ablations(
            group,
            seed_list,
            share_passes=share_passes,
            progress=progress,
            device=request.device,
            pool=pool,
            on_seed=on_seed,
        )
        passes["trained"] += 1
        if pool is not None and passes["trained"] == passes["planned"]:
            pool.release()  # the workers exit while this process records the last seeds
        return results

    def on_reuse(config, run_id) -> None:
        reused.append(f"{naming.label(config)} (run {run_id})")

    adopted_run_id = adopted.info.run_id if adopted is not None else None
    try:
        if request.executor == "dask":
            sweep_id, outcomes = _run_dask(
                request, store, experiment_id, naming, adopted_run_id, workers, plan, on_reuse, lambda: bar
            )
        else:
            sweep_id, outcomes = run_tracked_sweep(
                store,
                experiment_id,
                request.configs,
                seeds,
                trainer=trainer,
                naming=naming,
                design=request.design,
                force=request.force,
                adopted_run_id=adopted_run_id,
                adopt_as=request.adopt_as,
                share_passes=request.share_passes,
                artifacts=request.artifacts,
                progress=lambda count: bar.update(count),
                on_reuse=on_reuse,
                on_plan=plan,
            )
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(sweep_id, experiment_id, experiment_name, store.uri, outcomes, reused)


def _run_dask(
    request, store, experiment_id, naming, adopted_run_id, workers, plan, on_reuse, current_bar: Callable
):
    """The sweep as one Dask task per configuration; a progress bar over configurations."""
    from mlflow.exceptions import MlflowException

    from orchestration.distributed import run_dask_sweep
    from tracking.store import TrackingError

    try:
        return run_dask_sweep(
            store,
            experiment_id,
            request.configs,
            list(request.seeds),
            scheduler=request.scheduler,
            workers=workers,
            naming=naming,
            design=request.design,
            force=request.force,
            artifacts=request.artifacts,
            device=request.device,
            adopted_run_id=adopted_run_id,
            on_reuse=on_reuse,
            on_plan=plan,
            on_done=lambda outcome: current_bar().update(1),
        )
    except TrackingError as error:
        raise InputError(str(error)) from None
    except MlflowException as error:
        raise StoreUnavailable(
            f"the tracking server {store.uri} stopped answering ({error.message.splitlines()[0]}). "
            "Runs FINISHED so far are kept: re-run the same command to resume."
        ) from error


def summary_table(result: SweepResult, metrics: Sequence[str]):
    """One row per configuration, 'mean ± std' per metric, for printing."""
    from pipeline.tables import mean_plus_minus
    from tracking.taming import summary_frame

    frame = summary_frame(result.outcomes, metrics)
    for metric in metrics:
        frame[metric] = [
            mean_plus_minus(m, s) for m, s in zip(frame[metric], frame.pop(f"{metric}_std"), strict=True)
        ]
    return frame
