"""Benchmark: the fused CPU engine against the torch engine, beside the machine's measured peak.

    python bench/engine.py                      # strategic 8 configs × 10 seeds, published sizes
    python bench/engine.py --preset factorial   # all 16 configs
    python bench/engine.py --quick              # 200 + 100 epochs, for a smoke run
    python bench/engine.py --repeats 5          # more interleaved rounds (medians are reported)
    python bench/engine.py --profile            # plus cProfile's top functions of one fused run
    python bench/engine.py --serial-sample 8    # plus 8 seeds one at a time, extrapolated to all
    python bench/engine.py --execution threads  # each engine in this process on all cores' threads

Both engines train the same passes in this one run, interleaved (fused, torch, then torch, fused, …),
so a machine shared with other work slows both alike and the ratio compares like with like. By default
(`--execution pool`) each engine trains as `cli.py sweep` trains it: on its own pool of worker processes
with one thread each (one worker per core), the passes cut into the same seed chunks; both pools are
started (and warmed up) before any timing. `--execution threads` trains every pass in this process
instead, each engine on all of torch's threads (numba's parallel loop over models for the fused one). Each
round also times a large `torch.mm` (4096², best of 3): the machine's fp32 peak as this process sees it
at that moment, against which the engines' GFLOP/s are read. Training (`train_pass` on every pass) and
evaluation (every metric) are timed apart; the GFLOP are the training's matrix products (forward and
backward of every layer, network and SAE), counted from the config. No tracking store is involved. The
last line printed is one JSON object: per engine the median seconds and GFLOP/s, the speedup, the peak
and the fraction of it reached.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import fused  # noqa: E402
from pipeline.config import QUICK_EPOCHS, QUICK_SAE_EPOCHS, AblationConfig, preset_configs  # noqa: E402
from pipeline.experiments.pool import (  # noqa: E402
    PassPool,
    chunk_work,
    plan_passes,
    pool_chunks,
    usable_cores,
)
from pipeline.experiments.taming import evaluate, run_ablations  # noqa: E402
from pipeline.models import layer_dims  # noqa: E402
from pipeline.train import train_pass  # noqa: E402

ENGINES = ("fused", "torch")
PEAK_MATRIX_SIZE = 4096


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_flop(config: AblationConfig) -> float:
    """Matrix-product FLOP of training one model of `config` (multiply-adds count 2).

    Per sample and epoch a layer d_in → d_out costs 2·d_in·d_out forward, as much for its weight
    gradient and as much again for the gradient of its input (not needed for the first layer): 3,552 for
    the published network. The SAE's two products (encoder, decoder) likewise, without an input
    gradient for the encoder: 1,920 at 12 → 16.
    """
    dims = layer_dims(config.data.features, config.network.hidden_dim, config.network.hidden_layers)
    layers = [2 * d_in * d_out for d_in, d_out in pairwise(dims)]
    network = 3 * sum(layers) - layers[0]
    sae_product = 2 * config.network.hidden_dim * config.sae.d_sae
    sae = 5 * sae_product  # encoder and decoder forward; decoder, latent and encoder gradients
    samples = config.data.train_samples
    return samples * (config.network.epochs * network + config.sae.epochs * sae)


def measured_peak_gflops() -> float:
    """GFLOP/s of a large fp32 `torch.mm` on torch's threads, best of 3 (after one warm-up)."""
    left = torch.randn(PEAK_MATRIX_SIZE, PEAK_MATRIX_SIZE)
    right = torch.randn(PEAK_MATRIX_SIZE, PEAK_MATRIX_SIZE)
    torch.mm(left, right)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        torch.mm(left, right)
        best = min(best, time.perf_counter() - started)
    return 2 * PEAK_MATRIX_SIZE**3 / best / 1e9


def timed_run(configs, seeds, share_passes: bool) -> tuple[float, float]:
    """(training seconds, evaluation seconds) of every pass, as `run_ablations` runs them in one process."""
    training = evaluation = 0.0
    for members in plan_passes(configs, seeds, share_passes):
        started = time.perf_counter()
        trained = train_pass([configs[index] for index, _ in members], [seed for _, seed in members])
        training += time.perf_counter() - started
        started = time.perf_counter()
        for result in trained:
            evaluate(result)
        evaluation += time.perf_counter() - started
    return training, evaluation


