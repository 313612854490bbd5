"""Recording the incidental-polysemanticity study (docs/science.md §2), and reading it back for its report.

Run tree (experiment "incidental" unless told otherwise); every run is tagged study=incidental:

    sweep run    kind=sweep     one per command invocation; tags command (collisions | noise | dynamics |
                                cooccurrence | splitting) and
                                sweep_id; the sweep's table (CSV; first columns run_id, reused) and figure
                                (PNG); the fitted log–log slope as metrics (collisions); points_trained,
                                points_reused, points_retired
      point run  kind=point     nested under its sweep; params = the flattened config; metrics = means over
                                instances (non-finite values are skipped, e.g. a std over one instance); curves
                                as step series `curve.<name>`; per_instance.csv (collisions, noise) or
                                simulation.csv (dynamics); a collisions point also has metric converged (1/0)
                                and tag convergence ("converged" or "unconverged: <reason>"); a splitting
                                point (one arm: baseline or ε) has per_instance.csv, checkpoints.csv (outcome
                                counts per instance and extra step) and splits.csv (each split neuron's
                                features on its copies, after the split and at the end)
    report run   kind=analysis  the report's markdown, CSVs and PNGs, the slopes as metrics

A run is FINISHED only after all its artifacts are logged; an exception marks the open runs FAILED with the
reason in the `failure_reason` tag, then propagates. This module records and reads; it never trains: the
caller passes the function that trains (or simulates) one point.

Collisions, noise, co-occurrence and splitting sweeps resume (`track_points`, `track_splitting`). A point's identity is its config hash, the code
version and the command (tags, with study and kind). A config whose identity has a FINISHED point run in the
experiment is not trained again: the new sweep reads that run back, lists it in its table (reused = True)
and counts it in points_reused; the point keeps its own sweep_id, and `point_runs` finds it through the
table. RUNNING points of a dead invocation (its owner process gone, `tracking.recorder.is_alive`) are
marked FAILED ("superseded by a re-run") and trained again, like FAILED ones; a live invocation's are left
alone. `force` trains everything and deletes the older FINISHED point of each identity,
so one identity never has two FINISHED point runs. Dynamics sweeps (seconds of work) always simulate.
"""

from __future__ import annotations

import math
import os
import shutil
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from mlflow.entities import Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline.config_tools import config_hash, flatten, from_dict
from pipeline.experiments.incidental import (
    DynamicsPoint,
    PointResult,
    point_metric_names,
    uses_sparsity_check,
)
from pipeline.experiments.incidental_splitting import (
    SPLIT_METRICS,
    SplitPointResult,
    SplittingConfig,
    splitting_config_from_params,
)
from pipeline.incidental import IncidentalConfig, assess_convergence
from pipeline.incidental_analysis import (
    collisions_table,
    cooccurrence_summary,
    curves_by_label,
    noise_label,
    slope_sentence,
    slope_table,
    splitting_summary,
    summarize_points,
    unconverged_notes,
)
from pipeline.plots.incidental import (
    collisions_plot,
    cooccurrence_plot,
    fourth_norm_plot,
    sparsification_plot,
    splitting_plot,
)
from tracking.recorder import (
    CURVE_PREFIX,
    FINISHED,
    NOTE_TAG,
    RUNNING,
    SUPERSEDED_REASON,
    create_child_run,
    failing,
    figure_writer,
    find_units,
    finished_units,
    finite_metrics,
    is_alive,
    log_files,
    now_ms,
    owner_tags,
    read_csv_artifact,
    read_step_series,
    recover_experiment,
    retire_runs,
    search_all,
    step_series,
    supersede_runs,
    without_logged,
)
from tracking.store import Store, TrackingError, code_version, git_commit, log_in_batches

STUDY = "incidental"
DEFAULT_EXPERIMENT = "incidental"
COMMANDS = ("collisions", "noise", "dynamics", "cooccurrence", "splitting")
POINT_KIND = "point"
PER_INSTANCE_ARTIFACT = "per_instance.csv"
SIMULATION_ARTIFACT = "simulation.csv"
CHECKPOINTS_ARTIFACT = "checkpoints.csv"
SPLITS_ARTIFACT = "splits.csv"
# Trajectories of a dynamics point, logged as step series (step = Euler step index t/dt) and in its CSV.
SIMULATION_SERIES = ("l1_norm", "nonzeros", "l2_norm", "predicted_l1_norm", "predicted_nonzeros")


def study_experiment_id(store: Store, name: str | None, *, create: bool = True) -> str:
    """`name`, else MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID (what `mlflow run` hands over), else
    "incidental"; created once if missing unless create=False (then TrackingError)."""
    if name is None and not (
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")
    ):
        name = DEFAULT_EXPERIMENT
    return store.experiment_id(name, create=create)


# ------------------------------------------------------------------------------------------------------------
# Recording


