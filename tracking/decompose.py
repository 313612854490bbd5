"""The store side of a decomposition: the stored networks of a finished sweep, and the links to them.

A decomposition sweep (`orchestration.decompose`) trains new SAEs on the networks a taming sweep stored
in its seed runs' checkpoints. Its runs are ordinary ablation and seed runs (same identity as a full
sweep with those SAE settings, so either reuses the other), with tags that say where each network came
from:

    sweep run      source_sweep_id      the sweep whose networks were decomposed
    ablation run   source_run_id        the ablation run that trained the networks
    seed run       network_run_id       the seed run whose checkpoint held this seed's network
                   network_code_version the code version that trained it (it may predate this run's own)
    all three      trained              "sae only": no network was trained by this run
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import AblationConfig
from pipeline.models import MLP
from tracking.analysis import latest_sweep_id, select_seeds
from tracking.recorder import search_all
from tracking.store import Store, TrackingError
from tracking.taming import seeds_from_label

TRAINED_TAG = "trained"
SAE_ONLY = "sae only"


@dataclass
class SourceSweep:
    """A finished sweep's configurations and where each seed's network is.

    `configs` are the sweep's configurations in its order (read from their checkpoints), `labels` their
    run names by config hash; `seed_runs[(config hash, seed)]` the FINISHED seed run holding the network;
    `missing[(config hash, seed)]` why a seed of the sweep has none (it failed, or was never recorded).
    """

    sweep_id: str
    design: str
    axes: tuple[str, ...]
    seeds: list[int]
    configs: list[AblationConfig] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    ablation_runs: dict[str, str] = field(default_factory=dict)
    seed_runs: dict[tuple[str, int], str] = field(default_factory=dict)
    code_versions: dict[tuple[str, int], str] = field(default_factory=dict)
    missing: dict[tuple[str, int], str] = field(default_factory=dict)
    networks: dict[tuple[str, int], MLP] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def network(self, network_hash: str, seed: int) -> MLP | str:
        """The stored network of (source config hash, seed), or why there is none."""
        key = (network_hash, seed)
        if key in self.networks:
            return self.networks[key]
        return self.missing.get(
            key, f"the source sweep {self.sweep_id} has no seed {seed} of this configuration"
        )


def read_source_sweep(store: Store, experiment_id: str, sweep_id: str) -> SourceSweep:
    """Every configuration of sweep `sweep_id` (or 'latest') with its stored networks, loaded from the
    checkpoints of its FINISHED seed runs (each verified against its run: `tracking.query`).

    Raises TrackingError (one sentence) when the sweep does not exist, or when none of its seed runs holds
    a checkpoint (recorded with --no-artifacts).
    """
    from pipeline.evaluation import CheckpointError, load_checkpoint
    from tracking.query import load_seed_checkpoint

    if sweep_id == "latest":
        sweep_id = latest_sweep_id(store, experiment_id)
    sweep_runs = search_all(
        store,
        [experiment_id],
        f"tags.kind = 'sweep' and tags.study = 'taming' and tags.sweep_id = '{sweep_id}'",
    )
    if not sweep_runs:
        raise TrackingError(f"--sweep-id {sweep_id!r} matches no sweep run in this experiment")
    sweep_run = sweep_runs[0]
    params = sweep_run.data.params
    axes = tuple(axis for axis in params.get("design.axes", "none").split(",") if axis and axis != "none")
    frame, _ = select_seeds(store, experiment_id, sweep_id=sweep_id)
    seeds = (
        seeds_from_label(params["seed_list"])
        if "seed_list" in params
        else sorted(set(frame["seed"].tolist()))
    )
    source = SourceSweep(sweep_id, sweep_run.data.tags.get("design", "custom"), axes, seeds)
    for config_hash, rows in frame.groupby("config_hash", sort=False):
        label = str(rows["config"].iloc[0])
        config = None
        for row in rows.itertuples():
            key = (config_hash, int(row.seed))
            if row.status != "FINISHED":
                reason = getattr(row, "failure_reason", None)
                source.missing[key] = f"seed run {row.run_id} of the source sweep is {row.status}" + (
                    f" ({reason})" if isinstance(reason, str) and reason else ""
                )
                continue
            try:
                saved_config, _, network, _ = load_checkpoint(load_seed_checkpoint(store, row.run_id))
            except CheckpointError as error:
                source.missing[key] = str(error)
                continue
            config = config or saved_config
            source.networks[key] = network
            source.seed_runs[key] = row.run_id
            source.code_versions[key] = str(row.code_version)
            source.ablation_runs[config_hash] = row.parent_run_id
        if config is None:
            source.skipped.append(label)
            continue
        source.configs.append(config)
        source.labels[config_hash] = label
    if not source.configs:
        raise TrackingError(
            f"sweep {sweep_id} has no seed run with a loadable checkpoint to decompose (runs recorded with "
            "--no-artifacts cannot be decomposed)"
        )
    return source
