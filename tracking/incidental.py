"""Recording the incidental-polysemanticity study (SCIENCE.md §2), and reading it back for its report.

Run tree (experiment "incidental" unless told otherwise); every run is tagged study=incidental:

    sweep run    kind=sweep     one per command invocation; tags command (collisions | noise | dynamics) and
                                sweep_id; the sweep's table (CSV) and figure (PNG); the fitted log–log slope
                                as metrics (collisions)
      point run  kind=point     nested under its sweep; params = the flattened config; metrics = means over
                                instances (non-finite values are skipped, e.g. a std over one instance); curves
                                as step series `curve.<name>`; per_instance.csv (collisions, noise) or
                                simulation.csv (dynamics); a collisions point also has metric converged (1/0)
                                and tag convergence ("converged" or "unconverged: <reason>")
    report run   kind=analysis  the report's markdown, CSVs and PNGs, the slopes as metrics

A run is FINISHED only after all its artifacts are logged; an exception marks the open runs FAILED with the
reason in the `failure_reason` tag, then propagates. This module records and reads; it never trains: the
caller passes the function that trains (or simulates) one point.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline.configuration import config_hash, flatten, from_dict
from pipeline.experiments.incidental import (
    DynamicsPoint,
    PointResult,
    collisions_table,
    curves_by_label,
    noise_label,
    slope_sentence,
    slope_table,
    summarize_points,
    unconverged_notes,
)
from pipeline.incidental import IncidentalConfig
from pipeline.plots.incidental import collisions_plot, fourth_norm_plot, sparsification_plot
from tracking.query import search_all
from tracking.store import Store, TrackingError, code_version, fail_run, git_commit, log_in_batches
from tracking.taming import without_logged

STUDY = "incidental"
DEFAULT_EXPERIMENT = "incidental"
COMMANDS = ("collisions", "noise", "dynamics")
CURVE_PREFIX = "curve."
PER_INSTANCE_ARTIFACT = "per_instance.csv"
SIMULATION_ARTIFACT = "simulation.csv"
# Trajectories of a dynamics point, logged as step series (step = Euler step index t/dt) and in its CSV.
SIMULATION_SERIES = ("l1_norm", "nonzeros", "l2_norm", "predicted_l1_norm", "predicted_nonzeros")
NOTE_TAG = "mlflow.note.content"
FINISHED = RunStatus.to_string(RunStatus.FINISHED)


def _now_ms() -> int:
    return int(time.time() * 1000)


def study_experiment_id(store: Store, name: str | None, *, create: bool = True) -> str:
    """`name`, else MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID (what `mlflow run` hands over), else
    "incidental"; created once if missing unless create=False (then TrackingError)."""
    if name is None and not (
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")
    ):
        name = DEFAULT_EXPERIMENT
    return store.experiment_id(name, create=create)


def finite_metrics(
    values: Mapping[str, float], timestamp: int, step: int = 0, prefix: str = ""
) -> list[Metric]:
    """One Metric per finite value; NaN and ±inf (undefined statistics) are left out, not logged."""
    return [
        Metric(prefix + name, float(value), timestamp, step)
        for name, value in values.items()
        if value is not None and math.isfinite(float(value))
    ]


def _series(name: str, steps: Iterable[int], values: Iterable[float], timestamp: int) -> list[Metric]:
    return [
        Metric(CURVE_PREFIX + name, float(value), timestamp, int(step))
        for step, value in zip(steps, values, strict=True)
        if math.isfinite(float(value))
    ]


def _log_figure(store: Store, run_id: str, figure, name: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.png"
        path.write_bytes(buffer.getvalue())
        store.client.log_artifact(run_id, str(path))


# ------------------------------------------------------------------------------------------------------------
# Recording


@dataclass
class TrackedSweep:
    """What one command invocation recorded.

    results: the trained points (PointResult) or simulations (DynamicsPoint), in order, with run_ids.
    table: the sweep's summary table as logged (first column run_id); metrics: the sweep run's metrics.
    """

    command: str
    sweep_id: str
    sweep_run_id: str
    run_ids: list[str]
    results: list
    table: pd.DataFrame
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Summary:
    table: pd.DataFrame
    figures: dict[str, Any]
    metrics: dict[str, float]
    description: str


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
) -> TrackedSweep:
    """The shared skeleton: a sweep run, then one nested point run per job, then the sweep's summary.

    describe(job) → (run name, params known before running, extra tags); run(job) → result;
    log_result(store, run_id, result) logs metrics, curves and artifacts (the point is closed here).
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}; got {command!r}")
    sweep_id = uuid.uuid4().hex[:12]
    identity = {"study": STUDY, "command": command, "sweep_id": sweep_id}
    sweep_run_id = adopted_run_id or (
        store.client.create_run(
            experiment_id, run_name=sweep_name, tags={"kind": "sweep", **identity}
        ).info.run_id
    )
    run_ids: list[str] = []
    results: list = []
    try:
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
                }.items()
            ],
        )
        for job in jobs:
            name, known_params, extra_tags = describe(job)
            tags = {
                "kind": "point",
                **identity,
                MLFLOW_PARENT_RUN_ID: sweep_run_id,
                MLFLOW_RUN_NAME: name,
                "code_version": code_version(),
                **extra_tags,
            }
            run_id = store.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            try:
                log_in_batches(store, run_id, params=[Param(k, v) for k, v in known_params.items()])
                result = run(job)
                log_result(store, run_id, result)
                store.client.set_terminated(run_id, FINISHED)
            except BaseException as error:
                fail_run(store, run_id, f"{type(error).__name__}: {error}")
                raise
            run_ids.append(run_id)
            results.append(result)
        summary = summarize(results)
        table = summary.table.copy()
        table.insert(0, "run_id", run_ids)
        log_in_batches(
            store,
            sweep_run_id,
            metrics=finite_metrics(summary.metrics, _now_ms()),
            tags=[RunTag(NOTE_TAG, summary.description[:7900])],
        )
        store.client.log_text(sweep_run_id, table.to_csv(index=False), f"{command}.csv")
        for figure_name, figure in summary.figures.items():
            _log_figure(store, sweep_run_id, figure, figure_name)
        store.client.set_terminated(sweep_run_id, FINISHED)
    except BaseException as error:
        fail_run(store, sweep_run_id, f"{type(error).__name__}: {error}")
        raise
    return TrackedSweep(command, sweep_id, sweep_run_id, run_ids, results, table, summary.metrics)


