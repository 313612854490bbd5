"""Running the incidental study: points trained (`pipeline.experiments.incidental`) and recorded
(`tracking.incidental`), with progress; the study's report built from the store. `cli.py` parses options
into configs and prints what these functions return."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestration.taming import InputError, experiment_and_adopted_run, open_store, reports_store_faults


@dataclass
class Recorded:
    tracked: object  # tracking.incidental.TrackedSweep
    experiment_name: str
    store_uri: str


def _step_bar(total: int, description: str):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=description, unit="step", unit_scale=True, dynamic_ncols=True, mininterval=0.5
    )


def _study_experiment(store, name: str | None, create: bool = True) -> tuple[str, str]:
    from tracking.incidental import study_experiment_id
    from tracking.store import TrackingError

    try:
        experiment_id = study_experiment_id(store, name, create=create)
    except TrackingError as error:
        raise InputError(str(error)) from None
    return experiment_id, store.client.get_experiment(experiment_id).name


def _experiment(store, name: str | None, *, create: bool = True):
    """(experiment id, name, adopted run): as every command, with 'incidental' as the default experiment."""
    return experiment_and_adopted_run(store, name, create=create, lookup=_study_experiment)


def _train_and_track(
    tracking_uri: str | None,
    experiment: str | None,
    configs: Sequence,
    *,
    steps_of: Callable,
    description: str,
    run: Callable,
    track: Callable,
) -> Recorded:
    """Open the store, train what `track` asks for (`run(config, progress)`) under one progress bar over
    every config's `steps_of(config)` steps, and record it; `track(store, experiment_id, trainer=...,
    adopted_run_id=..., on_reuse=...)` is the tracking function with its own arguments bound."""
    store = open_store(tracking_uri)
    experiment_id, experiment_name, adopted = _experiment(store, experiment)
    bar = _step_bar(sum(steps_of(config) for config in configs), description)

    def on_reuse(config, run_id: str) -> None:
        # Told before anything trains: the bar then counts (and times) only the steps still to train.
        bar.total -= steps_of(config)
        bar.refresh()

    def trainer(config):
        reported = 0

        def progress(done: int) -> None:
            nonlocal reported
            bar.update(done - reported)
            reported = done

        return run(config, progress)

    try:
        tracked = track(
            store,
            experiment_id,
            trainer=trainer,
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
            on_reuse=on_reuse,
        )
    finally:
        bar.close()
    return Recorded(tracked, experiment_name, store.uri)


@reports_store_faults
def train_and_track_points(
    command: str,
    configs: Sequence,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    force: bool,
    sweep_params: dict,
) -> Recorded:
    """Train every point not already FINISHED (one progress bar over all steps) and record each one."""
    from pipeline.experiments.incidental import run_point
    from tracking.incidental import track_points

    return _train_and_track(
        tracking_uri,
        experiment,
        configs,
        steps_of=lambda config: config.steps,
        description=f"{command}: {len(configs)} point(s)",
        run=lambda config, progress: run_point(config, progress=progress),
        track=functools.partial(
            track_points, command=command, configs=configs, sweep_params=sweep_params, force=force
        ),
    )


@reports_store_faults
def train_and_track_splitting(
    configs: Sequence,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    force: bool,
    sweep_params: dict,
) -> Recorded:
    """Train every splitting arm not already FINISHED and record each; the base model is trained once per
    invocation and shared by the arms (they are paired on it)."""
    from pipeline.experiments.incidental_splitting import run_split_point
    from tracking.incidental import track_splitting

    cache: dict = {}
    return _train_and_track(
        tracking_uri,
        experiment,
        configs,
        steps_of=lambda config: config.extra_steps,
        description=f"splitting: {len(configs)} arm(s)",
        run=lambda config, progress: run_split_point(config, base_cache=cache, progress=progress),
        track=functools.partial(track_splitting, configs=configs, sweep_params=sweep_params, force=force),
    )


@reports_store_faults
def simulate_and_track_dynamics(
    *,
    m: int,
    l1_values: Sequence[float],
    t_max_times_l1: float,
    dt: float,
    seed: int,
    tracking_uri: str | None,
    experiment: str | None,
) -> Recorded:
    """Integrate the sparsification ODE for every λ and record each as a point run."""
    from pipeline.experiments.incidental import dynamics
    from tracking.incidental import track_dynamics

    store = open_store(tracking_uri)
    experiment_id, experiment_name, adopted = _experiment(store, experiment)
    bar = _step_bar(sum(math.ceil(t_max_times_l1 / l1 / dt) for l1 in l1_values), "dynamics")

    def simulate(l1: float):
        point = dynamics(m=m, l1_values=[l1], t_max_times_l1=t_max_times_l1, dt=dt, seed=seed)[0]
        bar.update(math.ceil(t_max_times_l1 / l1 / dt))
        return point

    try:
        tracked = track_dynamics(
            store,
            experiment_id,
            list(l1_values),
            simulate=simulate,
            sweep_params={"m": m, "l1": ",".join(f"{v:g}" for v in l1_values), "dt": dt, "seed": seed},
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
        )
    finally:
        bar.close()
    return Recorded(tracked, experiment_name, store.uri)


@dataclass
class IncidentalReportResult:
    report: object  # pipeline.experiments.incidental.IncidentalReport
    folder: Path
    experiment_name: str
    run_id: str | None


@reports_store_faults
def build_and_log_incidental_report(
    *,
    tracking_uri: str | None,
    experiment: str | None,
    sweep_ids: Sequence[str],
    baseline: str,
    paired: bool,
    resamples: int,
    out_dir: str | None,
    log: bool,
) -> IncidentalReportResult:
    from pipeline.incidental_analysis import build_report
    from tracking.incidental import load_study, log_study_report, slope_metrics
    from tracking.store import TrackingError, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(f"--tracking-uri {uri}: no store there yet; run an incidental experiment first")
    store = open_store(tracking_uri, writing=log)
    experiment_id, experiment_name, adopted = _experiment(store, experiment, create=False)
    try:
        records = load_study(store, experiment_id, sweep_ids)
    except TrackingError as error:
        raise InputError(f"{error} (experiment '{experiment_name}')") from None
    built = build_report(
        collisions_instances=records.collisions_instances,
        noise_instances=records.noise_instances,
        noise_curves=records.noise_curves,
        dynamics_table=records.dynamics_table,
        simulations=records.simulations,
        baseline=baseline,
        paired=paired,
        n_resamples=resamples,
        notes=records.notes,
        cooccurrence_instances=records.cooccurrence_instances,
        splitting=records.splitting,
    )
    folder = Path(out_dir or f"reports/incidental-{time.strftime('%Y%m%d-%H%M%S')}")
    files = built.write(folder)
    run_id = None
    if log:
        run_id = log_study_report(
            store,
            experiment_id,
            files,
            description=built.headline(),
            params={
                "sweeps": records.query(),
                "baseline": baseline,
                "paired": paired,
                "resamples": resamples,
            },
            metrics=slope_metrics(built.slopes) if built.slopes is not None else {},
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
        )
    return IncidentalReportResult(built, folder, experiment_name, run_id)
