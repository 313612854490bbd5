"""The run tree every study records, in study-independent pieces: sweep → unit → replicate.

    sweep run       one per command invocation (kind=sweep)
      unit run      one per thing the sweep computes, nested under it: a taming ablation, an incidental point
        replicate   optionally one per seed under a unit (kind=seed)

A unit has an *identity*: the tags that say what it computed (config hash, code version, the command, …).
A sweep that finds a FINISHED unit with the identity it needs reuses it instead of computing it again; a
forced sweep computes it anyway and then retires (deletes) the older one, so one identity never has two
FINISHED units. A run is FINISHED only after everything it holds is logged, so FINISHED means complete;
RUNNING or FAILED units (a killed or failed invocation) are never reused.

Only the mechanics live here; what a unit is and how its result is read back belong to each study
(tracking/incidental.py, tracking/taming.py).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from tracking.store import Store, fail_run

__all__ = [
    "CURVE_PREFIX",
    "FAILED",
    "FINISHED",
    "NOTE_TAG",
    "RUNNING",
    "SUPERSEDED_REASON",
    "create_child_run",
    "fail_run",
    "failing",
    "figure_writer",
    "find_units",
    "finished_units",
    "finite_metrics",
    "identity_filter",
    "log_files",
    "now_ms",
    "read_csv_artifact",
    "read_step_series",
    "retire_runs",
    "search_all",
    "step_series",
    "supersede_runs",
    "without_logged",
]

FINISHED = RunStatus.to_string(RunStatus.FINISHED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
RUNNING = RunStatus.to_string(RunStatus.RUNNING)
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
CURVE_PREFIX = "curve."  # step series are named curve.<name>, so tables of scalars can leave them out
SUPERSEDED_REASON = "superseded by a re-run"


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------------------------------------
# Writing


def finite_metrics(
    values: Mapping[str, float | None], timestamp: int, step: int = 0, prefix: str = ""
) -> list[Metric]:
    """One Metric per finite value. NaN and ±inf (undefined statistics, e.g. a std over one instance) are
    left out rather than logged: a reader then sees the metric as absent, not as a number."""
    return [
        Metric(prefix + name, float(value), timestamp, step)
        for name, value in values.items()
        if value is not None and math.isfinite(float(value))
    ]


def step_series(
    name: str, steps: Iterable[int], values: Iterable[float], timestamp: int, prefix: str = CURVE_PREFIX
) -> list[Metric]:
    """A curve as one metric with the step as MLflow step (non-finite values left out, as above)."""
    return [
        Metric(prefix + name, float(value), timestamp, int(step))
        for step, value in zip(steps, values, strict=True)
        if math.isfinite(float(value))
    ]


def without_logged(store: Store, run_id: str, params: list[Param]) -> list[Param]:
    """Params not yet on `run_id`: a run `mlflow run` created already carries its entry point's params,
    and logging one again with another value is an error in MLflow."""
    existing = store.client.get_run(run_id).data.params
    return [param for param in params if param.key not in existing]


def log_files(store: Store, run_id: str, files: Mapping[str, Callable[[Path], None]]) -> None:
    """Write each artifact (relative path → writer(path)) into one temporary folder and upload it in one
    call: every upload costs a few milliseconds however small the file."""
    with tempfile.TemporaryDirectory() as folder:
        for relative, write in files.items():
            path = Path(folder) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        store.client.log_artifacts(run_id, folder)


def figure_writer(figure, dpi: int = 100) -> Callable[[Path], None]:
    """A `log_files` writer for a matplotlib figure (PNG)."""
    return lambda path: figure.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


def create_child_run(
    store: Store, experiment_id: str, parent_run_id: str, name: str, tags: Mapping[str, str]
) -> str:
    """Create a RUNNING run nested under `parent_run_id` (the UI shows it under its parent); returns its id."""
    tags = {**tags, MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: name}
    return store.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@contextmanager
def failing(store: Store, run_id: str) -> Iterator[None]:
    """Mark `run_id` FAILED, with "<error type>: <message>" in its failure_reason tag, when the block raises
    (Ctrl-C included); the error then propagates. A FINISHED run is never touched by this."""
    try:
        yield
    except BaseException as error:
        fail_run(store, run_id, f"{type(error).__name__}: {error}")
        raise


# ------------------------------------------------------------------------------------------------------------
# Finding units by identity


def identity_filter(kind: str, identity: Mapping[str, str]) -> str:
    """MLflow search filter for runs of `kind` whose tags equal every item of `identity`.

    Identity values are hashes, names and versions: a quote in one would end the filter's string literal
    (MLflow has no escape for it), so it is refused rather than searched wrongly.
    """
    items = {"kind": kind, **identity}
    for name, value in items.items():
        if "'" in str(value) or "`" in name:
            raise ValueError(f"identity tag {name}={value!r} cannot be searched (quote in it)")
    return " and ".join(f"tags.`{name}` = '{value}'" for name, value in items.items())


def search_all(
    store: Store, experiment_ids: Sequence[str], filter_string: str, order_by: Sequence[str] | None = None
) -> list[Run]:
    """Every active run matching the filter, following MLflow's pagination (a page holds at most 1000)."""
    runs: list[Run] = []
    token = None
    while True:
        page = store.client.search_runs(
            list(experiment_ids),
            filter_string,
            max_results=1000,
            order_by=list(order_by) if order_by else None,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_units(
    store: Store, experiment_id: str, kind: str, identity: Mapping[str, str], status: str
) -> list[Run]:
    """Runs of `kind` with this identity in `status` (FINISHED, RUNNING, FAILED), newest first."""
    return search_all(
        store,
        [experiment_id],
        identity_filter(kind, identity) + f" and attributes.status = '{status}'",
        order_by=["attributes.start_time DESC"],
    )


def finished_units(store: Store, experiment_id: str, kind: str, identity: Mapping[str, str]) -> list[Run]:
    """The FINISHED runs with this identity, newest first: normally none or one (the one to reuse)."""
    return find_units(store, experiment_id, kind, identity, FINISHED)


# ------------------------------------------------------------------------------------------------------------
# Retiring and superseding


def _children(store: Store, run: Run) -> list[Run]:
    return search_all(store, [run.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'")


def retire_runs(store: Store, run_ids: Iterable[str], superseded_by: str | None = None) -> list[str]:
    """Delete runs (and their nested runs) that a forced re-run has replaced; returns the ids deleted.

    Deleted, not just tagged: every search (reuse, reports, the UI's default view) then ignores them, and
    `mlflow gc` can reclaim their artifacts; until then `mlflow runs restore` brings one back. The
    `superseded_by` tag says which run replaced it.
    """
    retired = []
    for run_id in run_ids:
        run = store.client.get_run(run_id)
        for child in _children(store, run):
            store.client.delete_run(child.info.run_id)
        if superseded_by is not None:
            store.client.set_tag(run_id, "superseded_by", superseded_by)
        store.client.delete_run(run_id)
        retired.append(run_id)
    return retired


def supersede_runs(store: Store, run_ids: Iterable[str], reason: str = SUPERSEDED_REASON) -> list[str]:
    """Mark still-RUNNING runs FAILED with `reason`, their RUNNING nested runs too; returns the ids marked.

    A process killed with SIGKILL (or by the machine going down) leaves its runs RUNNING, and nothing else
    will ever close them. MLflow has no heartbeat, so the caller decides a run is dead: normally because a
    re-run is about to redo (or reuse) its work.
    """
    marked = []
    for run_id in run_ids:
        run = store.client.get_run(run_id)
        if run.info.status != RUNNING:
            continue
        for child in _children(store, run):
            if child.info.status == RUNNING:
                fail_run(store, child.info.run_id, reason)
        fail_run(store, run_id, reason)
        marked.append(run_id)
    return marked


# ------------------------------------------------------------------------------------------------------------
# Reading back


def read_csv_artifact(store: Store, run_id: str, artifact: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as folder:
        return pd.read_csv(store.client.download_artifacts(run_id, artifact, folder))


def read_step_series(store: Store, run_id: str, name: str, prefix: str = CURVE_PREFIX) -> dict[int, float]:
    """A step series as {step: value}, in step order (one value per step, as `step_series` logs it)."""
    history = sorted(store.client.get_metric_history(run_id, prefix + name), key=lambda m: m.step)
    return {metric.step: metric.value for metric in history}
