"""Benchmark: what recording costs. The same sweep trained without a store, then through the tracked path.

    python bench/tracking.py                 # strategic 8 × 10 seeds, published sizes
    python bench/tracking.py --quick         # 200 + 100 epochs

Both runs happen in this process, one after the other, into a temporary SQLite store. The tracked run
logs everything a normal sweep does (params, tags, per-seed metrics and curves, overlap PNGs, checkpoints,
seed tables, grids). The last line is a JSON object: train_only_s, tracked_s, logging_overhead_s,
overhead_fraction, runs_logged.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import QUICK_EPOCHS, QUICK_SAE_EPOCHS, AblationConfig, preset_configs  # noqa: E402
from pipeline.experiments.taming import run_ablations  # noqa: E402
from tracking.store import open_store  # noqa: E402
from tracking.taming import run_tracked_sweep  # noqa: E402


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="strategic", show_default=True
)
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--quick", is_flag=True, help="200 network and 100 SAE epochs.")
def main(preset, seeds, quick):
    base = AblationConfig()
    if quick:
        base = base.with_epochs(QUICK_EPOCHS, QUICK_SAE_EPOCHS)
    configs = preset_configs(preset, base)
    seed_list = list(range(seeds))

    started = time.perf_counter()
    run_ablations(configs, seed_list)
    train_only = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        store = open_store(f"sqlite:///{folder}/mlflow.db")
        experiment_id = store.experiment_id("bench")
        started = time.perf_counter()
        run_tracked_sweep(store, experiment_id, configs, seed_list, trainer=run_ablations, preset=preset)
        tracked = time.perf_counter() - started
        runs = len(store.client.search_runs([experiment_id], "", max_results=1000))
    figures = {
        "configs": len(configs),
        "seeds": seeds,
        "train_only_s": round(train_only, 2),
        "tracked_s": round(tracked, 2),
        "logging_overhead_s": round(tracked - train_only, 2),
        "overhead_fraction": round((tracked - train_only) / train_only, 3),
        "runs_logged": runs,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
