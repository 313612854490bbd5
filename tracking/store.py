"""Where runs go: tracking URI resolution and checks, experiments, code version.

MLflow lives only in `tracking/`. Nothing here writes to a store until `open_store` has checked the URI,
so bad input never leaves an experiment or run behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess
import sys
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

from tracking import interrupts
from tracking.uri import (  # noqa: F401 (re-exported: the checks live in uri.py, free of MLflow)
    CREDENTIALS_HINT,
    LOCK_WAIT_S,
    TrackingError,
    check_tracking_uri,
    is_new_sqlite_store,
    masked,
    resolve_tracking_uri,
    sqlite_database,
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


class _UncutClient:
    """An MlflowClient whose every method call is an `interrupts.store_call` block: a Ctrl-C or TERM that
    arrives during the call is raised once it has returned (tracking/interrupts.py says why)."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str):
        if name == "_client":  # not set yet (an instance being unpickled): no recursion
            raise AttributeError(name)
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def uncut(*arguments, **keywords):
            with interrupts.store_call():
                return attribute(*arguments, **keywords)

        return uncut


@dataclass(frozen=True)
class Store:
    """A checked tracking store and a client bound to it.

    For an SQLite store the client is wrapped so that a signal never cuts one of its calls (an HTTP
    request cut short harms nothing in this process, and one can wait minutes on retries, so it is not).
    """

    uri: str
    client: MlflowClient

    def __post_init__(self) -> None:
        if self.uri.startswith("sqlite:") and not isinstance(self.client, _UncutClient):
            object.__setattr__(self, "client", _UncutClient(self.client))

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


# SQLite databases this process opened for writing: their write-ahead log is folded back at exit.
_WRITTEN_DATABASES: set[Path] = set()