@dataclass
class TrackedSweep:
    """What one command invocation recorded.

    results: the points (PointResult) or simulations (DynamicsPoint), in order, trained or read back.
    run_ids: their point runs, in order; reused: the ids among them taken from earlier invocations;
    retired: older FINISHED point runs deleted because `force` retrained their identity.
    table: the sweep's summary table as logged (first columns run_id, reused); metrics: the sweep run's
    metrics (with points_trained, points_reused, points_retired).
    """

    command: str
    sweep_id: str
    sweep_run_id: str
    run_ids: list[str]
    results: list
    table: pd.DataFrame
    metrics: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)


@dataclass
class _Summary:
    table: pd.DataFrame
    figures: dict[str, Any]
    metrics: dict[str, float]
    description: str


@dataclass
class _Resume:
    """How a sweep finds finished points and reads them back (`_run_sweep` without one computes every job).

    identity(job): the tags that say what a point computed (`point_identity`); read_back(store, run, job):
    the job's result rebuilt from its FINISHED run; force: compute every job anyway and delete the older
    FINISHED runs of its identity once the new one has finished; on_reuse(job, run_id): told of each reuse
    before anything trains.
    """

    identity: Callable[[Any], dict[str, str]]
    read_back: Callable[[Store, Run, Any], Any]
    force: bool = False
    on_reuse: Callable[[Any, str], None] | None = None


def _plan(
    store: Store,
    experiment_id: str,
    jobs: Sequence[Any],
    resume: _Resume | None,
    *,
    sweep_id: str,
    sweep_run_id: str,
) -> list[Run | None]:
    """The FINISHED point run to reuse for each job, None where the job must be computed.

    A RUNNING point of a job's identity whose owner process is dead belongs to an invocation that was
    killed (SIGKILL leaves runs RUNNING; an exception or Ctrl-C would have marked them FAILED): it is
    marked FAILED, superseded by this sweep, and so is its sweep run, and the still-RUNNING sweep run a
    reused point hangs under, when dead too. Runs of a live invocation (a concurrent one) are left alone.
    """
    reason = f"{SUPERSEDED_REASON} (sweep {sweep_id})"
    if resume is None:
        recover_experiment(store, experiment_id, reason)
        return [None] * len(jobs)
    plan: list[Run | None] = []
    stale: list[str] = []
    sweeps: set[str] = set()
    for job in jobs:
        identity = resume.identity(job)
        existing = [] if resume.force else finished_units(store, experiment_id, POINT_KIND, identity)
        plan.append(existing[0] if existing else None)
        running = [
            run
            for run in find_units(store, experiment_id, POINT_KIND, identity, RUNNING)
            if not is_alive(run)
        ]
        stale += [run.info.run_id for run in running]
        sweeps |= {run.data.tags.get(MLFLOW_PARENT_RUN_ID) for run in [*existing[:1], *running]}
        if existing and resume.on_reuse is not None:
            resume.on_reuse(job, existing[0].info.run_id)
    supersede_runs(store, stale, reason)
    sweeps.discard(None)
    sweeps.discard(sweep_run_id)
    dead_sweeps = [run_id for run_id in sorted(sweeps) if not is_alive(store.client.get_run(run_id))]
    supersede_runs(store, dead_sweeps, reason)
    # Whatever else a dead invocation left RUNNING in the experiment is closed too.
    recover_experiment(store, experiment_id, reason)
    return plan


