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

import contextlib
import math
import os
import socket
import tempfile
import threading
import time
import urllib.parse
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
    "heartbeat",
    "is_alive",
    "owner_tags",
    "reason_of",
    "recover_experiment",
    "find_units",
    "finished_units",
    "finite_metrics",
    "identity_filter",
    "log_files",
    "now_ms",
    "read_csv_artifact",
    "read_step_series",
    "release",
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


def log_files(
    store: Store, run_id: str, files: Mapping[str, Callable[[Path], None]], artifact_uri: str | None = None
) -> None:
    """Write each artifact (relative path → writer(path)) into one temporary folder and upload it in one
    call: every upload costs a few milliseconds however small the file.

    `artifact_uri`, the run's own (`create_run(...).info.artifact_uri`), spares the client's look-up of
    the run before each upload: a get_run, which on an SQLite store reads every tag, param and metric of
    the run and cost a third of a seed run's artifact logging. It is used for artifacts on this machine's
    file system, where MLflow's repository for the URI is the plain local one; elsewhere the client
    resolves the repository as usual.
    """
    with tempfile.TemporaryDirectory() as folder:
        for relative, write in files.items():
            path = Path(folder) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        if artifact_uri is not None and urllib.parse.urlparse(artifact_uri).scheme in ("", "file"):
            from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

            LocalArtifactRepository(artifact_uri).log_artifacts(folder)
        else:
            store.client.log_artifacts(run_id, folder)


def figure_writer(figure, dpi: int = 100) -> Callable[[Path], None]:
    """A `log_files` writer for a matplotlib figure (PNG)."""
    return lambda path: figure.savefig(path, format="png", dpi=dpi, bbox_inches="tight")


def create_child_run(
    store: Store, experiment_id: str, parent_run_id: str, name: str, tags: Mapping[str, str]
) -> str:
    """Create a RUNNING run nested under `parent_run_id` (the UI shows it under its parent); returns its id.
    It carries this process's owner tags, so a later command can tell whether it is still being worked on."""
    tags = {**tags, **owner_tags(), MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: name}
    return store.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@contextmanager
def failing(store: Store, run_id: str) -> Iterator[None]:
    """Mark `run_id` FAILED, with "<error type>: <message>" in its failure_reason tag, when the block raises
    (Ctrl-C included); the error then propagates. A FINISHED run is never touched by this."""
    try:
        yield
    except BaseException as error:
        fail_run(store, run_id, reason_of(error))
        raise


def reason_of(error: BaseException) -> str:
    """The failure_reason of a run closed by `error`: "<type>: <message>", except for an interruption.

    orchestration/signals.py turns SIGINT and SIGTERM into KeyboardInterrupt("interrupted by SIGINT"), so
    the run says which signal ended it; a bare KeyboardInterrupt (no handler installed) is a Ctrl-C.
    """
    if isinstance(error, KeyboardInterrupt):
        return str(error) or "interrupted by SIGINT"
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------------------------
# Ownership: telling a run whose process is alive from one a dead process left RUNNING
#
# MLflow has no heartbeat, and SIGKILL (or a lost machine) leaves runs RUNNING for ever. Every run we open
# carries the host, pid and process start time of its owner; a run on this host is alive while that process
# is (the start time tells a reused pid apart), a run from another host while its heartbeat tag, refreshed
# by a background thread, is younger than the lease. A concurrent sweep's runs are therefore left alone,
# and only dead ones are closed.

OWNER_HOST, OWNER_PID, OWNER_STARTED, HEARTBEAT = "owner_host", "owner_pid", "owner_started", "heartbeat_ms"
# A run from another host whose heartbeat is older than this is dead. Four missed beats: a busy server or a
# slow network does not kill a live run.
LEASE_S = float(os.environ.get("POLYLAB_LEASE_S", "600"))
HEARTBEAT_S = LEASE_S / 4
INTERRUPTED_REASON = "interrupted: the process that ran it ({owner}) ended without closing it"


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of a process from /proc, None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def owner_tags() -> dict[str, str]:
    state = _process_state(os.getpid())
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(os.getpid()),
        OWNER_STARTED: state[1] if state else "",
        HEARTBEAT: str(now_ms()),
    }


def _pid_alive(pid: int, started: str) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    state = _process_state(pid)
    if state is None:
        return True
    # A zombie has finished (its parent has not reaped it yet); another start time is a reused pid.
    return state[0] != "Z" and (not started or state[1] == started)