def _describe_config(
    command: str,
) -> Callable[[IncidentalConfig], tuple[str, dict[str, str], dict[str, str]]]:
    def describe(config: IncidentalConfig) -> tuple[str, dict[str, str], dict[str, str]]:
        if command == "noise":
            name = f"{noise_label(config)} (n={config.n}, m={config.m})"
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
    timestamp = _now_ms()
    metrics = finite_metrics({**point.metrics, "wall_time_s": point.wall_time_s}, timestamp)
    steps = point.curves["step"]
    for name, values in point.curves.items():
        if name != "step":
            metrics.extend(_series(name, steps, values, timestamp))
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


def track_points(
    store: Store,
    experiment_id: str,
    command: str,
    configs: Sequence[IncidentalConfig],
    *,
    trainer: Callable[[IncidentalConfig], PointResult],
    sweep_params: Mapping[str, Any] | None = None,
    adopted_run_id: str | None = None,
) -> TrackedSweep:
    """Record a collisions or noise sweep: `trainer(config)` trains one point (normally
    `pipeline.experiments.incidental.run_point`), each point is logged as soon as it has trained.

    The collisions sweep run gets collisions.csv (`collisions_table`), collisions.png and the log–log slope
    metrics; the noise sweep run gets noise.csv (`summarize_points`) and fourth_norm.png.
    `adopted_run_id` (the run `mlflow run` created) becomes the sweep run.
    """
    if command not in ("collisions", "noise"):
        raise ValueError(f"track_points records collisions or noise sweeps; got {command!r}")
    summarize = _summarize_collisions if command == "collisions" else _summarize_noise
    return _run_sweep(
        store,
        experiment_id,
        command,
        list(configs),
        describe=_describe_config(command),
        run=trainer,
        log_result=log_point_result,
        summarize=summarize,
        sweep_name=f"{command} ({len(configs)} points)",
        sweep_params=sweep_params or {},
        adopted_run_id=adopted_run_id,
    )


