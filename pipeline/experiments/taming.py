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

import multiprocessing
import queue
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import pandas as pd
import torch

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


def seed_chunks(members: Sequence[tuple[int, int]], chunks: int) -> list[list[tuple[int, int]]]:
    """Split a pass's (config index, seed) members into at most `chunks` contiguous groups of seeds.

    A seed never straddles two chunks, so configurations sharing a seed still share its data and noise
    streams (common random numbers) inside their chunk.
    """
    seeds = list(dict.fromkeys(seed for _, seed in members))
    chunks = max(1, min(chunks, len(seeds)))
    size, extra = divmod(len(seeds), chunks)
    groups, start = [], 0
    for chunk in range(chunks):
        chosen = set(seeds[start : start + size + (chunk < extra)])
        start += size + (chunk < extra)
        groups.append([member for member in members if member[1] in chosen])
    return groups


def total_work(
    configs: Sequence[AblationConfig], seeds: Sequence[int], share_passes: bool = True, workers: int = 1
) -> int:
    """Progress units for `run_ablations` (epochs of all passes, network + SAE; each seed chunk of a pass
    counts its epochs when `workers` > 1)."""
    return sum(
        total_epochs(configs[members[0][0]]) * len(seed_chunks(members, workers))
        for members in plan_passes(configs, seeds, share_passes)
    )


# A worker process reports progress this many epochs at a time (one queue message per call otherwise).
PROGRESS_BATCH = 25
_worker_progress: multiprocessing.Queue | None = None


def _start_worker(progress: multiprocessing.Queue) -> None:
    global _worker_progress
    # One thread per process: N processes then use N cores without oversubscribing them.
    torch.set_num_threads(1)
    _worker_progress = progress


def _train_chunk(configs: Sequence[AblationConfig], seeds: Sequence[int], device: str) -> list[SeedResult]:
    """In a worker process: one batched pass over a seed chunk, evaluated (progress sent to the parent)."""
    pending = 0

    def progress(count: int) -> None:
        nonlocal pending
        pending += count
        if pending >= PROGRESS_BATCH:
            _worker_progress.put(pending)
            pending = 0

    trained = train_pass(configs, seeds, progress if _worker_progress is not None else None, device)
    if pending and _worker_progress is not None:
        _worker_progress.put(pending)
    return [evaluate(result) for result in trained]


class PassPool:
    """N worker processes (spawn, one torch thread each) that train seed chunks of batched passes.

    Start it once for a sweep (`with PassPool(2) as pool:`) and hand it to every `run_ablations` call:
    starting a process costs about as much as importing torch.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1; got {workers}")
        context = multiprocessing.get_context("spawn")
        self.workers = workers
        self.progress = context.Queue()
        self.executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(self.progress,)
        )

    def __enter__(self) -> PassPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.progress.close()

    def drain_progress(self, progress: Progress | None) -> None:
        while True:
            try:
                count = self.progress.get_nowait()
            except queue.Empty:
                return
            if progress is not None:
                progress(count)


def _run_in_pool(
    pool: PassPool,
    configs: Sequence[AblationConfig],
    passes: list[list[tuple[int, int]]],
    results: list[AblationResult],
    progress: Progress | None,
    device: str,
) -> None:
    futures: dict[Future, list[tuple[int, int]]] = {}
    for members in passes:
        for chunk in seed_chunks(members, pool.workers):
            future = pool.executor.submit(
                _train_chunk, [configs[index] for index, _ in chunk], [seed for _, seed in chunk], device
            )
            futures[future] = chunk
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            pool.drain_progress(progress)
            for future in done:
                for (config_index, _), seed_result in zip(futures[future], future.result(), strict=True):
                    results[config_index].seeds.append(seed_result)
        pool.drain_progress(progress)
    except BaseException:
        for future in pending:
            future.cancel()
        raise


def run_ablations(
    configs: Sequence[AblationConfig],
    seeds: Iterable[int],
    *,
    share_passes: bool = True,
    progress: Progress | None = None,
    device: str = "cpu",
    workers: int = 1,
    pool: PassPool | None = None,
) -> list[AblationResult]:
    """Train and evaluate every configuration for every seed; one AblationResult per config, in order.

    `workers` > 1 (or a `pool`) splits each pass by seed over that many processes; a seed's result is
    the same either way up to float rounding.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    results = [AblationResult(config) for config in configs]
    passes = plan_passes(configs, seeds, share_passes)
    if pool is not None or workers > 1:
        owned = pool is None
        pool = pool or PassPool(workers)
        try:
            _run_in_pool(pool, configs, passes, results, progress, device)
        finally:
            if owned:
                pool.close()
    else:
        for members in passes:
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
