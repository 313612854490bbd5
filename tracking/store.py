"""Where runs go: tracking URI resolution and checks, experiments, code version.

MLflow lives only in `tracking/`. Nothing here writes to a store until `open_store` has checked the URI,
so bad input never leaves an experiment or run behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import RunStatus, ViewType

from tracking.uri import (  # noqa: F401 (re-exported: the checks live in uri.py, free of MLflow)
    CREDENTIALS_HINT,
    TrackingError,
    check_tracking_uri,
    resolve_tracking_uri,
)

DEFAULT_EXPERIMENT = "taming"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# MLflow accepts at most 100 params/tags and 1000 metrics per log_batch call.
BATCH_PARAMS, BATCH_METRICS = 100, 1000


def check_access(client: MlflowClient, uri: str) -> None:
    """Raise TrackingError if an MLflow server refuses this client (missing or wrong credentials).

    MLflow's client sends MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)
    from the environment; one read-only request shows whether the server accepts them, before any write.
    Messages carry the HTTP status only, never a credential or a response body.
    """
    try:
        client.search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as error:
        status = error.get_http_status_code()
        if status == 401:
            raise TrackingError(
                f"--tracking-uri {uri} refused the request: credentials missing or wrong (HTTP 401); "
                f"{CREDENTIALS_HINT}, never on the command line"
            ) from None
        if status == 403:
            raise TrackingError(
                f"--tracking-uri {uri}: the user in MLFLOW_TRACKING_USERNAME may not read experiments "
                "there (HTTP 403); ask the server's administrator for permission"
            ) from None
        raise TrackingError(
            f"--tracking-uri {uri} answers /health but its MLflow API request failed (HTTP {status}); "
            "is it an MLflow tracking server?"
        ) from None


# Experiment tag of MLflow 3's UI for an experiment's kind of work: "custom_model_development" ("Machine
# learning": training runs, opened on the runs table) or "genai_development" (GenAI apps, opened on the
# Overview/Traces pages). Ours hold training runs, so every experiment we create or write to says so. How
# much the UI heeds it depends on its version (from its bundled code): 3.8 and 3.9 open a tagged experiment
# on its runs table, and guess for an untagged one (traces: GenAI pages; runs: runs table; nothing yet: a
# dialog asking the visitor); from 3.10 (checked up to 3.18) the sidebar's "GenAI | Model training" switch,
# kept per browser and GenAI at first, decides for every experiment and the tag is only recorded.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class Store:
    """A checked tracking store and a client bound to it."""

    uri: str
    client: MlflowClient

    def experiment_id(self, name: str | None = None, *, create: bool = True) -> str:
        """Id of experiment `name` (or the one MLflow's environment names), created once if missing.

        Resolution when `name` is None: MLFLOW_EXPERIMENT_NAME, then MLFLOW_EXPERIMENT_ID (what
        `mlflow run` hands over), then "taming". Every caller writes runs there, so the experiment is
        created with EXPERIMENT_KIND_TAG, and one found without it gets it: one that `mlflow run` created
        before any of our code ran, or one made before the project set the tag.
        """
        if name is None:
            if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                name = os.environ["MLFLOW_EXPERIMENT_NAME"]
            elif os.environ.get("MLFLOW_EXPERIMENT_ID"):
                experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
                self.declare_experiment_kind(experiment_id)
                return experiment_id
            else:
                name = DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"--experiment {name!r} is deleted in this store; restore it or pick another name"
                )
            self._declare_kind(experiment)
            return experiment.experiment_id
        if not create:
            raise TrackingError(f"--experiment {name!r} does not exist in {self.uri}")
        try:
            return self.client.create_experiment(
                name,
                artifact_location=self._artifact_location(name),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except mlflow.exceptions.MlflowException:
            # Another process created it between our lookup and create: use theirs.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            self._declare_kind(experiment)
            return experiment.experiment_id

    def declare_experiment_kind(self, experiment_id: str) -> None:
        """Give experiment `experiment_id` EXPERIMENT_KIND_TAG if it lacks it (for a caller that found the
        experiment some other way, e.g. from the run `mlflow run` created)."""
        try:
            experiment = self.client.get_experiment(experiment_id)
        except mlflow.exceptions.MlflowException:
            return  # no such experiment here: the caller's next request says so
        self._declare_kind(experiment)

    def _declare_kind(self, experiment) -> None:
        """Best effort: a kind already set (by a person, in the UI) is kept, and a refused write (a user
        who may only read there) fails nothing: the tag is only a hint to the UI."""
        from contextlib import suppress

        if experiment.lifecycle_stage != "active" or EXPERIMENT_KIND_TAG in experiment.tags:
            return
        with suppress(mlflow.exceptions.MlflowException):
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def _artifact_location(self, name: str) -> str | None:
        """Beside the database for a SQLite store (MLflow's default is ./mlruns of whatever folder the
        command ran in, which scatters artifacts); the server's choice for every other store."""
        if not self.uri.startswith("sqlite:///"):
            return None
        folder = Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlruns"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"
        return f"{folder.as_uri()}/{slug}"

    def existing_experiment_id(self, name: str | None) -> str:
        return self.experiment_id(name, create=False)

    def list_experiments(self) -> list[str]:
        return [
            experiment.name for experiment in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
        ]


@lru_cache(maxsize=1)
def use_sqlite_write_ahead_log() -> None:
    """From now on, open every SQLite connection of this process with a write-ahead log.

    MLflow commits once per call it logs, and in SQLite's default rollback-journal mode every commit waits
    for the disk (fsync; 1.7 ms each on this project's machines, about 750 commits per strategic sweep,
    and more while the store is created). With `journal_mode=WAL` and `synchronous=NORMAL` a commit is
    an append to `mlflow.db-wal`: the database stays consistent after any crash, and a power failure can
    lose only the last commits. The mode is kept in the database file, so `mlflow ui` and other readers
    need nothing special. Where WAL cannot be used (a busy database, some network file systems) the
    connection keeps SQLite's default. Installs its listeners once per process (cached).
    """
    import atexit
    import sqlite3
    import weakref

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    engines: weakref.WeakSet = weakref.WeakSet()

    @event.listens_for(Engine, "connect")
    def _write_ahead(connection, _record) -> None:
        if not isinstance(connection, sqlite3.Connection):
            return
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError:
            pass
        finally:
            cursor.close()

    @event.listens_for(Engine, "engine_connect")
    def _remember(connection) -> None:
        if connection.engine.dialect.name == "sqlite":
            engines.add(connection.engine)

    def _close_connections() -> None:
        # Closing the last connection folds the log back into mlflow.db and removes mlflow.db-wal and
        # -shm, so the database file alone holds everything (e.g. when copied) once the process ends.
        for engine in list(engines):
            engine.dispose()

    atexit.register(_close_connections)


def open_store(option: str | None) -> Store:
    """Resolve and check the tracking URI, then bind a client to it (no write yet)."""
    uri = resolve_tracking_uri(option)
    check_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        use_sqlite_write_ahead_log()
    client = MlflowClient(tracking_uri=uri)
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        check_access(client, uri)
    return Store(uri=uri, client=client)


# What a stored result depends on: data, models, training, SAEs, metrics and the studies' training code.
# Every other file under pipeline/ only reads stored values (statistics, reports, plots, designs, which
# reach the store as config hashes, and runtime tuning) and is listed in OTHER_SOURCES; a test checks that every file
# under pipeline/ is in exactly one of the two, so a new module has to be placed consciously.
RESULT_SOURCES = (
    "pipeline/config.py",
    "pipeline/config_tools.py",
    "pipeline/data.py",
    "pipeline/evaluation.py",
    "pipeline/experiments/incidental.py",
    "pipeline/experiments/pool.py",
    "pipeline/experiments/taming.py",
    "pipeline/incidental.py",
    "pipeline/metrics.py",
    "pipeline/models.py",
    "pipeline/sae.py",
    "pipeline/train.py",
)
OTHER_SOURCES = (
    "pipeline/__init__.py",
    "pipeline/analysis.py",
    "pipeline/conclusions.py",
    "pipeline/design.py",
    "pipeline/dose_response.py",
    "pipeline/experiments/__init__.py",
    "pipeline/experiments/incidental_defaults.py",
    "pipeline/incidental_analysis.py",
    "pipeline/plots/__init__.py",
    "pipeline/plots/dose_response.py",
    "pipeline/plots/incidental.py",
    "pipeline/plots/report.py",
    "pipeline/plots/taming.py",
    "pipeline/published.py",
    "pipeline/runtime.py",
    "pipeline/stats.py",
    "pipeline/tables.py",
)


@lru_cache(maxsize=1)
def code_version() -> str:
    """Fingerprint of what determines results: the sources in RESULT_SOURCES and the torch version.

    Unlike a git commit it changes exactly when the science changes (uncommitted edits included) and not
    when only docs, the CLI, the report or the plots change, so "reuse a finished run" never reuses stale
    results and editing a figure never retrains a sweep.
    """
    digest = hashlib.sha256(torch.__version__.encode())
    for relative in RESULT_SOURCES:
        path = PROJECT_ROOT / relative
        digest.update(relative.encode())
        digest.update(path.read_bytes())
    return "src-" + digest.hexdigest()[:12]


def _git(*arguments: str) -> str:
    return subprocess.run(
        ["git", *arguments], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def log_in_batches(store: Store, run_id: str, metrics=(), params=(), tags=()) -> None:
    """log_batch calls that respect MLflow's per-call limits, as few as possible (usually one)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        store.client.log_batch(
            run_id, metrics=metrics[:BATCH_METRICS], params=params[:BATCH_PARAMS], tags=tags[:BATCH_PARAMS]
        )
        metrics, params, tags = metrics[BATCH_METRICS:], params[BATCH_PARAMS:], tags[BATCH_PARAMS:]


def fail_run(store: Store, run_id: str, reason: str) -> None:
    """Mark a run FAILED with its reason; never raises (it runs while another error propagates)."""
    try:
        store.client.set_tag(run_id, "failure_reason", reason[:5000])
        store.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    except Exception:  # noqa: BLE001 - the original error matters more than this one
        pass
