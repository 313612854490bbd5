"""Benchmark: the vectorized engine against a one-seed-at-a-time loop of the same code.

    python bench/engine.py                      # strategic 8 configs × 10 seeds, published sizes
    python bench/engine.py --preset factorial   # all 16 configs
    python bench/engine.py --quick              # 200 + 100 epochs, for a smoke run
    python bench/engine.py --serial-sample 8    # time 8 serial seeds and extrapolate to all

Both sides run in this one process, one after the other, so the ratio compares like with like. The last
line printed is one JSON object: configs, seeds, vectorized_s, serial_s, speedup, peak_rss_mb (plus
details). Training and evaluation (all metrics) are timed; no tracking store is involved.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import QUICK_EPOCHS, QUICK_SAE_EPOCHS, AblationConfig, preset_configs  # noqa: E402
from pipeline.experiments.taming import run_ablations  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="strategic", show_default=True
)
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--quick", is_flag=True, help="200 network and 100 SAE epochs instead of 2000 and 1000.")
@click.option(
    "--batching",
    type=click.Choice(["shared", "per-config", "both"]),
    default="both",
    show_default=True,
    help="Vectorized passes: all configs in one pass, one pass per config, or time both.",
)
@click.option(
    "--serial-sample",
    type=click.IntRange(min=0),
    default=None,
    help="Time only this many serial seeds and extrapolate (0 skips the serial loop).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads (default: torch's)."
)
def main(preset, seeds, quick, batching, serial_sample, threads):
    if threads:
        torch.set_num_threads(threads)
    base = AblationConfig()
    if quick:
        base = base.with_epochs(QUICK_EPOCHS, QUICK_SAE_EPOCHS)
    configs = preset_configs(preset, base)
    seed_list = list(range(seeds))
    figures = {"configs": len(configs), "seeds": seeds, "threads": torch.get_num_threads()}

    modes = ["shared", "per-config"] if batching == "both" else [batching]
    for mode in modes:
        started = time.perf_counter()
        run_ablations(configs, seed_list, share_passes=mode == "shared")
        figures[f"vectorized_{mode}_s"] = round(time.perf_counter() - started, 2)
        print(f"vectorized ({mode}): {figures[f'vectorized_{mode}_s']} s", file=sys.stderr)
    figures["vectorized_s"] = min(figures[f"vectorized_{mode}_s"] for mode in modes)

    pairs = [(config, seed) for config in configs for seed in seed_list]
    sample = len(pairs) if serial_sample is None else min(serial_sample, len(pairs))
    if sample:
        # Spread the sample over configurations so every factor level is represented.
        step = max(1, len(pairs) // sample)
        chosen = pairs[::step][:sample]
        started = time.perf_counter()
        for config, seed in chosen:
            run_ablations([config], [seed])
        elapsed = time.perf_counter() - started
        figures["serial_measured_seeds"] = sample
        figures["serial_s"] = round(elapsed * len(pairs) / sample, 2)
        figures["serial_extrapolated"] = sample < len(pairs)
        figures["speedup"] = round(figures["serial_s"] / figures["vectorized_s"], 2)
        print(f"serial: {figures['serial_s']} s ({sample} of {len(pairs)} seeds timed)", file=sys.stderr)
    else:
        figures["serial_s"] = None
        figures["speedup"] = None
    figures["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