def _run_sweep(
    store: Store,
    experiment_id: str,
    command: str,
    jobs: Sequence[Any],
    *,
    describe: Callable[[Any], tuple[str, dict[str, str], dict[str, str]]],
    run: Callable[[Any], Any],
    log_result: Callable[[Store, str, Any], None],
    summarize: Callable[[list], _Summary],
    sweep_name: str,
    sweep_params: Mapping[str, Any],
    adopted_run_id: str | None,
    resume: _Resume | None = None,
) -> TrackedSweep:
    """The shared skeleton: a sweep run, then one nested point run per job (or the FINISHED point of an
    earlier invocation, see `_Resume`), then the sweep's summary.

    describe(job) → (run name, params known before running, extra tags); run(job) → result;
    log_result(store, run_id, result) logs metrics, curves and artifacts (the point is closed here).
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}; got {command!r}")
    sweep_id = uuid.uuid4().hex[:12]
    identity = {"study": STUDY, "command": command, "sweep_id": sweep_id}
    sweep_run_id = adopted_run_id or (
        store.client.create_run(
            experiment_id, run_name=sweep_name, tags={"kind": "sweep", **identity, **owner_tags()}
        ).info.run_id
    )
    run_ids: list[str] = []
    results: list = []
    reused: list[str] = []
    retired: list[str] = []
    with failing(store, sweep_run_id):
        params = [Param(name, str(value)) for name, value in {**sweep_params, "points": len(jobs)}.items()]
        log_in_batches(
            store,
            sweep_run_id,
            params=without_logged(store, sweep_run_id, params),
            tags=[
                RunTag(name, value)
                for name, value in {
                    "kind": "sweep",
                    **identity,
                    MLFLOW_RUN_NAME: sweep_name,
                    "code_version": code_version(),
                    "git_commit": git_commit(),
                    **owner_tags(),
                }.items()
            ],
        )
        plan = _plan(store, experiment_id, jobs, resume, sweep_id=sweep_id, sweep_run_id=sweep_run_id)
        for job, existing in zip(jobs, plan, strict=True):
            if existing is not None:
                run_id = existing.info.run_id
                result = resume.read_back(store, existing, job)  # type: ignore[union-attr]
                reused.append(run_id)
            else:
                name, known_params, extra_tags = describe(job)
                tags = {"kind": POINT_KIND, **identity, "code_version": code_version(), **extra_tags}
                run_id = create_child_run(store, experiment_id, sweep_run_id, name, tags)
                with failing(store, run_id):
                    log_in_batches(store, run_id, params=[Param(k, v) for k, v in known_params.items()])
                    result = run(job)
                    log_result(store, run_id, result)
                    store.client.set_terminated(run_id, FINISHED)
                if resume is not None and resume.force:
                    older = finished_units(store, experiment_id, POINT_KIND, resume.identity(job))
                    older_ids = [run.info.run_id for run in older if run.info.run_id != run_id]
                    retired += retire_runs(store, older_ids, superseded_by=run_id)
            run_ids.append(run_id)
            results.append(result)
        summary = summarize(results)
        table = summary.table.copy()
        table.insert(0, "run_id", run_ids)
        table.insert(1, "reused", [run_id in reused for run_id in run_ids])
        metrics = summary.metrics | {
            "points_trained": float(len(jobs) - len(reused)),
            "points_reused": float(len(reused)),
            "points_retired": float(len(retired)),
        }
        log_in_batches(
            store,
            sweep_run_id,
            metrics=finite_metrics(metrics, now_ms()),
            tags=[RunTag(NOTE_TAG, summary.description[:7900])],
        )
        files = {f"{command}.csv": lambda path: table.to_csv(path, index=False)}
        files |= {f"{name}.png": figure_writer(figure) for name, figure in summary.figures.items()}
        log_files(store, sweep_run_id, files)
        store.client.set_terminated(sweep_run_id, FINISHED)
    return TrackedSweep(command, sweep_id, sweep_run_id, run_ids, results, table, metrics, reused, retired)


def _describe_config(
    command: str,
) -> Callable[[IncidentalConfig], tuple[str, dict[str, str], dict[str, str]]]:
    def describe(config: IncidentalConfig) -> tuple[str, dict[str, str], dict[str, str]]:
        if command == "noise":
            name = f"{noise_label(config)} (n={config.n}, m={config.m})"
        elif command == "cooccurrence":
            name = f"n={config.n} m={config.m} p={config.p:g}"
        else:
            name = f"n={config.n} m={config.m} λ={config.l1:g}"
        params = {key: str(value) for key, value in flatten(config).items()}
        return name, params, {"config_hash": config_hash(config), "noise": config.noise}

    return describe


CONVERGENCE_TAG = "convergence"


def convergence_tag(point: PointResult) -> str | None:
    """The `convergence` tag of a point: "converged", "unconverged: <reason>", None for a noise point."""
    if point.convergence is None:
        return None
    return "converged" if point.convergence.converged else f"unconverged: {point.convergence.reason()}"


def log_point_result(store: Store, run_id: str, point: PointResult) -> None:
    """Metrics (finite ones), curves as step series, the convergence tag (L1 points) and the per-instance
    table of one trained point."""
    timestamp = now_ms()
    metrics = finite_metrics({**point.metrics, "wall_time_s": point.wall_time_s}, timestamp)
    steps = point.curves["step"]
    for name, values in point.curves.items():
        if name != "step":
            metrics.extend(step_series(name, steps, values, timestamp))
    tag = convergence_tag(point)
    tags = [RunTag(CONVERGENCE_TAG, tag)] if tag is not None else []
    log_in_batches(store, run_id, metrics=metrics, tags=tags)
    store.client.log_text(run_id, point.per_instance.to_csv(index=False), PER_INSTANCE_ARTIFACT)


def slope_metrics(slopes: pd.DataFrame) -> dict[str, float]:
    """loglog_slope (+ _ci_low, _ci_high, _intercept, _points: the points fitted, _unconverged: the points
    left out as unconverged) per (n, λ) group; the group is named only when there are several:
    loglog_slope_n64_l1_0.001. A slope that could not be fitted is NaN and is not logged."""
    metrics: dict[str, float] = {}
    for row in slopes.itertuples():
        suffix = "" if len(slopes) == 1 else f"_n{row.n}_l1_{row.l1:g}"
        metrics[f"loglog_slope_points{suffix}"] = float(row.points)
        metrics[f"loglog_slope_unconverged{suffix}"] = float(row.unconverged)
        metrics[f"loglog_slope{suffix}"] = row.slope
        metrics[f"loglog_slope_ci_low{suffix}"] = row.slope_ci_low
        metrics[f"loglog_slope_ci_high{suffix}"] = row.slope_ci_high
        metrics[f"loglog_intercept{suffix}"] = row.intercept
    return metrics


def _summarize_collisions(points: list[PointResult]) -> _Summary:
    table = collisions_table(points)
    slopes = slope_table(table)
    lines = [slope_sentence(row) for row in slopes.itertuples()] + unconverged_notes(table)
    metrics = slope_metrics(slopes) | {"unconverged_points": float((~table["converged"]).sum())}
    return _Summary(table, {"collisions": collisions_plot(table)}, metrics, "\n".join(lines))


def _summarize_noise(points: list[PointResult]) -> _Summary:
    table = summarize_points(points)
    ms = {point.config.m for point in points}
    figure = fourth_norm_plot(curves_by_label(points), ms.pop() if len(ms) == 1 else None)
    lines = [
        f"{noise_label(point.config)}: final fourth norm {point.metrics['fourth_norm']:.3f}, "
        f"polysemantic neurons {point.metrics['polysemantic_neurons']:.2f}"
        for point in points
    ]
    return _Summary(table, {"fourth_norm": figure}, {}, "\n".join(lines))


def _summarize_cooccurrence(points: list[PointResult]) -> _Summary:
    per_instance = pd.concat(
        [point.per_instance.assign(n=point.config.n, m=point.config.m, p=point.config.p) for point in points],
        ignore_index=True,
    )
    summary = cooccurrence_summary(per_instance)
    lines = [
        f"m = {row.m}, p = {row.p:g}: polysemantic neurons {row.polysemantic_neurons:.2f} "
        f"[{row.ci_low:.2f}, {row.ci_high:.2f}]"
        for row in summary.itertuples()
    ]
    table = summarize_points(points, {name: name for name in ("n", "m", "p", "l1", "batch_size")})
    return _Summary(table, {"cooccurrence": cooccurrence_plot(summary)}, {}, "\n".join(lines))


def point_identity(command: str, config: IncidentalConfig) -> dict[str, str]:
    """What a point computed, as the tags a FINISHED point run is found by: the study, the command, the
    config hash (every field, seed and device included) and the code version (a hash of the `pipeline/`
    sources and the torch version, so results from changed science are never reused)."""
    return {
        "study": STUDY,
        "command": command,
        "config_hash": config_hash(config),
        "code_version": code_version(),
    }


def _curves_of(store: Store, run: Run) -> dict[str, list[float]]:
    """A point's curves from its step series, in `run_point`'s form: "step" then one list per curve (NaN
    where a value was not finite and so was not logged)."""
    names = sorted(key.removeprefix(CURVE_PREFIX) for key in run.data.metrics if key.startswith(CURVE_PREFIX))
    series = {name: read_step_series(store, run.info.run_id, name) for name in names}
    steps = sorted({step for values in series.values() for step in values})
    return {
        "step": steps,
        **{name: [values.get(step, math.nan) for step in steps] for name, values in series.items()},
    }


def read_point(store: Store, run: Run, config: IncidentalConfig) -> PointResult:
    """The PointResult of a FINISHED point run, rebuilt from what it logged: metrics (a metric left out as
    non-finite comes back NaN), per_instance.csv, the curves and the convergence check (recomputed from the
    per-instance sparsity, as `run_point` computes it). The weights are not stored: a point read back has
    empty [0, n, m] tensors, which nothing downstream of a sweep reads."""
    metrics = run.data.metrics
    per_instance = read_csv_artifact(store, run.info.run_id, PER_INSTANCE_ARTIFACT)
    convergence = (
        assess_convergence(per_instance["encoding_sparsity"]) if uses_sparsity_check(config) else None
    )
    empty = torch.empty((0, config.n, config.m))
    return PointResult(
        config=config,
        params=flatten(config),
        metrics={name: metrics.get(name, math.nan) for name in point_metric_names(config)},
        per_instance=per_instance,
        curves=_curves_of(store, run),
        initial_weights=empty,
        final_weights=empty,
        wall_time_s=metrics.get("wall_time_s", math.nan),
        convergence=convergence,
    )


def track_points(
    store: Store,
    experiment_id: str,
    command: str,
    configs: Sequence[IncidentalConfig],
    *,
    trainer: Callable[[IncidentalConfig], PointResult],
    sweep_params: Mapping[str, Any] | None = None,
    adopted_run_id: str | None = None,
    force: bool = False,
    on_reuse: Callable[[IncidentalConfig, str], None] | None = None,
) -> TrackedSweep:
    """Record a collisions or noise sweep: `trainer(config)` trains one point (normally
    `pipeline.experiments.incidental.run_point`), each point is logged as soon as it has trained.

    Resumes: a config whose identity (`point_identity`) has a FINISHED point run in the experiment is not
    trained again; that run is read back (`read_point`) and listed in the sweep's table (reused = True),
    and `on_reuse(config, run_id)` is told before anything trains. With `force` every config is trained
    and the older FINISHED runs of its identity are deleted once the new one has finished, so one identity
    never has two FINISHED point runs.

    The collisions sweep run gets collisions.csv (`collisions_table`), collisions.png and the log–log slope
    metrics; the noise sweep run gets noise.csv (`summarize_points`) and fourth_norm.png; both get the
    metrics points_trained, points_reused and points_retired. `adopted_run_id` (the run `mlflow run`
    created) becomes the sweep run.
    """
    summarizers = {
        "collisions": _summarize_collisions,
        "noise": _summarize_noise,
        "cooccurrence": _summarize_cooccurrence,
    }
    if command not in summarizers:
        raise ValueError(f"track_points records collisions, noise or cooccurrence sweeps; got {command!r}")
    configs = list(configs)
    hashes = [config_hash(config) for config in configs]
    if len(set(hashes)) != len(hashes):
        raise ValueError("configs repeat a configuration (same config hash); give each one once")
    summarize = summarizers[command]
    return _run_sweep(
        store,
        experiment_id,
        command,
        configs,
        describe=_describe_config(command),
        run=trainer,
        log_result=log_point_result,
        summarize=summarize,
        sweep_name=f"{command} ({len(configs)} points)",
        sweep_params=sweep_params or {},
        adopted_run_id=adopted_run_id,
        resume=_Resume(
            identity=lambda config: point_identity(command, config),
            read_back=read_point,
            force=force,
            on_reuse=on_reuse,
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# The splitting remedy


def split_identity(config: SplittingConfig) -> dict[str, str]:
    """What a splitting arm computed: study, command, the hash of its config (base included), code version."""
    return {
        "study": STUDY,
        "command": "splitting",
        "config_hash": config_hash(config),
        "code_version": code_version(),
    }


def _describe_split(config: SplittingConfig) -> tuple[str, dict[str, str], dict[str, str]]:
    base = config.base
    name = f"{config.label()} (n={base.n}, m={base.m}, λ={base.l1:g}, +{config.extra_steps} steps)"
    params = {key: str(value) for key, value in flatten(config).items()}
    return name, params, {"config_hash": config_hash(config), "arm": config.label()}


def log_split_result(store: Store, run_id: str, point: SplitPointResult) -> None:
    """Finite metrics, curves as step series (step = extra step), per_instance.csv, checkpoints.csv and
    splits.csv of one splitting arm."""
    timestamp = now_ms()
    metrics = finite_metrics({**point.metrics, "wall_time_s": point.wall_time_s}, timestamp)
    for name, values in point.curves.items():
        if name != "step":
            metrics.extend(step_series(name, point.curves["step"], values, timestamp))
    log_in_batches(store, run_id, metrics=metrics)
    log_files(
        store,
        run_id,
        {
            PER_INSTANCE_ARTIFACT: lambda path: point.per_instance.to_csv(path, index=False),
            CHECKPOINTS_ARTIFACT: lambda path: point.checkpoints.to_csv(path, index=False),
            SPLITS_ARTIFACT: lambda path: point.splits.to_csv(path, index=False),
        },
    )


def read_split_point(store: Store, run: Run, config: SplittingConfig) -> SplitPointResult:
    """A splitting arm rebuilt from its FINISHED run: metrics, the three tables and the curves."""
    run_id = run.info.run_id
    return SplitPointResult(
        config=config,
        params=flatten(config),
        metrics={name: run.data.metrics.get(name, math.nan) for name in SPLIT_METRICS},
        per_instance=read_csv_artifact(store, run_id, PER_INSTANCE_ARTIFACT),
        checkpoints=read_csv_artifact(store, run_id, CHECKPOINTS_ARTIFACT),
        splits=_read_splits(store, run_id),
        curves=_curves_of(store, run),
        wall_time_s=run.data.metrics.get("wall_time_s", math.nan),
    )


def _read_splits(store: Store, run_id: str) -> pd.DataFrame:
    """splits.csv, which may have a header and no rows (nothing was polysemantic)."""
    return read_csv_artifact(store, run_id, SPLITS_ARTIFACT)


def _summarize_splitting(points: list[SplitPointResult]) -> _Summary:
    summary = splitting_summary(
        {point.config.label(): point.per_instance for point in points},
        {point.config.label(): point.checkpoints for point in points},
        {point.config.label(): point.splits for point in points},
        n_resamples=999,
    )
    lines = [
        f"{row.arm}: resolved {row.resolved_fraction:.3f} [{row.resolved_ci_low:.3f}, {row.resolved_ci_high:.3f}], "
        f"polysemantic after {row.polysemantic_after:.2f} (before {row.polysemantic_before:.2f})"
        for row in summary.arms.itertuples()
    ]
    figure = splitting_plot(summary, {point.config.label(): point.splits for point in points})
    return _Summary(summary.arms, {"splitting": figure}, {}, "\n".join(lines))


def track_splitting(
    store: Store,
    experiment_id: str,
    configs: Sequence[SplittingConfig],
    *,
    trainer: Callable[[SplittingConfig], SplitPointResult],
    sweep_params: Mapping[str, Any] | None = None,
    adopted_run_id: str | None = None,
    force: bool = False,
    on_reuse: Callable[[SplittingConfig, str], None] | None = None,
) -> TrackedSweep:
    """Record a splitting sweep: one point run per arm (the baseline and each ε), resumed like
    `track_points` (identity `split_identity`); the sweep run gets splitting.csv and splitting.png."""
    configs = list(configs)
    hashes = [config_hash(config) for config in configs]
    if len(set(hashes)) != len(hashes):
        raise ValueError("configs repeat an arm (same config hash); give each one once")
    return _run_sweep(
        store,
        experiment_id,
        "splitting",
        configs,
        describe=_describe_split,
        run=trainer,
        log_result=log_split_result,
        summarize=_summarize_splitting,
        sweep_name=f"splitting ({len(configs)} arms)",
        sweep_params=sweep_params or {},
        adopted_run_id=adopted_run_id,
        resume=_Resume(identity=split_identity, read_back=read_split_point, force=force, on_reuse=on_reuse),
    )


def log_dynamics_result(store: Store, run_id: str, point: DynamicsPoint) -> None:
    """Params, finite metrics, trajectories as step series (step = t/dt) and simulation.csv of one ODE run."""
    timestamp = now_ms()
    simulation = point.simulation
    steps = [round(t / point.params["dt"]) for t in simulation["t"]]
    metrics = finite_metrics(point.metrics, timestamp)
    for name in SIMULATION_SERIES:
        metrics.extend(step_series(name, steps, simulation[name], timestamp))
    params = without_logged(store, run_id, [Param(k, str(v)) for k, v in point.params.items()])
    log_in_batches(store, run_id, metrics=metrics, params=params)
    frame = pd.DataFrame({"t": simulation["t"], **{name: simulation[name] for name in SIMULATION_SERIES}})
    store.client.log_text(run_id, frame.to_csv(index=False), SIMULATION_ARTIFACT)


def _summarize_dynamics(points: list[DynamicsPoint]) -> _Summary:
    table = pd.DataFrame([point.params | point.metrics for point in points])
    lines = [
        f"m = {point.params['m']}, λ = {point.params['l1']:g}: done at t·λ = "
        f"{point.metrics['completion_time_times_l1']:.2f}, m′/prediction median "
        f"{point.metrics['nonzeros_ratio_median']:.2f}"
        for point in points
    ]
    figure = sparsification_plot([point.simulation for point in points])
    return _Summary(table, {"sparsification": figure}, {}, "\n".join(lines))


def track_dynamics(
    store: Store,
    experiment_id: str,
    l1_values: Sequence[float],
    *,
    simulate: Callable[[float], DynamicsPoint],
    sweep_params: Mapping[str, Any] | None = None,
    adopted_run_id: str | None = None,
) -> TrackedSweep:
    """Record the sparsification ODE: `simulate(l1)` runs one λ (normally `pipeline.experiments.incidental.
    dynamics` with that one λ); the sweep run gets dynamics.csv and sparsification.png."""
    return _run_sweep(
        store,
        experiment_id,
        "dynamics",
        list(l1_values),
        describe=lambda l1: (f"λ={l1:g}", {"l1": str(l1)}, {}),
        run=simulate,
        log_result=log_dynamics_result,
        summarize=_summarize_dynamics,
        sweep_name=f"dynamics ({len(l1_values)} points)",
        sweep_params=sweep_params or {},
        adopted_run_id=adopted_run_id,
    )


# ------------------------------------------------------------------------------------------------------------
# Reading back


def latest_sweep_ids(store: Store, experiment_id: str) -> dict[str, str]:
    """{command: sweep id} of the newest FINISHED sweep run of each command present in the experiment."""
    latest = {}
    for command in COMMANDS:
        runs = store.client.search_runs(
            [experiment_id],
            f"tags.study = '{STUDY}' and tags.kind = 'sweep' and tags.command = '{command}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if runs:
            latest[command] = runs[0].data.tags["sweep_id"]
    return latest


def sweep_commands(store: Store, experiment_id: str, sweep_ids: Sequence[str]) -> dict[str, str]:
    """{sweep id: command} for given sweep ids; TrackingError naming --sweep-id for an unknown one."""
    commands = {}
    for sweep_id in sweep_ids:
        runs = store.client.search_runs(
            [experiment_id],
            f"tags.study = '{STUDY}' and tags.kind = 'sweep' and tags.sweep_id = '{sweep_id}'",
            max_results=1,
        )
        if not runs:
            raise TrackingError(f"--sweep-id {sweep_id!r} matches no incidental sweep run in this experiment")
        commands[sweep_id] = runs[0].data.tags["command"]
    return commands


def _listed_run_ids(store: Store, experiment_id: str, sweep_id: str) -> list[str]:
    """The run_id column of a sweep's table (<command>.csv), [] when the sweep has none (it failed or was
    killed before its summary, which is written last)."""
    sweeps = store.client.search_runs(
        [experiment_id],
        f"tags.study = '{STUDY}' and tags.kind = 'sweep' and tags.sweep_id = '{sweep_id}'",
        max_results=1,
    )
    if not sweeps:
        return []
    run_id, artifact = sweeps[0].info.run_id, f"{sweeps[0].data.tags.get('command')}.csv"
    if artifact not in {entry.path for entry in store.client.list_artifacts(run_id)}:
        return []
    return [str(value) for value in read_csv_artifact(store, run_id, artifact)["run_id"]]


def point_runs(store: Store, experiment_id: str, sweep_id: str) -> list[Run]:
    """FINISHED point runs of a sweep, each once, oldest first: those it trained (tagged with its sweep_id)
    and those it reused from earlier invocations (listed in its table, tagged with their own sweep's id).
    A listed run deleted since (retired by a forced re-run) is left out."""
    runs = {
        run.info.run_id: run
        for run in search_all(
            store,
            [experiment_id],
            f"tags.study = '{STUDY}' and tags.kind = '{POINT_KIND}' and tags.sweep_id = '{sweep_id}' "
            f"and attributes.status = '{FINISHED}'",
        )
    }
    for run_id in _listed_run_ids(store, experiment_id, sweep_id):
        if run_id in runs:
            continue
        try:
            run = store.client.get_run(run_id)
        except MlflowException:  # removed for good (`mlflow gc`)
            continue
        if run.info.status == FINISHED and run.info.lifecycle_stage == "active":
            runs[run_id] = run
    return sorted(runs.values(), key=lambda run: run.info.start_time)


_CONFIG_HINTS = typing.get_type_hints(IncidentalConfig)


def config_of(run) -> IncidentalConfig:
    """The IncidentalConfig of a point run, rebuilt (and validated) from its string params."""
    values = {}
    for name, text in run.data.params.items():
        hint = _CONFIG_HINTS.get(name)
        if hint is not None:
            values[name] = int(text) if hint is int else float(text) if hint is float else text
    return from_dict(IncidentalConfig, values)


def points_frame(runs: Sequence) -> pd.DataFrame:
    """One row per point run: run_id, sweep_id, command, every config field, then its logged metrics
    (curves left out)."""
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "sweep_id": tags.get("sweep_id"),
            "command": tags.get("command"),
        }
        if tags.get("command") == "dynamics":
            row.update(_dynamics_params(run))
        elif tags.get("command") == "splitting":
            row.update(flatten(splitting_config_from_params(run.data.params)))
        else:
            row.update(flatten(config_of(run)))
        row.update({k: v for k, v in run.data.metrics.items() if not k.startswith(CURVE_PREFIX)})
        rows.append(row)
    return pd.DataFrame(rows)


def _dynamics_params(run) -> dict[str, float | int]:
    """A dynamics point's params (m, l1, dt, t_max, seed) as numbers."""
    return {
        name: int(float(text)) if name in ("m", "seed") else float(text)
        for name, text in run.data.params.items()
    }


def per_instance_frame(store: Store, runs: Sequence) -> pd.DataFrame:
    """Every instance of the given point runs: run_id, sweep_id, the config fields, then per_instance.csv."""
    frames = []
    for run in runs:
        table = read_csv_artifact(store, run.info.run_id, PER_INSTANCE_ARTIFACT)
        identity = {
            "run_id": run.info.run_id,
            "sweep_id": run.data.tags.get("sweep_id"),
            **flatten(config_of(run)),
        }
        frames.append(pd.concat([pd.DataFrame([identity] * len(table)), table], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curve(store: Store, run_id: str, name: str) -> dict[str, list[float]]:
    """A logged step series as {"step": [...], name: [...]}, in step order."""
    series = read_step_series(store, run_id, name)
    return {"step": list(series), name: list(series.values())}


def simulation_of(store: Store, run) -> dict[str, Any]:
    """A dynamics point's trajectory from simulation.csv, in `simulate_sparsification`'s form (+ m, l1)."""
    table = read_csv_artifact(store, run.info.run_id, SIMULATION_ARTIFACT)
    simulation: dict[str, Any] = {column: table[column].to_numpy() for column in table.columns}
    params = _dynamics_params(run)
    simulation["m"], simulation["l1"] = params["m"], params["l1"]
    return simulation


@dataclass
class StudyRecords:
    """What the report reads, per command (None when the selection has no such sweep)."""

    sweeps: dict[str, list[str]]
    collisions_instances: pd.DataFrame | None
    noise_instances: pd.DataFrame | None
    noise_curves: dict[str, dict[str, list[float]]]
    dynamics_table: pd.DataFrame | None
    simulations: list[dict[str, Any]]
    notes: list[str]
    cooccurrence_instances: pd.DataFrame | None = None
    splitting: dict[str, dict[str, pd.DataFrame]] | None = None

    def query(self) -> str:
        return "; ".join(f"{command}: {', '.join(ids)}" for command, ids in self.sweeps.items())


def load_study(store: Store, experiment_id: str, sweep_ids: Sequence[str] = ()) -> StudyRecords:
    """The FINISHED point runs of the chosen sweeps (default: the newest FINISHED sweep of each command).

    Raises TrackingError when nothing matches, or when one config (same config hash) appears in two
    selected sweeps: its instances would be counted twice.
    """
    if sweep_ids:
        by_command: dict[str, list[str]] = {}
        for sweep_id, command in sweep_commands(store, experiment_id, sweep_ids).items():
            by_command.setdefault(command, []).append(sweep_id)
    else:
        by_command = {
            command: [sweep_id] for command, sweep_id in latest_sweep_ids(store, experiment_id).items()
        }
    if not by_command:
        raise TrackingError(
            "this experiment has no finished incidental sweep; run `python cli.py incidental collisions` "
            "(or noise, dynamics) first, or check --experiment and --sweep-id"
        )
    # A point reused by a later sweep is listed by both: select both sweeps and it still counts once.
    runs = {
        command: list(
            {
                run.info.run_id: run for sweep_id in ids for run in point_runs(store, experiment_id, sweep_id)
            }.values()
        )
        for command, ids in by_command.items()
    }
    notes = []
    for command, command_runs in runs.items():
        if not command_runs:
            raise TrackingError(f"sweep(s) {', '.join(by_command[command])} have no finished point runs")
        hashes = [
            run.data.tags.get("config_hash") for run in command_runs if run.data.tags.get("config_hash")
        ]
        if len(hashes) != len(set(hashes)):
            raise TrackingError(
                f"--sweep-id: the selected {command} sweeps share configurations; pick one sweep per config"
            )
        versions = sorted({run.data.tags.get("code_version", "?") for run in command_runs})
        notes.append(
            f"{command}: {len(command_runs)} point runs from sweep(s) {', '.join(by_command[command])} "
            f"(code version {', '.join(versions)})"
        )
    noise_runs = runs.get("noise", [])
    dynamics_runs = runs.get("dynamics", [])
    cooccurrence_runs = runs.get("cooccurrence", [])
    return StudyRecords(
        cooccurrence_instances=per_instance_frame(store, cooccurrence_runs) if cooccurrence_runs else None,
        splitting=splitting_records(store, runs["splitting"]) if runs.get("splitting") else None,
        sweeps=by_command,
        collisions_instances=per_instance_frame(store, runs["collisions"]) if "collisions" in runs else None,
        noise_instances=per_instance_frame(store, noise_runs) if noise_runs else None,
        noise_curves={
            noise_label(config_of(run)): curve(store, run.info.run_id, "fourth_norm") for run in noise_runs
        },
        dynamics_table=(
            points_frame(dynamics_runs).drop(columns=["sweep_id", "command"]) if dynamics_runs else None
        ),
        simulations=[simulation_of(store, run) for run in dynamics_runs],
        notes=notes,
    )


def splitting_records(store: Store, runs: Sequence[Run]) -> dict[str, dict[str, pd.DataFrame]]:
    """{arm label: {"per_instance", "checkpoints", "splits", "config"}} of the splitting point runs, the
    baseline first, then by ε; "config" is a one-row frame of the flattened arm config."""
    records = {}
    configs = [(splitting_config_from_params(run.data.params), run) for run in runs]
    for config, run in sorted(configs, key=lambda item: (item[0].split, item[0].epsilon)):
        run_id = run.info.run_id
        records[config.label()] = {
            "per_instance": read_csv_artifact(store, run_id, PER_INSTANCE_ARTIFACT),
            "checkpoints": read_csv_artifact(store, run_id, CHECKPOINTS_ARTIFACT),
            "splits": _read_splits(store, run_id),
            "config": pd.DataFrame([flatten(config)]),
        }
    return records


def log_study_report(
    store: Store,
    experiment_id: str,
    files: Sequence[Path],
    *,
    description: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    adopted_run_id: str | None = None,
) -> str:
    """Log a written report as its own run (kind=analysis, study=incidental), every file an artifact."""
    run_id = (
        adopted_run_id
        or store.client.create_run(
            experiment_id, run_name="incidental report", tags={"kind": "analysis", "study": STUDY}
        ).info.run_id
    )
    with failing(store, run_id):
        log_in_batches(
            store,
            run_id,
            metrics=finite_metrics(metrics, now_ms()),
            params=without_logged(store, run_id, [Param(k, str(v)[:6000]) for k, v in params.items()]),
            tags=[
                RunTag("kind", "analysis"),
                RunTag("study", STUDY),
                RunTag(MLFLOW_RUN_NAME, "incidental report"),
                RunTag("code_version", code_version()),
                RunTag("git_commit", git_commit()),
                RunTag(NOTE_TAG, description[:7900]),
            ],
        )
        log_files(store, run_id, {path.name: partial(shutil.copyfile, path) for path in files})
        store.client.set_terminated(run_id, FINISHED)
    return run_id