def log_dynamics_result(store: Store, run_id: str, point: DynamicsPoint) -> None:
    """Params, finite metrics, trajectories as step series (step = t/dt) and simulation.csv of one ODE run."""
    timestamp = _now_ms()
    simulation = point.simulation
    steps = [round(t / point.params["dt"]) for t in simulation["t"]]
    metrics = finite_metrics(point.metrics, timestamp)
    for name in SIMULATION_SERIES:
        metrics.extend(_series(name, steps, simulation[name], timestamp))
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


def point_runs(store: Store, experiment_id: str, sweep_id: str) -> list:
    """FINISHED point runs of a sweep, oldest first."""
    runs = search_all(
        store,
        [experiment_id],
        f"tags.study = '{STUDY}' and tags.kind = 'point' and tags.sweep_id = '{sweep_id}' "
        "and attributes.status = 'FINISHED'",
    )
    return sorted(runs, key=lambda run: run.info.start_time)


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
        row.update(flatten(config_of(run)) if tags.get("command") != "dynamics" else _dynamics_params(run))
        row.update({k: v for k, v in run.data.metrics.items() if not k.startswith(CURVE_PREFIX)})
        rows.append(row)
    return pd.DataFrame(rows)


def _dynamics_params(run) -> dict[str, float | int]:
    """A dynamics point's params (m, l1, dt, t_max, seed) as numbers."""
    return {
        name: int(float(text)) if name in ("m", "seed") else float(text)
        for name, text in run.data.params.items()
    }


def _download_csv(store: Store, run_id: str, artifact: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as folder:
        return pd.read_csv(store.client.download_artifacts(run_id, artifact, folder))


def per_instance_frame(store: Store, runs: Sequence) -> pd.DataFrame:
    """Every instance of the given point runs: run_id, sweep_id, the config fields, then per_instance.csv."""
    frames = []
    for run in runs:
        table = _download_csv(store, run.info.run_id, PER_INSTANCE_ARTIFACT)
        identity = {
            "run_id": run.info.run_id,
            "sweep_id": run.data.tags.get("sweep_id"),
            **flatten(config_of(run)),
        }
        frames.append(pd.concat([pd.DataFrame([identity] * len(table)), table], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curve(store: Store, run_id: str, name: str) -> dict[str, list[float]]:
    """A logged step series as {"step": [...], name: [...]}, in step order."""
    history = sorted(store.client.get_metric_history(run_id, CURVE_PREFIX + name), key=lambda m: m.step)
    return {"step": [m.step for m in history], name: [m.value for m in history]}


def simulation_of(store: Store, run) -> dict[str, Any]:
    """A dynamics point's trajectory from simulation.csv, in `simulate_sparsification`'s form (+ m, l1)."""
    table = _download_csv(store, run.info.run_id, SIMULATION_ARTIFACT)
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
    runs = {
        command: [run for sweep_id in ids for run in point_runs(store, experiment_id, sweep_id)]
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
    return StudyRecords(
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
    try:
        log_in_batches(
            store,
            run_id,
            metrics=finite_metrics(metrics, _now_ms()),
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
        for path in files:
            store.client.log_artifact(run_id, str(path))
        store.client.set_terminated(run_id, FINISHED)
    except BaseException as error:
        fail_run(store, run_id, f"{type(error).__name__}: {error}")
        raise
    return run_id
