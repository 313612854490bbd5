"""The taming ablation study from Python: configurations × seeds → trained, evaluated seeds.

    from pipeline.config import AblationConfig
    from pipeline.experiments.taming import run_ablation
    result = run_ablation(AblationConfig().with_factors("orthogonal", "bipolar", "l2", "gelu"), seeds=range(10))
    result.metrics_table()          # pandas DataFrame, one row per seed
    result.seeds[0].network(x)      # an ordinary nn.Module; result.seeds[0].sae likewise

Configurations that share shapes train together in one batched pass (`share_passes=True`), every seed
a slice of the batch; `bench/engine.py` measures when that pays. With `workers=N` (or a `PassPool`) each
pass is split by seed into N chunks trained in N processes of one torch thread each; `bench/scale.py`
measures when that pays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import AblationConfig
from pipeline.data import make_dataset
from pipeline.evaluation import METRIC_NAMES, evaluate_seed
from pipeline.experiments.pool import PassPool, plan_passes, run_in_pool
from pipeline.train import Progress, SeedResult, train_pass

if TYPE_CHECKING:
    import pandas as pd


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
        import pandas as pd  # here, not at the top: worker processes never need it

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


def run_ablations(
    configs: Sequence[AblationConfig],
    seeds: Iterable[int],
    *,
    share_passes: bool = True,
    progress: Progress | None = None,
    device: str = "cpu",
    workers: int = 1,
    pool: PassPool | None = None,
    on_seed: Callable[[int, SeedResult], None] | None = None,
) -> list[AblationResult]:
    """Train and evaluate every configuration for every seed; one AblationResult per config, in order.

    `workers` > 1 (or a `pool`) splits each pass by seed over that many processes; a seed's result is
    the same either way up to float rounding. `on_seed(config index, seed result)` is called in this
    process as soon as each seed is trained and evaluated, so a caller can record it while the rest train.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    results = [AblationResult(config) for config in configs]

    def deliver(config_index: int, seed_result: SeedResult) -> None:
        results[config_index].seeds.append(seed_result)
        if on_seed is not None:
            on_seed(config_index, seed_result)

    passes = plan_passes(configs, seeds, share_passes)
    if pool is not None or workers > 1:
        owned = pool is None
        pool = pool or PassPool(workers)
        try:
            run_in_pool(pool, configs, passes, deliver, progress, device)
        finally:
            if owned:
                pool.close()
    else:
        for members in passes:
            trained = train_pass(
                [configs[index] for index, _ in members], [seed for _, seed in members], progress, device
            )
            for (config_index, _), seed_result in zip(members, trained, strict=True):
                deliver(config_index, evaluate(seed_result))
    for result in results:
        result.seeds.sort(key=lambda seed_result: seed_result.seed)
    return results


def run_ablation(
    config: AblationConfig, seeds: Iterable[int] = range(10), progress: Progress | None = None
) -> AblationResult:
    """One configuration, all seeds in one batched pass."""
    return run_ablations([config], seeds, progress=progress)[0]
