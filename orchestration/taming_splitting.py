"""`split`: the splitting remedy on the networks of a stored taming sweep, recorded and analysed.

Reads the sweep's networks from its seed runs' checkpoints (`tracking.decompose.read_source_sweep`),
splits the polysemantic neurons of each network's last hidden layer and fine-tunes it, and the unsplit
network beside it (`pipeline.experiments.taming_splitting`), records one run per (network, arm, epochs)
(`tracking.taming_splitting`), then compares the arms from the stored runs (`pipeline.taming_splitting`).
`report_only` skips the computation and rebuilds the table and figures from the stored runs alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.taming import (
    InputError,
    _progress_bar,
    experiment_and_adopted_run,
    open_store,
    reports_store_faults,
)

DEFAULT_EPSILONS = (0.0, 0.01, 0.1, 0.3)
DEFAULT_EPOCHS = (200, 1000)
MAX_EPSILON = 10.0
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class SplitRequest:
    sweep_id: str = "latest"
    epsilons: Sequence[float] = DEFAULT_EPSILONS
    epochs: Sequence[int] = DEFAULT_EPOCHS
    tracking_uri: str | None = None
    experiment: str | None = None
    force: bool = False
    report_only: bool = False
    out_dir: str | None = None


@dataclass
class SplitResult:
    sweep_id: str
    experiment_name: str
    table: object | None  # pandas DataFrame, None when nothing is stored
    readings: list[str]
    folder: Path | None
    run_id: str | None = None
    recorded: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def check_request(request: SplitRequest) -> None:
    """Bad values as InputError naming the option and the allowed values (the CLI checks them at parse
    time too; this guards callers from Python). The maxima hold unless the size limits are lifted."""
    from pipeline.config_tools import size_limits_active

    epsilon_max = MAX_EPSILON if size_limits_active() else math.inf
    epochs_max = MAX_EPOCHS if size_limits_active() else math.inf
    if not request.epsilons or any(
        isinstance(e, bool)
        or not isinstance(e, (int, float))
        or not math.isfinite(e)
        or not 0 <= e <= epsilon_max
        for e in request.epsilons
    ):
        raise InputError(
            f"--epsilon takes finite noise scales from 0 to {epsilon_max:g}; got {list(request.epsilons)}"
        )
    if not request.epochs or any(
        isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= epochs_max for e in request.epochs
    ):
        raise InputError(
            f"--epochs takes whole numbers of fine-tuning epochs from 1 to {epochs_max:g}; got {list(request.epochs)}"
        )


def _write(folder: Path, table, readings: Sequence[str], figures) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "splitting.csv", index=False)
    per_configuration = table.attrs.get("per_configuration")
    if per_configuration is not None:
        per_configuration.to_csv(folder / "per_configuration.csv", index=False)
    (folder / "splitting.md").write_text("\n\n".join(readings) + "\n")
    for name, figure in figures.items():
        figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")


@reports_store_faults
def run_split(request: SplitRequest, on_status: Callable[[str], None] = lambda text: None) -> SplitResult:
    """Compute what the store lacks (unless report_only), then the comparison from the stored runs."""
    started = time.perf_counter()
    check_request(request)
    # Read-only first: a missing store, experiment or sweep is an input error, and nothing is written.
    store = open_store(request.tracking_uri, writing=False)
    experiment_id, experiment_name, adopted = experiment_and_adopted_run(
        store, request.experiment, create=False
    )
    from tracking.analysis import latest_sweep_id

    sweep_id = latest_sweep_id(store, experiment_id) if request.sweep_id == "latest" else request.sweep_id
    folder = Path(request.out_dir or f"reports/split-{time.strftime('%Y%m%d-%H%M%S')}")
    if request.report_only:
        from tracking.taming_splitting import splitting_section

        section = splitting_section(store, experiment_id, sweep_id)
        if section is None:
            raise InputError(
                f"--sweep-id {sweep_id}: no split runs of this sweep in experiment '{experiment_name}'; run "
                f"`python cli.py split --sweep-id {sweep_id}` first"
            )
        table, readings, figures = section
        _write(folder, table, readings, figures)
        return SplitResult(
            sweep_id, experiment_name, table, readings, folder, wall_s=time.perf_counter() - started
        )
    return _compute_and_record(
        request, store, experiment_id, experiment_name, adopted, sweep_id, folder, started, on_status
    )


def _compute_and_record(
    request, store, experiment_id, experiment_name, adopted, sweep_id, folder, started, on_status
):
    from pipeline.experiments.taming_splitting import (
        BASELINE,
        Arm,
        SourceNetwork,
        SplitSettings,
        check_fine_tunable,
        run_split_study,
    )
    from tracking.decompose import read_source_sweep
    from tracking.recorder import failing, recover_experiment
    from tracking.store import open_store as open_tracking_store
    from tracking.taming_splitting import (
        finish_invocation,
        finished_identities,
        identity_key,
        log_records,
        retire_older,
        splitting_section,
        start_invocation,
    )

    settings = SplitSettings()
    source = read_source_sweep(store, experiment_id, sweep_id)
    sources, networks, skipped = [], {}, [f"{label} (no loadable checkpoint)" for label in source.skipped]
    for config in source.configs:
        config_hash = config.hash()
        label = source.labels[config_hash]
        try:
            check_fine_tunable(config)
        except ValueError as error:
            skipped.append(f"{label} ({error})")
            continue
        for seed in source.seeds:
            network = source.network(config_hash, seed)
            if isinstance(network, str):
                skipped.append(f"{label} seed {seed} ({network})")
                continue
            run_id = source.seed_runs[(config_hash, seed)]
            sources.append(SourceNetwork(run_id, config, seed, network))
            networks[run_id] = {
                "config": label,
                "config_hash": config_hash,
                "seed": str(seed),
                "source_run_id": source.ablation_runs.get(config_hash, ""),
                "source_sweep_id": sweep_id,
            }
    if not sources:
        raise InputError(
            f"--sweep-id {sweep_id}: no network of this sweep can be split ({'; '.join(skipped)})"
        )
    arms = [BASELINE, *(Arm(float(epsilon)) for epsilon in dict.fromkeys(request.epsilons))]
    epochs_list = sorted(dict.fromkeys(int(e) for e in request.epochs))

    store = open_tracking_store(request.tracking_uri, writing=True)
    recover_experiment(store, experiment_id, f"superseded by a re-run (split of sweep {sweep_id})")
    done = {} if request.force else finished_identities(store, experiment_id, sweep_id, settings)
    missing = {
        (arm, epochs): [s for s in sources if identity_key(s.key, arm, epochs) not in done]
        for arm in arms
        for epochs in epochs_list
    }
    wanted = {arm: [epochs for epochs in epochs_list if missing[(arm, epochs)]] for arm in arms}
    wanted = {arm: epochs for arm, epochs in wanted.items() if epochs}
    reused = sum(len(sources) - len(missing[key]) for key in missing)
    params = {
        "source_sweep_id": sweep_id,
        "epsilon": ",".join(repr(float(e)) for e in dict.fromkeys(request.epsilons)),
        "epochs": ",".join(str(e) for e in epochs_list),
        "networks": len(sources),
        "relative_threshold": settings.relative_threshold,
        "min_attribution": settings.min_attribution,
        "force": request.force,
    }
    run_id = start_invocation(
        store, experiment_id, sweep_id, params, adopted.info.run_id if adopted is not None else None
    )
    recorded: list[str] = []
    with failing(store, run_id):
        if wanted:
            models = len(sources) * len(wanted)
            on_status(
                f"Fine-tuning {len(sources)} networks × {len(wanted)} arm(s) for up to {max(max(v) for v in wanted.values())} "
                f"epochs ({reused} network run(s) reused)"
            )
            bar = _progress_bar(
                models * max(max(v) for v in wanted.values()), "split + fine-tune", "network-epoch"
            )
            needed = {key: {s.key for s in value} for key, value in missing.items()}

            def on_records(arm, epochs, records) -> None:
                keep = [record for record in records if record.key in needed[(arm, epochs)]]
                recorded.extend(log_records(store, experiment_id, run_id, keep, networks, settings))

            try:
                run_split_study(sources, wanted, on_records, settings, progress=bar.update)
            finally:
                bar.close()
            if request.force:
                retire_older(store, experiment_id, sweep_id, settings, set(recorded))
        section = splitting_section(store, experiment_id, sweep_id)
        table, readings, figures = section if section is not None else (None, [], {})
        if skipped:
            readings = [*readings, "Not split: " + "; ".join(skipped) + "."]
        finish_invocation(
            store,
            run_id,
            table,
            readings,
            figures,
            {"networks_split": float(len(recorded)), "networks_reused": float(reused)},
        )
    if table is not None:
        _write(folder, table, readings, figures)
    return SplitResult(
        sweep_id,
        experiment_name,
        table,
        readings,
        folder if table is not None else None,
        run_id,
        len(recorded),
        reused,
        skipped,
        time.perf_counter() - started,
    )
