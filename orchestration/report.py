"""Building a taming report: read the seeds from the store, analyse them, write and log the files.

`cli.py report` parses options into a ReportRequest and prints what comes back; the analysis itself is
pure (`pipeline.analysis`), the reading and logging are `tracking.analysis`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestration.taming import InputError, experiment_and_adopted_run, open_store, reports_store_faults


@dataclass(frozen=True)
class ReportRequest:
    tracking_uri: str | None = None
    experiment: str | None = None
    sweep_id: str | None = None
    filter_string: str | None = None
    baseline: str | None = None
    metrics: Sequence[str] = ()
    test: str = "auto"  # auto | paired | welch
    published_ladder: bool = False
    resamples: int = 9999
    out_dir: str | None = None
    log: bool = True


@dataclass
class ReportResult:
    report: object  # pipeline.analysis.Report
    folder: Path
    experiment_name: str
    run_id: str | None
    ladder_networks: int = 0


def _existing_experiment(store, name: str | None, create: bool = False) -> tuple[str, str]:
    """(id, name) of the experiment to read: --experiment, else 'taming'. A missing experiment is an
    InputError that lists the experiments holding taming runs."""
    from tracking.store import TrackingError

    try:
        experiment_id = store.existing_experiment_id(name)
    except TrackingError as error:
        holding = [
            experiment.name
            for experiment in store.client.search_experiments()
            if store.client.search_runs([experiment.experiment_id], "tags.kind = 'ablation'", max_results=1)
        ]
        hint = (
            f"; experiments with taming runs: {', '.join(holding)} (pass --experiment NAME)"
            if holding
            else ""
        )
        raise InputError(f"{error}{hint}") from None
    return experiment_id, store.client.get_experiment(experiment_id).name


def _blamed(message: str, request: ReportRequest) -> str:
    """What a report error is about: an option only when the user gave it (build_report's messages start
    with "baseline" or "metric"); otherwise the runs selected, whose contents did not fit the defaults."""
    if message.startswith("baseline") and request.baseline:
        return "--baseline"
    if message.startswith("metric") and request.metrics:
        return "--metric"
    scope = [f"--sweep-id {request.sweep_id}"] if request.sweep_id else []
    scope += [f"--filter {request.filter_string!r}"] if request.filter_string else []
    return "the selected runs" + (f" ({', '.join(scope)})" if scope else "")


@reports_store_faults
def build_and_log_report(request: ReportRequest, on_status=lambda text: None) -> ReportResult:
    """The report of the selected seed runs; InputError (exit 2) for a selection or option that does not
    fit the store."""
    from pipeline.analysis import DEFAULT_METRICS, build_report, default_baseline
    from tracking.analysis import log_report, select_seeds, stored_networks, study_context
    from tracking.store import TrackingError

    store = open_store(request.tracking_uri, writing=request.log)
    experiment_id, experiment_name, adopted = experiment_and_adopted_run(
        store, request.experiment, create=False, lookup=_existing_experiment
    )
    if request.log:
        from tracking.recorder import recover_experiment

        # Seeds left RUNNING under a FINISHED ablation by a crash between the two are completed first.
        recover_experiment(store, experiment_id)
    try:
        frame, query = select_seeds(
            store, experiment_id, sweep_id=request.sweep_id, filter_string=request.filter_string
        )
        context = study_context(store, experiment_id, frame)
    except TrackingError as error:
        raise InputError(f"{error} (experiment '{experiment_name}')") from None
    baseline = request.baseline or default_baseline(frame)
    names = set(frame["config"])
    if request.baseline and baseline not in names:
        # Names carry the settings that vary ('random·bipolar·l1·relu · λ=0.001'): a factor name that
        # starts exactly one of them names it.
        candidates = sorted(name for name in names if name.startswith(f"{baseline} · "))
        if len(candidates) == 1:
            baseline = candidates[0]
    paired = {"auto": None, "paired": True, "welch": False}[request.test]
    dropped = frame.attrs.get("duplicates_dropped", 0)
    notes = (
        [
            f"{dropped} duplicate FINISHED seed runs (same config hash and seed: two sweeps started at once, "
            "or the same configuration trained again under another code version) were counted once, the "
            "newest kept."
        ]
        if dropped
        else []
    )
    try:
        built = build_report(
            frame,
            metrics=list(request.metrics) or list(DEFAULT_METRICS),
            baseline=baseline,
            paired=paired,
            n_resamples=request.resamples,
            extra_notes=notes,
            context=context,
        )
    except ValueError as error:
        raise InputError(f"{_blamed(str(error), request)}: {error}") from None
    if request.sweep_id is not None:
        from tracking.taming_splitting import splitting_section

        # `split` runs on this sweep's networks (the splitting remedy) get their section in its report.
        splitting = splitting_section(store, experiment_id, request.sweep_id)
        if splitting is not None:
            built.add_splitting(*splitting)
    networks = 0
    if request.published_ladder:
        from pipeline.published import published_ladder as train_ladder

        try:
            stored = stored_networks(store, frame, baseline)
        except TrackingError as error:
            raise InputError(str(error)) from None
        networks = len(stored)
        on_status(f"Training the 4 ladder SAEs on {networks} stored networks of {baseline} ...")
        built.add_published_ladder(train_ladder(stored))
    folder = Path(request.out_dir or f"reports/report-{time.strftime('%Y%m%d-%H%M%S')}")
    files = built.write(folder)
    run_id = None
    if request.log:
        options = {
            "baseline": baseline,
            "metrics": ",".join(built.metrics),
            "test": request.test,
            "published_ladder": request.published_ladder,
            "resamples": request.resamples,
            "sweep_id": request.sweep_id or "",
            "filter": request.filter_string or "",
        }
        run_id = log_report(
            store,
            experiment_id,
            files,
            description=built.headline(),
            query=query,
            options=options,
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
        )
    return ReportResult(built, folder, experiment_name, run_id, networks)