def is_alive(run: Run) -> bool:
    """Whether the process that opened this RUNNING run may still close it.

    A run without owner tags was written before they existed (or by hand); it is treated as dead, which
    is what every command assumed before: one invocation per experiment at a time.
    """
    tags = run.data.tags
    if OWNER_PID not in tags:
        return False
    if tags.get(OWNER_HOST) == socket.gethostname():
        return _pid_alive(int(tags[OWNER_PID]), tags.get(OWNER_STARTED, ""))
    beat = int(tags.get(HEARTBEAT) or run.info.start_time or 0)
    return now_ms() - beat < LEASE_S * 1000


_held: dict[str, Store] = {}
_held_lock = threading.Lock()
_beating: list[threading.Thread] = []


def heartbeat(store: Store, run_ids: Iterable[str]) -> None:
    """Keep refreshing the heartbeat tag of these runs (every HEARTBEAT_S, from a daemon thread) until
    `release`: what tells another host that their long pass is still going on."""
    with _held_lock:
        for run_id in run_ids:
            _held[run_id] = store
        if not _beating:
            thread = threading.Thread(target=_beat, name="polylab-heartbeat", daemon=True)
            _beating.append(thread)
            thread.start()


def release(run_ids: Iterable[str]) -> None:
    with _held_lock:
        for run_id in run_ids:
            _held.pop(run_id, None)


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_lock:
            held = list(_held.items())
        for run_id, store in held:
            # A missed beat is retried at the next one; the lease allows four.
            with contextlib.suppress(Exception):
                store.client.set_tag(run_id, HEARTBEAT, str(now_ms()))


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


def recover_experiment(
    store: Store,
    experiment_id: str,
    reason: str | None = None,
    replicate_kinds: Sequence[str] = ("seed",),
) -> dict[str, list[str]]:
    """Close what dead commands left open in the experiment; returns {"interrupted": ids, "completed":
    ids, "failed": ids}. Every command that touches the experiment calls this first, so nothing stays
    RUNNING after the next command.

    Runs whose owner is dead (`is_alive`) become FAILED (`reason`, else INTERRUPTED_REASON). Replicates
    (seed runs) follow their parent instead: a unit is terminated before its replicates (tracking/taming.py
    `record_ablation`), so RUNNING replicates under a FINISHED unit are complete and become FINISHED, and
    under a FAILED or deleted unit they become FAILED. A live owner's runs are left alone.
    """
    running = search_all(store, [experiment_id], f"attributes.status = '{RUNNING}'")
    statuses: dict[str, str] = {}
    closed: dict[str, list[str]] = {"interrupted": [], "completed": [], "failed": []}
    for run in running:
        if run.data.tags.get("kind") in replicate_kinds:
            continue
        statuses[run.info.run_id] = RUNNING
        if not run.data.tags.get("kind"):
            continue  # not ours yet: the run `mlflow run` opened for this very command, say
        if not is_alive(run):
            tags = run.data.tags
            owner = f"pid {tags.get(OWNER_PID, '?')} on {tags.get(OWNER_HOST, 'an unknown host')}"
            fail_run(store, run.info.run_id, reason or INTERRUPTED_REASON.format(owner=owner))
            statuses[run.info.run_id] = FAILED
            closed["interrupted"].append(run.info.run_id)
    for run in running:
        if run.data.tags.get("kind") not in replicate_kinds:
            continue
        parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent_id is None:
            continue
        if parent_id not in statuses:
            parent = store.client.get_run(parent_id)
            statuses[parent_id] = FAILED if parent.info.lifecycle_stage == "deleted" else parent.info.status
        if statuses[parent_id] == FINISHED:
            store.client.set_terminated(run.info.run_id, FINISHED)
            closed["completed"].append(run.info.run_id)
        elif statuses[parent_id] != RUNNING:
            fail_run(store, run.info.run_id, reason or f"its parent run {parent_id} did not finish")
            closed["failed"].append(run.info.run_id)
    return closed


# ------------------------------------------------------------------------------------------------------------
# Reading back


def read_csv_artifact(store: Store, run_id: str, artifact: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as folder:
        return pd.read_csv(store.client.download_artifacts(run_id, artifact, folder))


def read_step_series(store: Store, run_id: str, name: str, prefix: str = CURVE_PREFIX) -> dict[int, float]:
    """A step series as {step: value}, in step order (one value per step, as `step_series` logs it)."""
    history = sorted(store.client.get_metric_history(run_id, prefix + name), key=lambda m: m.step)
    return {metric.step: metric.value for metric in history}
