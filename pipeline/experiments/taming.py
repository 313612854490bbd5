"""The taming ablation study from Python: configurations × seeds → trained, evaluated seeds.

    from pipeline.config import AblationConfig
    from pipeline.experiments.taming import run_ablation
    result = run_ablation(AblationConfig().with_factors("orthogonal", "bipolar", "l2", "gelu"), seeds=range(10))
    result.metrics_table()          # pandas DataFrame, one row per seed
    result.seeds[0].network(x)      # an ordinary nn.Module; result.seeds[0].sae likewise

Configurations that share shapes train together in one batched pass (`share_passes=True`), every seed
a slice of the batch; `bench/engine.py` measures when that pays.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from pipeline.config import AblationConfig
from pipeline.data import make_dataset
from pipeline.evaluation import METRIC_NAMES, evaluate_seed
from pipeline.train import Progress, SeedResult, pass_key, total_epochs, train_pass


@dataclass
class AblationResult:
    """All seeds of one configuration."""

    config: AblationConfig
    seeds: list[SeedResult] = field(default_factory=list)

    @property
    def finished(self) -> list[SeedResult]:
        return [seed for seed in self.seeds if seed.finished]

    @property
    def failed(self) -> list[SeedResult]:
        return [seed for seed in self.seeds if not seed.finished]

    def overlap_figure(self):
        """Grid of every finished seed's |cos| overlap heatmap (a matplotlib Figure)."""
        from pipeline.plots.taming import overlap_grid

        finished = self.finished
        return overlap_grid(
            [seed.sae.decoder_directions.detach() for seed in finished],
            [f"seed {seed.seed}" for seed in finished],
            suptitle=self.config.name,
        )

    def metrics_table(self) -> pd.DataFrame:
        """One row per seed: seed, status, failure reason, every metric (NaN for failed seeds)."""
        rows = []
        for seed in self.seeds:
            row = {
                "seed": seed.seed,
                "status": "finished" if seed.finished else "failed",
                "failure": seed.failure,
            }
            row.update({name: seed.metrics.get(name, float("nan")) for name in METRIC_NAMES})
            rows.append(row)
        return pd.DataFrame(rows)


def evaluate(result: SeedResult) -> SeedResult:
    """Fill `result.metrics` for a finished seed (no-op for a failed one)."""
    if result.finished:
        dataset = make_dataset(result.config.data, result.seed)
        result.metrics = evaluate_seed(result.config, result.network, result.sae, dataset)
    return result


def plan_passes(
    configs: Sequence[AblationConfig], seeds: Sequence[int], share_passes: bool = True
) -> list[list[tuple[int, int]]]:
    """Group (config index, seed) pairs into batched passes: by pass_key when sharing, else per config."""
    groups: dict[object, list[tuple[int, int]]] = defaultdict(list)
    for config_index, config in enumerate(configs):
        key = pass_key(config) if share_passes else config_index
        groups[key].extend((config_index, seed) for seed in seeds)
    return list(groups.values())


def total_work(configs: Sequence[AblationConfig], seeds: Sequence[int], share_passes: bool = True) -> int:
    """Progress units for `run_ablations` (epochs of all passes, network + SAE)."""
    return sum(total_epochs(configs[members[0][0]]) for members in plan_passes(configs, seeds, share_passes))


def run_ablations(
    configs: Sequence[AblationConfig],
    seeds: Iterable[int],
    *,
    share_passes: bool = True,
    progress: Progress | None = None,
    device: str = "cpu",
) -> list[AblationResult]:
    """Train and evaluate every configuration for every seed; one AblationResult per config, in order."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    results = [AblationResult(config) for config in configs]
    for members in plan_passes(configs, seeds, share_passes):
        trained = train_pass(
            [configs[index] for index, _ in members], [seed for _, seed in members], progress, device
        )
        for (config_index, _), seed_result in zip(members, trained, strict=True):
            results[config_index].seeds.append(evaluate(seed_result))
    for result in results:
        result.seeds.sort(key=lambda seed_result: seed_result.seed)
    return results


def run_ablation(
    config: AblationConfig, seeds: Iterable[int] = range(10), progress: Progress | None = None
) -> AblationResult:
    """One configuration, all seeds in one batched pass."""
    return run_ablations([config], seeds, progress=progress)[0]