def _timed_chunk(configs, seeds) -> tuple[float, float]:
    """In a pool worker: (training s, evaluation s) of one seed chunk."""
    started = time.perf_counter()
    trained = train_pass(configs, seeds)
    training = time.perf_counter() - started
    started = time.perf_counter()
    for result in trained:
        evaluate(result)
    return training, time.perf_counter() - started


def pooled_run(pool: PassPool, configs, seeds, share_passes: bool) -> tuple[float, float]:
    """(training s, evaluation s) of every pass trained on `pool` as the sweep command cuts them: the wall
    time of the whole run, split between training and evaluation in proportion to the workers' own
    timings of the two (they overlap across workers, so only their shares are known)."""
    started = time.perf_counter()
    futures = [
        pool.submit_task(_timed_chunk, *chunk_work(configs, chunk))
        for members in plan_passes(configs, seeds, share_passes)
        for chunk in pool_chunks(members, pool.workers)
    ]
    timings = [future.result() for future in futures]
    wall = time.perf_counter() - started
    training, evaluation = (sum(values) for values in zip(*timings, strict=True))
    return wall * training / (training + evaluation), wall * evaluation / (training + evaluation)


def start_pools(workers: int) -> dict[str, PassPool]:
    """One started pool per engine, its workers made (by `start`, which forks or spawns every one of them
    before it returns) while POLYLAB_ENGINE named that engine, which they keep."""
    pools = {engine: PassPool(workers) for engine in ENGINES}  # before any thread, so they may fork
    for engine, pool in pools.items():
        os.environ[fused.ENGINE_VARIABLE] = engine
        pool.start()
    return pools


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="strategic", show_default=True
)
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--quick", is_flag=True, help="200 network and 100 SAE epochs instead of 2000 and 1000.")
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved rounds."
)
@click.option(
    "--batching",
    type=click.Choice(["shared", "per-config"]),
    default="shared",
    show_default=True,
    help="All configs in one pass, or one pass per config.",
)
@click.option("--profile", is_flag=True, help="Print cProfile's top functions of one more fused run.")
@click.option(
    "--serial-sample",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also time this many seeds one at a time (default engine) and extrapolate to all.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads (default: torch's)."
)
@click.option(
    "--execution",
    type=click.Choice(["pool", "threads"]),
    default="pool",
    show_default=True,
    help="Each engine on a pool of one-thread worker processes as the sweep runs it, or in this process.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes per pool (default: one per usable core).",
)
def main(preset, seeds, quick, repeats, batching, profile, serial_sample, threads, execution, workers):
    if execution == "pool" and (profile or serial_sample or threads):
        raise click.UsageError("--profile, --serial-sample and --threads apply to --execution threads")
    if threads:
        torch.set_num_threads(threads)
    if fused.numba is None:
        raise click.UsageError("numba is not installed: there is no fused engine to compare")
    base = AblationConfig()
    if quick:
        base = base.with_epochs(QUICK_EPOCHS, QUICK_SAE_EPOCHS)
    configs = preset_configs(preset, base)
    seed_list = list(range(seeds))
    share_passes = batching == "shared"
    gflop = sum(training_flop(config) for config in configs) * seeds / 1e9
    workers = workers or usable_cores()
    figures: dict = {
        "configs": len(configs),
        "seeds": seeds,
        "execution": execution,
        "threads": torch.get_num_threads() if execution == "threads" else 1,
        "workers": workers if execution == "pool" else 1,
        "training_gflop": round(gflop, 1),
    }
    previous = os.environ.get(fused.ENGINE_VARIABLE)
    times: dict[str, dict[str, list[float]]] = {engine: {"train": [], "evaluate": []} for engine in ENGINES}
    peaks: list[float] = []
    pools = start_pools(workers) if execution == "pool" else {}
    try:
        # The first call of each engine in a process pays one-off costs (the fused engine loads its
        # compiled kernels from the cache, or compiles them when there is none): a small warm-up pass
        # (in pool mode, on every worker).
        for engine in ENGINES:
            os.environ[fused.ENGINE_VARIABLE] = engine
            started = time.perf_counter()
            if execution == "pool":
                pooled_run(pools[engine], configs[:1], seed_list[: 2 * workers], share_passes)
            else:
                train_pass(configs[:1], seed_list[:1])
            print(f"{engine}: first pass {time.perf_counter() - started:.2f} s", file=sys.stderr)
        for repeat in range(repeats):
            peaks.append(measured_peak_gflops())
            for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
                os.environ[fused.ENGINE_VARIABLE] = engine
                if execution == "pool":
                    training, evaluation = pooled_run(pools[engine], configs, seed_list, share_passes)
                else:
                    training, evaluation = timed_run(configs, seed_list, share_passes)
                times[engine]["train"].append(training)
                times[engine]["evaluate"].append(evaluation)
                print(
                    f"round {repeat + 1}: {engine} train {training:.2f} s ({gflop / training:.1f} GFLOP/s), "
                    f"evaluate {evaluation:.2f} s; peak {peaks[-1]:.1f} GFLOP/s",
                    file=sys.stderr,
                )
        if profile:
            os.environ[fused.ENGINE_VARIABLE] = "fused"
            profiler = cProfile.Profile()
            profiler.runcall(timed_run, configs, seed_list, share_passes)
            report = io.StringIO()
            pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(15)
            print(report.getvalue(), file=sys.stderr)
        if serial_sample:
            pairs = [(config, seed) for config in configs for seed in seed_list]
            sample = min(serial_sample, len(pairs))
            step = max(1, len(pairs) // sample)  # spread over configurations: every factor level appears
            os.environ.pop(fused.ENGINE_VARIABLE, None)
            started = time.perf_counter()
            for config, seed in pairs[::step][:sample]:
                run_ablations([config], [seed])
            figures["serial_s"] = round((time.perf_counter() - started) * len(pairs) / sample, 2)
            figures["serial_extrapolated"] = sample < len(pairs)
    finally:
        for pool in pools.values():
            pool.close()
        if previous is None:
            os.environ.pop(fused.ENGINE_VARIABLE, None)
        else:
            os.environ[fused.ENGINE_VARIABLE] = previous
    peak = statistics.median(peaks)
    figures["peak_gflops"] = round(peak, 1)
    for engine in ENGINES:
        training = statistics.median(times[engine]["train"])
        total = statistics.median(
            [a + b for a, b in zip(times[engine]["train"], times[engine]["evaluate"], strict=True)]
        )
        figures[engine] = {
            "train_s": round(training, 2),
            "total_s": round(total, 2),
            "train_gflops": round(gflop / training, 1),
            "total_gflops": round(gflop / total, 1),
            "train_fraction_of_peak": round(gflop / training / peak, 3),
            "rounds_train_s": [round(value, 2) for value in times[engine]["train"]],
        }
    # Per round (the two engines ran side by side in it), then the median of those ratios.
    figures["speedup_train"] = round(
        statistics.median(
            [t / f for t, f in zip(times["torch"]["train"], times["fused"]["train"], strict=True)]
        ),
        2,
    )
    figures["speedup_total"] = round(
        statistics.median(
            [
                (tt + te) / (ft + fe)
                for tt, te, ft, fe in zip(
                    times["torch"]["train"],
                    times["torch"]["evaluate"],
                    times["fused"]["train"],
                    times["fused"]["evaluate"],
                    strict=True,
                )
            ]
        ),
        2,
    )
    figures["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(
        f"fused {figures['fused']['train_gflops']} GFLOP/s training "
        f"({100 * figures['fused']['train_fraction_of_peak']:.0f} % of the measured {peak:.0f} GFLOP/s peak), "
        f"torch {figures['torch']['train_gflops']} GFLOP/s; fused is {figures['speedup_train']}× faster "
        f"training, {figures['speedup_total']}× with evaluation",
        file=sys.stderr,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