@lru_cache(maxsize=1)
def use_sqlite_write_ahead_log() -> None:
    """From now on, open every SQLite connection of this process with a write-ahead log.

    MLflow commits once per call it logs, and in SQLite's default rollback-journal mode every commit waits
    for the disk (fsync; 1.7 ms each on this project's machines, about 750 commits per strategic sweep,
    and more while the store is created). With `journal_mode=WAL` and `synchronous=NORMAL` a commit is
    an append to `mlflow.db-wal`: the database stays consistent after any crash, and a power failure can
    lose only the last commits. The mode is kept in the database file, so `mlflow ui` and other readers
    need nothing special. Where WAL cannot be used (a busy database, some network file systems, a
    read-only connection) the connection keeps the mode it has. Installs its listeners once per process
    (cached).
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
        for engine in list(engines):
            engine.dispose()
        # Closing the last connection folds the log back into mlflow.db, but another process (`mlflow ui`)
        # may keep one open for days, and then recent runs live only in mlflow.db-wal and a copy of
        # mlflow.db alone misses them. A TRUNCATE checkpoint folds the log in and empties it whoever else
        # is connected; it waits at most 2 s for readers, so the command still ends promptly.
        for database in sorted(_WRITTEN_DATABASES):
            try:
                connection = sqlite3.connect(database, timeout=2.0)
                try:
                    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    connection.close()
            except sqlite3.Error:
                pass  # best effort: whatever is in the log is still safe in mlflow.db-wal

    atexit.register(_close_connections)


class _NoTraceback:
    """Logging filter for MLflow's store module: it logs every failed SQL statement with a full traceback
    before raising; the error still propagates, and is reported in one sentence (describe_store_failure)."""

    @staticmethod
    def filter(record) -> bool:
        return not record.exc_info


# MLflow's client retries a failed HTTP request 7 times with a backoff factor of 2 and a 120 s timeout:
# a server gone for good holds a command for minutes before any error. Five retries with factor 1 wait
# about 30 s in all, which still rides out a server restart (about 12 s on 2 cores, tests/servers.py).
# Defaults only: a user's own MLFLOW_HTTP_REQUEST_* settings win.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def open_store(option: str | None, *, writing: bool = True) -> Store:
    """Resolve and check the tracking URI, then bind a client to it (no write yet).

    `writing=False` for commands that only read: a missing store is an error instead of a new empty one,
    and an SQLite store is opened read-only, so it may sit on a read-only file system or folder. A new
    SQLite store is created whole or not at all (`_create_sqlite_store`).
    """
    import logging

    uri = resolve_tracking_uri(option)
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        for name, value in HTTP_RETRIES.items():
            os.environ.setdefault(name, value)
    check_tracking_uri(uri, writing=writing)
    client_uri = uri
    if uri.startswith("sqlite:"):
        use_sqlite_write_ahead_log()
        logger = logging.getLogger("mlflow.store.db.utils")
        if not any(isinstance(existing, _NoTraceback) for existing in logger.filters):
            logger.addFilter(_NoTraceback())
        database = sqlite_database(uri).resolve()
        if writing:
            if is_new_sqlite_store(uri):
                _create_sqlite_store(uri, database)
            _WRITTEN_DATABASES.add(database)
        else:
            client_uri = _read_only_uri(database)
    client = MlflowClient(tracking_uri=client_uri)
    if uri.startswith("sqlite:"):
        try:
            # MLflow opens (and checks the schema of) the store on the first request: a fault now is one
            # sentence, not a traceback from whichever call came first.
            client.search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - every fault becomes the user's one sentence
            raise TrackingError(describe_store_failure(error, uri)) from None
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        check_access(client, uri)
    return Store(uri=uri, client=client)


def _read_only_uri(database: Path) -> str:
    """An SQLAlchemy URI that opens `database` read-only (SQLite's `mode=ro`), which can never write.

    In a folder this process cannot write, a write-ahead-log database without its -shm file cannot be
    opened even read-only (SQLite has nowhere to put the shared index), so there it is opened as
    immutable: nothing can change it through this read-only location. The path is percent-encoded
    whole: MLflow creates the "parent folder" of whatever follows sqlite:///, and for `file:/a/b.db` that
    would be ./file:/a.
    """
    shared_index = database.with_name(database.name + "-shm").exists()
    immutable = not os.access(database.parent, os.W_OK) and not shared_index
    options = "mode=ro&immutable=1" if immutable else "mode=ro"
    return f"sqlite:///file:{urllib.parse.quote(str(database), safe='')}?{options}&uri=true"


def _create_sqlite_store(uri: str, database: Path) -> None:
    """Create a new SQLite store all-or-nothing: MLflow builds its schema in a temporary file beside
    `database`, which is then linked into place in one step.

    MLflow builds the schema in place through dozens of migrations; one interrupted (a full disk, a
    killed process) leaves a database every later command fails on ("duplicate column name"), and two
    processes creating the same store collide ("table experiments already exists"). Here the database
    appears only complete, os.link refuses to replace a store another process linked first (theirs is
    used), and a failure leaves nothing behind, so a retry after freeing space starts clean. The schema
    comes from a copy of the installed MLflow's empty store where there is one (`store_template_path`).
    """
    import secrets
    import sqlite3

    temporary = database.with_name(f".{database.name}.creating-{os.getpid()}-{secrets.token_hex(4)}")
    temporary_uri = f"sqlite:///{temporary}"
    try:
        template = store_template_path()
        built = not _open_from_template(template, temporary, temporary_uri)
        if built:
            MlflowClient(tracking_uri=temporary_uri).search_experiments(max_results=1)
            _dispose_engine(temporary_uri)
        # Fold the write-ahead log into the file, so the file alone is the whole store when linked.
        connection = sqlite3.connect(temporary, timeout=LOCK_WAIT_S)
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()
        if built and template is not None:
            _save_template(temporary, template)
        try:
            os.link(temporary, database)
        except FileExistsError:
            if is_new_sqlite_store(uri):
                os.replace(temporary, database)  # an empty file (`touch mlflow.db`): no store to keep
            # else another process created the store first: use theirs
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A file system without hard links: a rename, which could replace a store created meanwhile.
            if is_new_sqlite_store(uri):
                os.replace(temporary, database)
    except Exception as error:  # noqa: BLE001 - every fault becomes the user's one sentence
        raise TrackingError(describe_store_failure(error, uri, creating=True)) from None
    finally:
        _remove_database_files(temporary)


# "off": every new SQLite store is built through MLflow's migrations; a path: the template file to use.
STORE_TEMPLATE_VARIABLE = "POLYLAB_STORE_TEMPLATE"


def store_template_path() -> Path | None:
    """Where the empty-store template of the installed MLflow is kept (None: switched off).

    MLflow builds a new store's schema through dozens of migrations: about 1.1 CPU-s on this project's
    2-core machines, in the sweep's recording process while its workers train. Their result depends only
    on the MLflow version, so the first store a version creates is kept (less its Default experiment)
    under the user's cache folder and every later store starts as a copy of it (0.05 s). The file name
    carries MLflow's and SQLAlchemy's versions; MLflow still checks the copy's schema revision when it
    opens it, and anything wrong with the copy falls back to the migrations.
    """
    setting = os.environ.get(STORE_TEMPLATE_VARIABLE, "").strip()
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        return Path(setting).expanduser()
    import sqlalchemy

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = f"mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}-empty-store.db"
    return Path(cache) / "polysemanticity-lab" / name


def _remove_database_files(database: Path) -> None:
    """Delete an SQLite database and the companion files SQLite may have left beside it."""
    for path in (
        database,
        *(database.with_name(database.name + end) for end in ("-wal", "-shm", "-journal")),
    ):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _dispose_engine(uri: str) -> None:
    """Close the connections MLflow keeps for `uri` (its engines are cached per URI)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


def _open_from_template(template: Path | None, temporary: Path, temporary_uri: str) -> bool:
    """Make `temporary` a copy of the template and let MLflow open it (which verifies the schema revision
    and creates the Default experiment, with this store's artifact location and time, as it does in a
    store it builds). False when there is no usable template: `temporary` is then removed, to be built
    through the migrations."""
    import shutil
    import sqlite3

    if template is None or not template.is_file():
        return False
    try:
        shutil.copyfile(template, temporary)
        # A file that is no database at all: MLflow would retry opening it for minutes before giving up.
        connection = sqlite3.connect(temporary)
        try:
            connection.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            connection.close()
        MlflowClient(tracking_uri=temporary_uri).search_experiments(max_results=1)
        _dispose_engine(temporary_uri)
        return True
    except (OSError, sqlite3.Error, mlflow.exceptions.MlflowException) as error:
        _dispose_engine(temporary_uri)
        _remove_database_files(temporary)
        if _is_disk_full(_error_chain(error)):
            raise  # no room for the store: the same one sentence as when the migrations fill the disk
        return False


def _save_template(built: Path, template: Path) -> None:
    """Keep a copy of the freshly built store `built` (its log already folded in) as the template, without its
    Default experiment, which MLflow recreates in each copy with that store's own location and time. Best
    effort: a cache folder that cannot be written leaves every store to the migrations."""
    import secrets
    import shutil
    import sqlite3

    partial = template.with_name(f".{template.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, partial)
        connection = sqlite3.connect(partial)
        try:
            with connection:
                connection.execute("DELETE FROM experiments WHERE experiment_id = 0")
        finally:
            connection.close()
        os.replace(partial, template)  # whole or not at all, whoever else saves one at the same time
    except (OSError, sqlite3.Error):
        pass
    finally:
        _remove_database_files(partial)


def _is_disk_full(chain: list[BaseException]) -> bool:
    """Whether an error chain (`_error_chain`) says the disk is full, by errno or by SQLite's words."""
    text = " ".join(str(getattr(link, "message", None) or link) for link in chain).lower()
    errnos = {getattr(link, "errno", None) for link in chain}
    return errno.ENOSPC in errnos or "disk is full" in text or "no space left" in text


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def describe_store_failure(error: BaseException, uri: str, *, creating: bool = False) -> str:
    """One sentence for a store fault MLflow raised (at creation, opening or mid-command), naming
    --tracking-uri and what to do; never a traceback, and the URI printed with its password masked.

    For orchestration: wrap a whole command's store work (a sweep, a report's logging) in
    `except Exception as error: raise StoreUnavailable(describe_store_failure(error, store.uri))`.
    """
    shown = masked(uri)
    chain = _error_chain(error)
    text = " ".join(str(getattr(e, "message", None) or e) for e in chain).lower()
    errnos = {getattr(e, "errno", None) for e in chain}
    resume = "re-run the same command to resume (runs FINISHED so far are kept)"
    if _is_disk_full(chain):
        if creating:
            return (
                f"--tracking-uri {shown}: the disk is full, so the new store was not created (nothing was "
                "left behind); free some space and re-run the command"
            )
        return f"--tracking-uri {shown}: the disk holding the store is full; free some space and {resume}"
    if "database is locked" in text or "database is busy" in text:
        return (
            f"--tracking-uri {shown}: another process held the store's write lock for too long; wait for "
            f"it to finish (or stop it) and {resume}"
        )
    if errno.EROFS in errnos or errno.EACCES in errnos or "readonly database" in text or "read-only" in text:
        return (
            f"--tracking-uri {shown}: the store cannot be written (read-only file, folder or file system); "
            f"make it writable or point --tracking-uri at a writable store"
        )
    if "malformed" in text or "not a database" in text or "disk i/o error" in text:
        return (
            f"--tracking-uri {shown}: the store is damaged or its disk failed ({_first_line(chain[-1])}); "
            "restore it from a copy or point --tracking-uri at another store"
        )
    if "out-of-date database schema" in text or "alembic" in text or "duplicate column" in text:
        return (
            f"--tracking-uri {shown}: the store's schema is not the one MLflow {mlflow.__version__} expects "
            f"({_first_line(error)}); upgrade it with `mlflow db upgrade {shown}`, or point --tracking-uri "
            "at another store"
        )
    if _is_unreachable(error):
        return f"--tracking-uri {shown}: the tracking server stopped answering; start it again and {resume}"
    return f"--tracking-uri {shown}: the store failed ({_first_line(error)}); check it and {resume}"


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, without SQLAlchemy's '(sqlite3.OperationalError) ' prefix."""
    message = str(getattr(error, "message", None) or error).strip().splitlines()
    return re.sub(r"^\([\w.]+\)\s*", "", message[0] if message else type(error).__name__)[:200]


# What a stored result depends on: data, models, training, SAEs, metrics and the studies' training code.
# Every other file under pipeline/ only reads stored values (statistics, reports, plots, designs, which
# reach the store as config hashes, and runtime tuning) and is listed in OTHER_SOURCES; a test checks that every file
# under pipeline/ is in exactly one of the two, so a new module has to be placed consciously.
RESULT_SOURCES = (
    "pipeline/config.py",
    "pipeline/config_tools.py",
    "pipeline/data.py",
    "pipeline/evaluation.py",
    "pipeline/experiments/decompose.py",
    "pipeline/experiments/incidental.py",
    "pipeline/experiments/incidental_splitting.py",
    "pipeline/experiments/pool.py",
    "pipeline/experiments/taming.py",
    "pipeline/experiments/taming_splitting.py",
    "pipeline/fused.py",
    "pipeline/incidental.py",
    "pipeline/metrics.py",
    "pipeline/models.py",
    "pipeline/sae/__init__.py",
    "pipeline/sae/common.py",
    "pipeline/sae/gated.py",
    "pipeline/sae/jumprelu.py",
    "pipeline/sae/leaky_relu.py",
    "pipeline/sae/registry.py",
    "pipeline/sae/topk.py",
    "pipeline/splitting.py",
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
    "pipeline/moderation.py",
    "pipeline/plots/__init__.py",
    "pipeline/plots/dose_response.py",
    "pipeline/plots/incidental.py",
    "pipeline/plots/moderation.py",
    "pipeline/plots/report.py",
    "pipeline/plots/taming.py",
    "pipeline/published.py",
    "pipeline/runtime.py",
    "pipeline/stats.py",
    "pipeline/tables.py",
    "pipeline/taming_splitting.py",
    "pipeline/variance.py",
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


# Stores found unreachable in this process: closing runs there is not tried again, since each try would
# wait out the client's retries while the error that matters waits to be reported.
_UNREACHABLE: set[str] = set()


def fail_run(store: Store, run_id: str, reason: str) -> None:
    """Mark a run FAILED with its reason; never raises (it runs while another error propagates)."""
    # Called from `except` blocks: when the error being handled says the server is gone, trying would
    # only wait out the client's retries once more.
    handled = sys.exc_info()[1]
    if handled is not None and _is_unreachable(handled):
        _UNREACHABLE.add(store.uri)
    if store.uri in _UNREACHABLE:
        return
    try:
        store.client.set_tag(run_id, "failure_reason", reason[:5000])
        store.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    except Exception as error:  # noqa: BLE001 - the original error matters more than this one
        if _is_unreachable(error):
            _UNREACHABLE.add(store.uri)


_NETWORK_PHRASES = ("connection refused", "max retries exceeded", "connection aborted", "connection reset")


def _is_unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server cannot be reached (rather than that it refused a request)."""
    import requests

    chain = _error_chain(error)
    text = " ".join(str(getattr(e, "message", None) or e) for e in chain).lower()
    return any(isinstance(e, (ConnectionError, requests.ConnectionError)) for e in chain) or any(
        phrase in text for phrase in _NETWORK_PHRASES
    )


def is_store_failure(error: BaseException) -> bool:
    """Whether `error` came from the tracking store (its database, server or artifact disk) rather than
    from our code: what a command reports as `describe_store_failure`'s one sentence."""
    import sqlite3

    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    store_errors = (MlflowException, sqlite3.Error, sqlalchemy.exc.SQLAlchemyError, requests.RequestException)
    disk_errors = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT}
    return any(
        isinstance(e, store_errors) or (isinstance(e, OSError) and e.errno in disk_errors)
        for e in _error_chain(error)
    )
