"""Recording the taming study: one MLflow run per ablation, one nested run per seed, resumable sweeps.

Run tree (all in one experiment):
    sweep run            kind=sweep      the sweep's summary table
    ablation run         kind=ablation   params = every config field; tags = factors, config hash, code
                                         version, sweep id, identity; metrics = mean/std/sem/CI per metric
      seed run (nested)  kind=seed       that seed's metrics, curves (epoch as step), overlap PNG, checkpoint

A run is FINISHED only after all its artifacts are logged; any exception marks the open runs FAILED
with the reason in the `failure_reason` tag. Identity = config hash + seed list + code version: a sweep
re-run reuses FINISHED ablations of the same identity and redoes the rest (a sweep that needs artifacts
reuses only a run that recorded them: tag `artifacts`, absent on older runs, which all did).

Crash safety (any instant, SIGKILL included):
- An ablation is terminated *before* its seed runs: seeds stay RUNNING until their ablation is FINISHED,
  so no FINISHED seed ever hangs under an unfinished ablation. A crash between the two leaves complete
  RUNNING seeds under a FINISHED ablation; the next command (sweep, ablate, report) completes them
  (`tracking.recorder.recover_experiment`). Chosen over "children first" because that order is what
  leaves FINISHED seeds under a RUNNING ablation, which a resume would then train a second time.
- Every run carries its owner (host, pid, process start, heartbeat): the next command marks FAILED only
  runs whose process is dead, so a concurrent sweep's runs are left alone.
- Two sweeps needing one identity at once: each opens its ablation run (the claim) and the claims are
  ordered by Lamport's bakery algorithm over run tags (`_take_number`, `_contest`): the smallest ticket
  trains, the others delete their run, wait for it and reuse it (or claim again if it failed or died).
  The bakery needs only that a tag written is seen by every later search, which one database gives; an
  order by start time or a settling delay does not hold when a busy store delays a write.

This module records; it never trains. The caller passes a `trainer` (normally
`pipeline.experiments.taming.run_ablations`), so recording can be tested and reused on its own.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline import stats
from pipeline.config import AblationConfig, pass_key
from pipeline.config_tools import flatten
from pipeline.design import label_of, seed_label
from pipeline.evaluation import METRIC_NAMES, checkpoint
from pipeline.metrics import metric_bounds
from pipeline.plots.taming import overlap_grid_png, overlap_png, prepare_overlap_grid_painter
from tracking import recorder
from tracking.recorder import log_files, now_ms, without_logged
from tracking.store import Store, code_version, fail_run, git_commit, log_in_batches

NOTE_TAG = "mlflow.note.content"
CHECKPOINT_PATH = "checkpoint/seed.pt"
SUMMARY_STATISTICS = ("mean", "std", "sem", "ci_low", "ci_high")

Trainer = Callable[..., list]


@dataclass(frozen=True)
class SweepNaming:
    """How a sweep's runs are named and tagged.

    design: the design's name (a tag on every run); labels: each configuration's run name by config hash
    (pipeline.design.configuration_label: the factors, then the settings that vary in the design); axes:
    the dotted paths that vary, each of which becomes a tag on the ablation and seed runs.
    """

    design: str = "custom"
    labels: Mapping[str, str] = field(default_factory=dict)
    axes: tuple[str, ...] = ()
    # More tags, e.g. a decomposition's links to the runs that trained its networks: by config hash on the
    # ablation run, by (config hash, seed) on the seed run.
    ablation_tags: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    seed_tags: Mapping[tuple[str, int], Mapping[str, str]] = field(default_factory=dict)
    sweep_tags: Mapping[str, str] = field(default_factory=dict)  # on the sweep run

    def label(self, config: AblationConfig) -> str:
        return label_of(config, self.labels)

    def axis_tags(self, config: AblationConfig) -> dict[str, str]:
        values = flatten(config)
        return {path: _param_text(values[path]) for path in self.axes if path in values}


def seeds_label(seeds: Sequence[int]) -> str:
    """Compact, canonical text of a seed list: '0-9' for a contiguous range, else '0,2,5'."""
    ordered = sorted(set(seeds))
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(str(seed) for seed in ordered)


def seeds_from_label(label: str) -> list[int]:
    """The seed list `seeds_label` wrote: '0-9' → [0, …, 9], '0,2,5' → [0, 2, 5]."""
    if "-" in label and "," not in label:
        first, _, last = label.partition("-")
        return list(range(int(first), int(last) + 1))
    return [int(part) for part in label.split(",") if part]


@dataclass
class AblationOutcome:
    """What happened to one configuration of a sweep."""

    config: AblationConfig
    run_id: str
    status: str  # "finished" | "reused" | "failed"
    seeds_finished: int = 0
    seeds_failed: int = 0
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    failure: str | None = None
    name: str = ""  # the run name (SweepNaming.label)
    retired: list[str] = field(default_factory=list)  # older runs of the identity deleted (--force)


def _param_text(value) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


def config_params(config: AblationConfig) -> dict[str, str]:
    """Every config field as an MLflow param (`network.lambda_reg` = '0.001'): on ablation and seed runs
    alike, so a search filter on any setting finds both."""
    return {name: _param_text(value) for name, value in flatten(config).items()}


def _params(config: AblationConfig, seeds: Sequence[int]) -> list[Param]:
    values = config_params(config)
    values["seed_list"] = seeds_label(seeds)
    values["seed_count"] = str(len(seeds))
    return [Param(name, value) for name, value in values.items()]


def _identity_tags(config: AblationConfig, seeds: Sequence[int]) -> dict[str, str]:
    return {
        "config_hash": config.hash(),
        "code_version": code_version(),
        "seeds": seeds_label(seeds),
        **config.factors,
    }


def identity(config: AblationConfig, seeds: Sequence[int]) -> dict[str, str]:
    """The identity tags an ablation is found by: config hash, code version, seed list."""
    tags = _identity_tags(config, seeds)
    return {name: tags[name] for name in ("config_hash", "code_version", "seeds")}


def identity_filter(config: AblationConfig, seeds: Sequence[int], kind: str = "ablation") -> str:
    return recorder.identity_filter(kind, identity(config, seeds))


ARTIFACTS_TAG = "artifacts"


def has_artifacts(run) -> bool:
    """Whether an ablation run recorded checkpoints and figures; runs from before the tag all did."""
    return run.data.tags.get(ARTIFACTS_TAG, "true") == "true"


def finished_runs_for(
    store: Store, experiment_id: str, config: AblationConfig, seeds: Sequence[int], artifacts: bool = False
) -> list:
    """FINISHED ablation runs with this identity (normally zero or one), newest first; with `artifacts`,
    only runs that recorded them (a sweep that needs checkpoints cannot reuse a --no-artifacts run)."""
    runs = recorder.finished_units(store, experiment_id, "ablation", identity(config, seeds))
    return [run for run in runs if has_artifacts(run)] if artifacts else runs


def start_ablation_run(
    store: Store,
    experiment_id: str,
    config: AblationConfig,
    seeds: Sequence[int],
    *,
    sweep_id: str,
    naming: SweepNaming | None = None,
    run_id: str | None = None,
    artifacts: bool = True,
) -> str:
    """Create (or adopt, when `mlflow run` handed one over) the ablation run, RUNNING, with params and tags.

    A new run is created with every tag at once: its identity is then visible from the first instant,
    which the claim between concurrent sweeps (`_contest`) relies on."""
    naming = naming or SweepNaming()
    name = naming.label(config)
    tags = {
        "kind": "ablation",
        "study": "taming",
        "sweep_id": sweep_id,
        "preset": naming.design,
        "design": naming.design,
        "git_commit": git_commit(),
        "config_name": name,
        NOTE_TAG: config.describe(),
        MLFLOW_RUN_NAME: name,
        **naming.axis_tags(config),
        **naming.ablation_tags.get(config.hash(), {}),
        **_identity_tags(config, seeds),
        ARTIFACTS_TAG: "true" if artifacts else "false",
        **recorder.owner_tags(),
    }
    if run_id is None:
        # The bakery's "choosing" flag, set in the same write that makes the claim visible (`_contest`).
        tags[CLAIM_CHOOSING] = "1"
    params = _params(config, seeds)
    if run_id is not None:
        params = without_logged(store, run_id, params)
        log_in_batches(store, run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id
    run_id = store.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    log_in_batches(store, run_id, params=params)
    return run_id


def seed_run_name(seed_result, naming: SweepNaming | None = None) -> str:
    return seed_label((naming or SweepNaming()).label(seed_result.config), seed_result.seed)


def log_seed(
    store: Store,
    experiment_id: str,
    parent_run_id: str,
    seed_result,
    sweep_id: str,
    artifacts: bool = True,
    terminate: bool = True,
    naming: SweepNaming | None = None,
) -> str:
    """One nested seed run: metrics, curves, overlap heatmap, checkpoint. FINISHED or FAILED with reason.

    With `terminate=False` a seed that trained is left RUNNING once everything is logged, for the caller
    to finish together with its ablation (see SeedRuns); a diverged seed is FAILED either way.
    """
    config: AblationConfig = seed_result.config
    naming = naming or SweepNaming()
    name = seed_run_name(seed_result, naming)
    tags = {
        MLFLOW_PARENT_RUN_ID: parent_run_id,
        MLFLOW_RUN_NAME: name,
        "kind": "seed",
        "study": "taming",
        "seed": str(seed_result.seed),
        "sweep_id": sweep_id,
        "design": naming.design,
        "config_name": naming.label(config),
        **naming.axis_tags(config),
        **naming.seed_tags.get((config.hash(), seed_result.seed), {}),
        **_identity_tags(config, [seed_result.seed]),
        **recorder.owner_tags(),
    }
    run_info = store.client.create_run(experiment_id, run_name=name, tags=tags).info
    run_id = run_info.run_id
    try:
        timestamp = now_ms()
        metrics = [
            Metric(metric, float(value), timestamp, 0)
            for metric, value in seed_result.metrics.items()
            if value is not None and math.isfinite(value)
        ]
        for curves in seed_result.curves.values():
            for curve, values in curves.items():
                if curve == "epoch":
                    continue
                metrics.extend(
                    Metric(f"curve.{curve}", float(value), timestamp, int(epoch))
                    for epoch, value in zip(curves["epoch"], values, strict=True)
                    if math.isfinite(value)
                )
        params = [
            Param(name, value)
            for name, value in {
                **config_params(config),
                "seed": str(seed_result.seed),
                "config_hash": config.hash(),
            }.items()
        ]
        if not seed_result.finished:
            log_in_batches(
                store,
                run_id,
                metrics=metrics,
                params=params,
                tags=[RunTag("failure_reason", seed_result.failure)],
            )
            store.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            return run_id
        log_in_batches(store, run_id, metrics=metrics, params=params)
        if artifacts:
            saved = checkpoint(config, seed_result.seed, seed_result.network, seed_result.sae)
            painted = seed_result.overlap_picture
            if painted is not None and painted[0] == name:
                png = painted[1]  # a pool worker drew it, titled as this run is named
            else:
                png = overlap_png(seed_result.sae.decoder_directions.detach().cpu(), name)
            log_files(
                store,
                run_id,
                {
                    CHECKPOINT_PATH: lambda path: torch.save(saved, path),
                    "overlap.png": lambda path: path.write_bytes(png),
                },
                artifact_uri=run_info.artifact_uri,
            )
        if terminate:
            store.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException as error:
        fail_run(store, run_id, f"logging failed: {recorder.reason_of(error)}")
        raise
    return run_id


@dataclass
class SeedRuns:
    """The seed runs written so far under one ablation run.

    Seed runs are written as soon as their seed has trained (while other seeds still train) but stay
    RUNNING until their ablation is FINISHED: a sweep killed at any instant then leaves no FINISHED seed
    run under an unfinished ablation, so a resumed sweep never ends with two FINISHED runs of one seed.
    Once the ablation is closed (`parent_closed`) the seeds are its to keep: they are never failed, and
    if finishing them is cut short the next command completes them (`recorder.recover_experiment`).
    """

    run_ids: dict[int, str] = field(default_factory=dict)  # seed → run id
    open: list[str] = field(default_factory=list)  # logged and left RUNNING
    parent_closed: bool = False

    def record(
        self,
        store: Store,
        experiment_id: str,
        parent_run_id: str,
        seed_result,
        sweep_id,
        artifacts,
        naming=None,
    ):
        run_id = log_seed(
            store,
            experiment_id,
            parent_run_id,
            seed_result,
            sweep_id,
            artifacts,
            terminate=False,
            naming=naming,
        )
        self.run_ids[seed_result.seed] = run_id
        if seed_result.finished:
            self.open.append(run_id)

    def finish(self, store: Store) -> None:
        while self.open:
            store.client.set_terminated(self.open[0], RunStatus.to_string(RunStatus.FINISHED))
            self.open.pop(0)

    def fail(self, store: Store, reason: str) -> None:
        if self.parent_closed:
            return
        for run_id in self.open:
            fail_run(store, run_id, reason)
        self.open.clear()


def summarize_seeds(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """mean/std/sem/95 % CI per metric over the finished seeds of an ablation."""
    finished = table[table["status"] == "finished"]
    return {
        metric: stats.describe(finished[metric].dropna().to_numpy(), bounds=metric_bounds(metric))
        for metric in METRIC_NAMES
    }


def log_ablation_summary(
    store: Store, run_id: str, result, artifacts: bool = True, naming: SweepNaming | None = None
) -> AblationOutcome:
    """Log the per-seed table, the heatmap grid and the seed summary; the run stays open (see
    `terminate_ablation_run`). The outcome says whether it finished (at least one seed did)."""
    table = result.metrics_table()
    summary = summarize_seeds(table)
    finished, failed = len(result.finished), len(result.failed)
    timestamp = now_ms()
    metrics = [Metric("seeds_finished", finished, timestamp, 0), Metric("seeds_failed", failed, timestamp, 0)]
    for metric, description in summary.items():
        metrics.extend(
            Metric(f"{metric}_{statistic}", float(description[statistic]), timestamp, 0)
            for statistic in SUMMARY_STATISTICS
            if math.isfinite(description[statistic])
        )
    log_in_batches(store, run_id, metrics=metrics)
    store.client.log_text(run_id, table.to_csv(index=False), "seeds.csv")
    if artifacts and result.finished:
        png = overlap_grid_png(
            [seed.sae.decoder_directions.detach().cpu() for seed in result.finished],
            [f"seed {seed.seed}" for seed in result.finished],
            suptitle=(naming or SweepNaming()).label(result.config),
        )
        log_files(store, run_id, {"overlap_grid.png": lambda path: path.write_bytes(png)})
    outcome = AblationOutcome(
        result.config,
        run_id,
        "finished",
        finished,
        failed,
        summary,
        name=(naming or SweepNaming()).label(result.config),
    )
    if finished == 0:
        outcome.status, outcome.failure = (
            "failed",
            "every seed failed: " + "; ".join(s.failure for s in result.failed),
        )
    return outcome


def terminate_ablation_run(store: Store, outcome: AblationOutcome) -> None:
    """FINISHED, or FAILED with the reason when no seed finished. Called before the seed runs are
    finished (see `record_ablation`)."""
    if outcome.status == "failed":
        fail_run(store, outcome.run_id, outcome.failure)
    else:
        store.client.set_terminated(outcome.run_id, RunStatus.to_string(RunStatus.FINISHED))


def record_ablation(
    store: Store,
    experiment_id: str,
    run_id: str,
    result,
    seeds: Sequence[int],
    *,
    sweep_id: str,
    artifacts: bool = True,
    force: bool = False,
    seed_runs: SeedRuns | None = None,
    naming: SweepNaming | None = None,
) -> AblationOutcome:
    """Log every seed of a trained AblationResult under its open ablation run, then finish that run.

    `seed_runs` holds the seeds already written while others trained (they are not written again). With
    `force`, older FINISHED runs of the same identity are retired afterwards (with their seed runs), and
    so is a FINISHED --no-artifacts run of the identity once this one recorded artifacts: one identity
    keeps one FINISHED run. On an error before the ablation is closed, the seed runs left RUNNING are
    marked FAILED with it (the ablation run is the caller's to fail, unless `seed_runs.parent_closed`).

    Order: everything logged, then the ablation terminated, then its seeds. The parent goes first so that
    no instant has a FINISHED seed under an unfinished ablation; what a crash leaves between the two
    (RUNNING seeds, all logged, under a FINISHED ablation) is completed by the next command.
    """
    seed_runs = seed_runs if seed_runs is not None else SeedRuns()
    try:
        for seed_result in result.seeds:
            if seed_result.seed not in seed_runs.run_ids:
                seed_runs.record(store, experiment_id, run_id, seed_result, sweep_id, artifacts, naming)
        outcome = log_ablation_summary(store, run_id, result, artifacts, naming)
        fault_point("before-parent")
        terminate_ablation_run(store, outcome)
        seed_runs.parent_closed = True
    except BaseException as error:
        seed_runs.fail(store, recorder.reason_of(error))
        raise
    fault_point("between-parent-and-children")
    seed_runs.finish(store)
    if outcome.status == "finished":
        if force:
            outcome.retired += _retire_older_runs(store, experiment_id, result.config, seeds, run_id)
        if artifacts:
            outcome.retired += _retire_without_artifacts(store, experiment_id, result.config, seeds, run_id)
    return outcome


# Fault injection for the tests only (tests/test_fault_injection.py): when this variable names a point
# of `record_ablation`, the first command to reach it creates the file named by FAULT_MARKER_VARIABLE and
# sleeps, so the test can signal it exactly there.
FAULT_POINT_VARIABLE = "POLYLAB_TEST_FAULT_POINT"
FAULT_MARKER_VARIABLE = "POLYLAB_TEST_FAULT_MARKER"


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_POINT_VARIABLE) != name:
        return
    marker = os.environ.get(FAULT_MARKER_VARIABLE, "")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except (FileExistsError, FileNotFoundError):
        return
    time.sleep(60)


SUPERSEDED_REASON = "superseded by a retry"


def supersede_running_runs(
    store: Store, experiment_id: str, config: AblationConfig, seeds: Sequence[int], sweep_id: str
) -> list[str]:
    """Mark RUNNING ablation runs of this identity and sweep FAILED (SUPERSEDED_REASON), with their
    RUNNING seed runs; returns the ablation run ids.

    A retried task calls this before it opens its own run: the attempt that died (its worker killed)
    left its run RUNNING, and nothing else will ever finish it. Runs of other sweeps are left alone,
    since they may be alive.
    """
    query = (
        identity_filter(config, seeds)
        + f" and tags.sweep_id = '{sweep_id}' and attributes.status = 'RUNNING'"
    )
    superseded = []
    for run in store.client.search_runs([experiment_id], query, max_results=100):
        children = store.client.search_runs(
            [experiment_id],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}' and attributes.status = 'RUNNING'",
        )
        for child in children:
            fail_run(store, child.info.run_id, SUPERSEDED_REASON)
        fail_run(store, run.info.run_id, SUPERSEDED_REASON)
        superseded.append(run.info.run_id)
    return superseded


def _retire_older_runs(store: Store, experiment_id: str, config, seeds, keep_run_id: str) -> list[str]:
    """After a --force re-run, delete older FINISHED runs of the same identity (and their seed runs);
    returns the ablation run ids deleted."""
    older = [run.info.run_id for run in finished_runs_for(store, experiment_id, config, seeds)]
    return recorder.retire_runs(
        store, [run_id for run_id in older if run_id != keep_run_id], superseded_by=keep_run_id
    )


def _retire_without_artifacts(store: Store, experiment_id: str, config, seeds, keep_run_id: str) -> list[str]:
    """A run with artifacts replaces FINISHED --no-artifacts runs of its identity (it holds all they do):
    the report then never counts a seed twice."""
    bare = [
        run.info.run_id
        for run in finished_runs_for(store, experiment_id, config, seeds)
        if not has_artifacts(run) and run.info.run_id != keep_run_id
    ]
    return recorder.retire_runs(store, bare, superseded_by=keep_run_id)


def reused_outcome(run, config: AblationConfig, naming: SweepNaming | None = None) -> AblationOutcome:
    metrics = run.data.metrics
    summary = {
        metric: {
            statistic: metrics.get(f"{metric}_{statistic}", math.nan) for statistic in SUMMARY_STATISTICS
        }
        for metric in METRIC_NAMES
    }
    return AblationOutcome(
        config,
        run.info.run_id,
        "reused",
        int(metrics.get("seeds_finished", 0)),
        int(metrics.get("seeds_failed", 0)),
        summary,
        name=(naming or SweepNaming()).label(config),
    )


def new_sweep_id() -> str:
    return uuid.uuid4().hex[:12]


def start_sweep_run(
    store: Store,
    experiment_id: str,
    sweep_id: str,
    config_count: int,
    seeds: Sequence[int],
    naming: SweepNaming | None = None,
    adopted_run_id: str | None = None,
    design: Mapping | None = None,
) -> str:
    """Create (or adopt) the sweep run, RUNNING, with its params and tags; returns its run id.

    `design` (pipeline.design.Design.to_dict()) is logged as design.json, so the sweep can be read and
    re-run exactly as it was specified."""
    naming = naming or SweepNaming()
    run_id = adopted_run_id or (
        store.client.create_run(
            experiment_id, run_name=f"sweep {naming.design}", tags={"kind": "sweep", **recorder.owner_tags()}
        ).info.run_id
    )
    name = f"sweep {naming.design} ({config_count} configs × {len(seeds)} seeds)"
    try:
        log_in_batches(
            store,
            run_id,
            params=without_logged(
                store,
                run_id,
                [
                    Param("preset", naming.design),
                    Param("design.axes", ",".join(naming.axes) or "none"),
                    Param("seed_list", seeds_label(seeds)),
                    Param("configs", str(config_count)),
                ],
            ),
            tags=[
                RunTag("kind", "sweep"),
                RunTag("study", "taming"),
                RunTag("sweep_id", sweep_id),
                RunTag("design", naming.design),
                RunTag(MLFLOW_RUN_NAME, name),
                RunTag("code_version", code_version()),
                *[RunTag(name, value) for name, value in naming.sweep_tags.items()],
                RunTag("git_commit", git_commit()),
                *[RunTag(name, value) for name, value in recorder.owner_tags().items()],
            ],
        )
        if design is not None:
            store.client.log_dict(run_id, dict(design), "design.json")
    except BaseException as error:
        fail_run(store, run_id, recorder.reason_of(error))
        raise
    return run_id


def partition_reused(
    store: Store,
    experiment_id: str,
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    outcomes: list,
    force: bool,
    on_reuse: Callable[[AblationConfig, str], None] | None = None,
    naming: SweepNaming | None = None,
    artifacts: bool = False,
    indices: Sequence[int] | None = None,
) -> list[int]:
    """Fill `outcomes` for configurations with a FINISHED run of the same identity (none when `force`;
    with `artifacts`, only a run that recorded them); return the indices (of `indices`, default all)
    still to train.

    A reused run gets the axis tags of the design reusing it (tags only add), so a filter on an axis finds
    it from either design. Ablation runs of a pending identity still RUNNING whose process is dead (SIGKILL,
    a lost machine) are marked FAILED, with their RUNNING seed runs and sweep run, since nothing else will
    ever close them; a live one (a concurrent sweep) is left to the claim (`_contest`).
    """
    naming = naming or SweepNaming()
    pending: list[int] = []
    for index in range(len(configs)) if indices is None else indices:
        config = configs[index]
        existing = [] if force else finished_runs_for(store, experiment_id, config, seeds, artifacts)
        if not existing:
            pending.append(index)
            _supersede_stale(store, experiment_id, config, seeds)
            continue
        run_id = existing[0].info.run_id
        outcomes[index] = reused_outcome(existing[0], config, naming)
        axis_tags = naming.axis_tags(config)
        if axis_tags:
            log_in_batches(store, run_id, tags=[RunTag(key, value) for key, value in axis_tags.items()])
        if on_reuse is not None:
            on_reuse(config, run_id)
    return pending


STALE_REASON = "interrupted: the command that started it ended without closing it"


def _supersede_stale(store: Store, experiment_id: str, config: AblationConfig, seeds: Sequence[int]) -> None:
    """Mark FAILED the RUNNING ablation runs of this identity whose process is dead (and their sweep run
    when it is dead too); runs of a live process, a concurrent sweep, are left alone."""
    running = recorder.find_units(store, experiment_id, "ablation", identity(config, seeds), recorder.RUNNING)
    stale = [run for run in running if not recorder.is_alive(run)]
    if not stale:
        return
    recorder.supersede_runs(store, [run.info.run_id for run in stale], STALE_REASON)
    sweep_ids = {run.data.tags.get("sweep_id") for run in stale} - {None}
    for sweep_id in sweep_ids:
        sweeps = recorder.find_units(store, experiment_id, "sweep", {"sweep_id": sweep_id}, recorder.RUNNING)
        dead = [run.info.run_id for run in sweeps if not recorder.is_alive(run)]
        recorder.supersede_runs(store, dead, STALE_REASON)


# The claim between concurrent sweeps is Lamport's bakery algorithm (1974), which needs no atomic
# compare-and-set, only reads and writes: MLflow offers nothing stronger across SQLite and a server. A
# claim is created with CLAIM_CHOOSING=1 (`start_ablation_run`), then takes a ticket one above every
# ticket it can see, then clears the flag. Whoever waits for every claim still choosing and then holds the
# smallest (ticket, run id) trains. A claim created after our scan sees our ticket and takes a larger one,
# so two claims can never both hold the smallest.
CLAIM_CHOOSING, CLAIM_TICKET = "claim_choosing", "claim_ticket"
CLAIM_POLL_S = 1.0
CHOOSING_POLL_S = 0.1


def _running_claims(store: Store, experiment_id: str, config: AblationConfig, seeds: Sequence[int]) -> list:
    return recorder.find_units(store, experiment_id, "ablation", identity(config, seeds), recorder.RUNNING)


def _ticket(run) -> int:
    """A claim's ticket; 0 (first in line) for a live run that has none: an adopted `mlflow run` run,
    which trains without contesting."""
    return int(run.data.tags.get(CLAIM_TICKET) or 0)


def _take_number(
    store: Store, experiment_id: str, config: AblationConfig, seeds: Sequence[int], own_run_id: str
) -> None:
    others = [
        run for run in _running_claims(store, experiment_id, config, seeds) if run.info.run_id != own_run_id
    ]
    ticket = 1 + max((_ticket(run) for run in others), default=0)
    # Two writes, in this order: whoever sees the flag cleared must already see the ticket.
    store.client.set_tag(own_run_id, CLAIM_TICKET, str(ticket))
    store.client.set_tag(own_run_id, CLAIM_CHOOSING, "0")


def _contest(
    store: Store,
    experiment_id: str,
    config: AblationConfig,
    seeds: Sequence[int],
    own_run_id: str,
    *,
    force: bool,
    artifacts: bool,
) -> str | None:
    """None when our claim (the RUNNING ablation run `own_run_id`, ticket taken) is the one to train
    this identity; else the run to wait for: a FINISHED run that appeared meanwhile, or a live claim
    ahead of ours."""
    if not force:
        finished = finished_runs_for(store, experiment_id, config, seeds, artifacts)
        if finished:
            return finished[0].info.run_id
    while True:
        running = _running_claims(store, experiment_id, config, seeds)
        own = next(run for run in running if run.info.run_id == own_run_id)
        own_place = (_ticket(own), own_run_id)
        choosing = False
        for run in running:
            if run.info.run_id == own_run_id:
                continue
            if not recorder.is_alive(run):
                recorder.supersede_runs(store, [run.info.run_id], STALE_REASON)
                continue
            if run.data.tags.get(CLAIM_CHOOSING) == "1":
                choosing = True
            elif (_ticket(run), run.info.run_id) < own_place:
                return run.info.run_id
        if not choosing:
            return None
        time.sleep(CHOOSING_POLL_S)


def _wait_for(store: Store, run_ids: Sequence[str]) -> None:
    """Until none of these runs is RUNNING with a live owner (a dead one is closed by the next contest)."""
    waiting = set(run_ids)
    while waiting:
        for run_id in list(waiting):
            run = store.client.get_run(run_id)
            if run.info.status != recorder.RUNNING or not recorder.is_alive(run):
                waiting.discard(run_id)
        if waiting:
            time.sleep(CLAIM_POLL_S)


def run_tracked_sweep(
    store: Store,
    experiment_id: str,
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    *,
    trainer: Trainer,
    naming: SweepNaming | None = None,
    design: Mapping | None = None,
    force: bool = False,
    adopted_run_id: str | None = None,
    adopt_as: str = "sweep",
    share_passes: bool = True,
    artifacts: bool = True,
    progress=None,
    on_reuse: Callable[[AblationConfig, str], None] | None = None,
    on_plan: Callable[[list[AblationConfig]], None] | None = None,
) -> tuple[str, list[AblationOutcome]]:
    """Train what is not already FINISHED and record everything; returns (sweep id, outcomes in order).

    `adopted_run_id` is the run `mlflow run` created: with adopt_as="sweep" it becomes the sweep run,
    with adopt_as="ablation" (one config) the ablation run. `trainer(configs, seeds, share_passes=...,
    progress=..., on_seed=...)` returns one AblationResult per config and calls `on_seed(config position,
    seed result)` as each seed is ready (as `run_ablations` does), or never (seeds are then written at
    the end). Configs train in groups that share a pass when
    `share_passes`, else one config per pass, and each group is recorded as soon as it has trained.
    """
    seeds = list(seeds)
    outcomes: list[AblationOutcome | None] = [None] * len(configs)
    sweep_id, sweep_run_id = new_sweep_id(), None
    # What dead commands left open is closed first: nothing stays RUNNING after this command.
    recorder.recover_experiment(store, experiment_id)
    try:
        if adopt_as == "sweep" and (adopted_run_id is not None or len(configs) > 1):
            sweep_run_id = start_sweep_run(
                store, experiment_id, sweep_id, len(configs), seeds, naming, adopted_run_id, design
            )
            recorder.heartbeat(store, [sweep_run_id])
        pending = partition_reused(
            store, experiment_id, configs, seeds, outcomes, force, on_reuse, naming, artifacts
        )
        if adopt_as == "ablation" and adopted_run_id is not None and not pending:
            # `mlflow run` opened a run for work that is already done: say so and close it.
            log_in_batches(
                store,
                adopted_run_id,
                tags=[RunTag("kind", "reuse"), RunTag("reused_run_id", outcomes[0].run_id)],
            )
            store.client.set_terminated(adopted_run_id, RunStatus.to_string(RunStatus.FINISHED))
        if on_plan is not None:
            on_plan([configs[index] for index in pending])
        while pending:
            # Identities another live sweep claimed first: wait for it, reuse its run, or (it failed or
            # died) claim them again.
            deferred: dict[int, str] = {}
            _train_and_record(
                store,
                experiment_id,
                configs,
                seeds,
                _pass_groups(configs, pending, share_passes),
                outcomes,
                trainer,
                sweep_id=sweep_id,
                naming=naming,
                force=force,
                adopted_run_id=adopted_run_id,
                adopt_as=adopt_as,
                artifacts=artifacts,
                progress=progress,
                deferred=deferred,
            )
            _wait_for(store, sorted(set(deferred.values())))
            pending = partition_reused(
                store,
                experiment_id,
                configs,
                seeds,
                outcomes,
                False,
                on_reuse,
                naming,
                artifacts,
                sorted(deferred),
            )
        if sweep_run_id is not None:
            finish_sweep_run(store, sweep_run_id, outcomes)  # type: ignore[arg-type]
    except BaseException as error:
        if sweep_run_id is not None:
            fail_run(store, sweep_run_id, recorder.reason_of(error))
        raise
    finally:
        if sweep_run_id is not None:
            recorder.release([sweep_run_id])
    return sweep_id, outcomes  # type: ignore[return-value]


def _train_and_record(
    store,
    experiment_id,
    configs,
    seeds,
    groups,
    outcomes,
    trainer,
    *,
    sweep_id,
    naming,
    force,
    adopted_run_id,
    adopt_as,
    artifacts,
    progress,
    deferred: dict[int, str],
) -> None:
    """Each pass group: open (claim) its ablation runs, train, record seeds and summaries (outcomes
    filled in). An identity whose claim loses to another live sweep's is not trained: its run is deleted
    and `deferred[index]` names the run to wait for.

    Seeds are written as the trainer hands them over (`on_seed`), so with a pool of workers the first
    chunks are recorded while the last ones train.
    """
    for group in groups:
        run_ids = {}
        seed_runs = {index: SeedRuns() for index in group}

        # The trainer's positions index the claimed part of the group, known once the claims settle.
        training: list[int] = []

        def on_seed(
            position: int, seed_result, training=training, run_ids=run_ids, seed_runs=seed_runs
        ) -> None:
            index = training[position]
            seed_runs[index].record(
                store, experiment_id, run_ids[index], seed_result, sweep_id, artifacts, naming
            )

        try:
            for index in group:
                adopt = adopted_run_id if adopt_as == "ablation" else None
                run_ids[index] = start_ablation_run(
                    store,
                    experiment_id,
                    configs[index],
                    seeds,
                    sweep_id=sweep_id,
                    naming=naming,
                    run_id=adopt,
                    artifacts=artifacts,
                )
            recorder.heartbeat(store, run_ids.values())
            if not (adopt_as == "ablation" and adopted_run_id is not None):
                group = _settle_claims(
                    store, experiment_id, configs, seeds, group, run_ids, deferred, force, artifacts
                )
                if not group:
                    continue
            training.extend(group)
            if artifacts:
                prepare_overlap_grid_painter(configs[group[0]].sae.d_sae, len(seeds))
            results = trainer(
                [configs[index] for index in group],
                seeds,
                share_passes=True,
                progress=progress,
                on_seed=on_seed,
            )
            for index, result in zip(group, results, strict=True):
                outcomes[index] = record_ablation(
                    store,
                    experiment_id,
                    run_ids[index],
                    result,
                    seeds,
                    sweep_id=sweep_id,
                    artifacts=artifacts,
                    force=force,
                    seed_runs=seed_runs[index],
                    naming=naming,
                )
        except BaseException as error:
            reason = recorder.reason_of(error)
            for index, run_id in run_ids.items():
                if outcomes[index] is None and not seed_runs[index].parent_closed:
                    seed_runs[index].fail(store, reason)
                    fail_run(store, run_id, reason)
            raise
        finally:
            recorder.release(run_ids.values())


def _settle_claims(store, experiment_id, configs, seeds, group, run_ids, deferred, force, artifacts) -> list:
    """The indices of `group` whose claim won; a lost claim's run is deleted (it holds nothing) and the
    winner recorded in `deferred`."""
    for index in group:
        _take_number(store, experiment_id, configs[index], seeds, run_ids[index])
    won = []
    for index in group:
        winner = _contest(
            store, experiment_id, configs[index], seeds, run_ids[index], force=force, artifacts=artifacts
        )
        if winner is None:
            won.append(index)
            continue
        fail_run(store, run_ids[index], f"yielded to run {winner}, which claimed this identity first")
        recorder.release([run_ids[index]])
        store.client.delete_run(run_ids.pop(index))
        deferred[index] = winner
    return won


def _pass_groups(
    configs: Sequence[AblationConfig], pending: Sequence[int], share_passes: bool
) -> list[list[int]]:
    if not share_passes:
        return [[index] for index in pending]
    groups: dict[object, list[int]] = {}
    for index in pending:
        groups.setdefault(pass_key(configs[index]), []).append(index)
    return list(groups.values())


def summary_frame(outcomes: Sequence[AblationOutcome], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per configuration: status, seeds, and mean/std of each metric."""
    rows = []
    for outcome in outcomes:
        row = {
            "configuration": outcome.name or outcome.config.name,
            "status": outcome.status,
            "seeds": f"{outcome.seeds_finished} ok"
            + (f", {outcome.seeds_failed} failed" if outcome.seeds_failed else ""),
        }
        for metric in metrics:
            description = outcome.summary.get(metric, {})
            row[metric] = description.get("mean", math.nan)
            row[f"{metric}_std"] = description.get("std", math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def finish_sweep_run(store: Store, run_id: str, outcomes: Sequence[AblationOutcome]) -> None:
    """summary.csv (one row per configuration with its ablation run id), counts; FINISHED unless any failed."""
    frame = summary_frame(outcomes, METRIC_NAMES)
    frame.insert(1, "run_id", [outcome.run_id for outcome in outcomes])
    store.client.log_text(run_id, frame.to_csv(index=False), "summary.csv")
    timestamp = now_ms()
    counts = {
        status: sum(outcome.status == status for outcome in outcomes)
        for status in ("finished", "reused", "failed")
    }
    log_in_batches(
        store,
        run_id,
        metrics=[Metric(f"ablations_{status}", count, timestamp, 0) for status, count in counts.items()],
    )
    if counts["failed"]:
        fail_run(store, run_id, f"{counts['failed']} ablation(s) failed")
    else:
        store.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
