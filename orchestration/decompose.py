"""`decompose`: new SAEs on the networks of a stored sweep, recorded as a sweep of their own.

Reads the source sweep's networks from its checkpoints (`tracking.decompose`), crosses each of its
configurations with the requested SAE settings (--grid/--set over `sae.*` fields only), and records the
result with the taming recorder (`tracking.taming.run_tracked_sweep`): the same run tree, metrics,
artifacts, resume and reuse as `sweep`, with SAE training only (`pipeline.experiments.decompose`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestration.taming import (
    InputError,
    SweepResult,
    _progress_bar,
    experiment_and_adopted_run,
    open_store,
    reports_store_faults,
)

SAE_PREFIX = "sae."


@dataclass(frozen=True)
class DecomposeRequest:
    """Which stored sweep to decompose and with which SAE settings (dotted `sae.*` paths, values coerced)."""

    sweep_id: str = "latest"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, tuple] = field(default_factory=dict)
    tracking_uri: str | None = None
    experiment: str | None = None
    device: str = "cpu"
    force: bool = False
    artifacts: bool = True
    workers: int | None = None  # worker processes on CPU; None: one per core


def check_sae_paths(paths) -> None:
    """Only SAE settings can change without retraining the networks."""
    others = [path for path in paths if not path.startswith(SAE_PREFIX)]
    if others:
        raise InputError(
            f"decompose changes only sae.* settings (the networks are the stored ones); got {', '.join(others)}: "
            "use `sweep` to train networks with other settings"
        )


def decomposition_design(request: DecomposeRequest):
    """The SAE settings as a design (fixed + grid), checked on the default configuration so that a bad
    value is refused before the store is opened."""
    from pipeline.config import AblationConfig
    from pipeline.config_tools import ConfigError
    from pipeline.design import Design, DesignError

    check_sae_paths([*request.fixed, *request.grid])
    if not request.fixed and not request.grid:
        raise InputError(
            "decompose needs SAE settings to change: give --set sae.FIELD=VALUE or --grid sae.FIELD=V1,V2"
        )
    design = Design(name="decompose").with_overrides(dict(request.fixed), dict(request.grid))
    try:
        design.configs(AblationConfig())
    except (DesignError, ConfigError) as error:
        raise InputError(str(error)) from None
    return design


@reports_store_faults
def run_decomposition(request: DecomposeRequest) -> SweepResult:
    """Train (or reuse) one SAE per seed of every configuration of the source sweep × SAE setting; the
    networks come from the source's checkpoints, none is trained. Returns the new sweep's result."""
    design = decomposition_design(request)
    if request.device != "cpu":
        from pipeline.train import resolve_device

        try:
            resolve_device(request.device)
        except ValueError as error:
            raise InputError(f"--device: {error}") from None
    pool = None
    if request.device == "cpu":
        from pipeline.experiments.pool import PassPool, usable_cores

        workers = request.workers or usable_cores()
        if workers > 1:
            # Started first, so the workers import torch while the store is read. Evaluation costs as much
            # as SAE training here, and one process would do all of it (bench/decompose.py).
            pool = PassPool(workers).start()
    try:
        return _decompose_into_store(request, design, pool)
    finally:
        if pool is not None:
            pool.close()


def _decompose_into_store(request: DecomposeRequest, design, pool) -> SweepResult:
    from pipeline.config_tools import ConfigError
    from pipeline.design import DesignError, configuration_labels, label_paths
    from pipeline.experiments.decompose import decompose_ablations
    from tracking.decompose import SAE_ONLY, TRAINED_TAG, read_source_sweep
    from tracking.taming import SweepNaming, run_tracked_sweep

    store = open_store(request.tracking_uri)
    experiment_id, experiment_name, adopted = experiment_and_adopted_run(
        store, request.experiment, create=False
    )
    source = read_source_sweep(store, experiment_id, request.sweep_id)

    targets, network_of = [], {}
    for config in source.configs:
        try:
            decomposed = design.configs(config)
        except (DesignError, ConfigError) as error:
            raise InputError(f"{source.labels[config.hash()]}: {error}") from None
        for target in decomposed:
            if target.hash() not in network_of:
                targets.append(target)
                network_of[target.hash()] = config.hash()
    paths = label_paths(targets)
    naming = SweepNaming(
        design=f"{source.design} decomposed",
        labels=dict(zip((t.hash() for t in targets), configuration_labels(targets, paths), strict=True)),
        axes=tuple(paths),
        sweep_tags={TRAINED_TAG: SAE_ONLY, "source_sweep_id": source.sweep_id},
        ablation_tags={
            target.hash(): {
                TRAINED_TAG: SAE_ONLY,
                "source_sweep_id": source.sweep_id,
                "source_run_id": source.ablation_runs[network_of[target.hash()]],
            }
            for target in targets
        },
        seed_tags={
            (target.hash(), seed): {
                TRAINED_TAG: SAE_ONLY,
                "network_run_id": run_id,
                "network_code_version": source.code_versions[(network_hash, seed)],
            }
            for target in targets
            for (network_hash, seed), run_id in source.seed_runs.items()
            if network_hash == network_of[target.hash()]
        },
    )

    def networks(config, seed):
        return source.network(network_of[config.hash()], seed)

    bar = None

    def plan(pending) -> None:
        nonlocal bar
        if pending:
            bar = _progress_bar(
                sum(config.sae.epochs for config in pending) * len(source.seeds),
                f"SAEs: {len(pending)} config(s) × {len(source.seeds)} seeds",
                "SAE-epoch",
            )

    def trainer(group, seed_list, share_passes, progress, on_seed):
        return decompose_ablations(
            group,
            seed_list,
            networks=networks,
            progress=progress,
            device=request.device,
            on_seed=on_seed,
            pool=pool,
        )

    reused: list[str] = []
    described = {
        "name": naming.design,
        "study": "taming",
        "description": f"SAEs trained again on the networks of sweep {source.sweep_id}",
        "decomposes": source.sweep_id,
        "fixed": dict(design.fixed),
        "grid": {path: list(values) for path, values in design.grid.items()},
    }
    try:
        sweep_id, outcomes = run_tracked_sweep(
            store,
            experiment_id,
            targets,
            source.seeds,
            trainer=trainer,
            naming=naming,
            design=described,
            force=request.force,
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
            adopt_as="sweep",
            share_passes=True,
            artifacts=request.artifacts,
            progress=lambda count: bar.update(count) if bar is not None else None,
            on_reuse=lambda config, run_id: reused.append(f"{naming.label(config)} (run {run_id})"),
            on_plan=plan,
        )
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(sweep_id, experiment_id, experiment_name, store.uri, outcomes, reused)
