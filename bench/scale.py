"""Benchmark: one sweep on one process, on one process per core, and on a 2-worker Dask LocalCluster.

    python bench/scale.py                       # factorial 16 configs × 10 seeds, published sizes
    python bench/scale.py --quick               # 200 + 100 epochs
    python bench/scale.py --part engine         # training only: 1 process × N threads vs N × 1 thread
    python bench/scale.py --part sweep          # `cli.py sweep` end to end against an MLflow server

engine: `run_ablations` with no store, timed in this process: 1 process with torch's default threads,
1 process with 1 thread, and one process per core (a PassPool, each process 1 thread, every pass split
by seed). The pool's start-up (spawning processes, importing torch) is timed separately and included.
sweep: `python cli.py sweep` as a subprocess, each mode into its own experiment of one `mlflow server`
started here on 127.0.0.1 (SQLite backend, --serve-artifacts, stopped at the end): --executor local
--workers 1, --executor local --workers <cores>, --executor dask --workers 2. Wall times include the
CLI's start-up, which is the same for every mode. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import QUICK_EPOCHS, QUICK_SAE_EPOCHS, AblationConfig, preset_configs  # noqa: E402
from pipeline.experiments.pool import PassPool  # noqa: E402
from pipeline.experiments.taming import run_ablations  # noqa: E402
from tests.servers import running_server  # noqa: E402 (the test suite's loopback server helper)


def _base(quick: bool) -> AblationConfig:
    base = AblationConfig()
    if quick:
        base = base.with_epochs(QUICK_EPOCHS, QUICK_SAE_EPOCHS)
    return base


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return round(time.perf_counter() - started, 2)


def time_engine(preset: str, seeds: int, quick: bool, workers: int) -> dict:
    configs, seed_list = preset_configs(preset, _base(quick)), list(range(seeds))
    default_threads = torch.get_num_threads()
    figures = {"default_threads": default_threads}
    run_ablations(configs[:1], [0])  # warm-up: first-call costs would otherwise land on the first mode
    figures[f"engine_1proc_{default_threads}threads_s"] = _timed(lambda: run_ablations(configs, seed_list))
    torch.set_num_threads(1)
    figures["engine_1proc_1thread_s"] = _timed(lambda: run_ablations(configs, seed_list))
    torch.set_num_threads(default_threads)
    started = time.perf_counter()
    with PassPool(workers) as pool:
        # Start every process before timing the work (their start-up is reported separately).
        list(pool.executor.map(abs, range(workers)))
        figures["pool_startup_s"] = round(time.perf_counter() - started, 2)
        figures[f"engine_{workers}proc_1thread_s"] = _timed(
            lambda: run_ablations(configs, seed_list, pool=pool)
        )
    figures[f"engine_{workers}proc_1thread_with_startup_s"] = round(
        figures[f"engine_{workers}proc_1thread_s"] + figures["pool_startup_s"], 2
    )
    threads_s = figures[f"engine_1proc_{default_threads}threads_s"]
    figures["engine_speedup_processes_vs_threads"] = round(
        threads_s / figures[f"engine_{workers}proc_1thread_s"], 2
    )
    figures["engine_speedup_processes_vs_threads_with_startup"] = round(
        threads_s / figures[f"engine_{workers}proc_1thread_with_startup_s"], 2
    )
    return figures


def time_sweeps(preset: str, seeds: int, quick: bool, workers: int, artifacts: bool) -> dict:
    sizes = ["--epochs", str(QUICK_EPOCHS), "--sae-epochs", str(QUICK_SAE_EPOCHS)] if quick else []
    modes = {
        "local_1proc": ["--executor", "local", "--workers", "1"],
        f"local_{workers}proc": ["--executor", "local", "--workers", str(workers)],
        "dask_2workers": ["--executor", "dask", "--workers", "2"],
    }
    figures: dict = {}
    with tempfile.TemporaryDirectory() as folder, running_server(Path(folder)) as server:
        uri = server.uri
        # Warm-up: the server's first requests (database set-up, imports) would land on the first mode.
        warm_up = ["--seeds", "1", "--epochs", "2", "--sae-epochs", "2", "--no-artifacts"]
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "cli.py"),
                "sweep",
                *warm_up,
                "--tracking-uri",
                uri,
                "--experiment",
                "warm-up",
            ],
            cwd=folder,
            capture_output=True,
            timeout=600,
            check=True,
        )
        for mode, options in modes.items():
            command = [
                sys.executable,
                str(ROOT / "cli.py"),
                "sweep",
                "--preset",
                preset,
                "--seeds",
                str(seeds),
                *sizes,
                *options,
                "--tracking-uri",
                uri,
                "--experiment",
                f"scale-{mode}",
                *([] if artifacts else ["--no-artifacts"]),
            ]
            started = time.perf_counter()
            result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=3600)
            if result.returncode != 0:
                raise RuntimeError(f"{mode} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
            figures[f"sweep_{mode}_s"] = round(time.perf_counter() - started, 2)
            print(f"sweep {mode}: {figures[f'sweep_{mode}_s']} s", file=sys.stderr)
    baseline = figures["sweep_local_1proc_s"]
    for mode in modes:
        if mode != "local_1proc":
            figures[f"sweep_speedup_{mode}"] = round(baseline / figures[f"sweep_{mode}_s"], 2)
    return figures


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="factorial", show_default=True
)
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--quick", is_flag=True, help="200 network and 100 SAE epochs instead of 2000 and 1000.")
@click.option("--part", type=click.Choice(["engine", "sweep", "both"]), default="both", show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default=True,
    help="Processes for the multi-process runs (default: one per core).",
)
@click.option("--no-artifacts", is_flag=True, help="Sweeps log metrics only (no PNGs, no checkpoints).")
def main(preset, seeds, quick, part, workers, no_artifacts):
    figures = {
        "preset": preset,
        "configs": len(preset_configs(preset)),
        "seeds": seeds,
        "quick": quick,
        "workers": workers,
        "cores": os.cpu_count(),
    }
    if part in ("engine", "both"):
        figures.update(time_engine(preset, seeds, quick, workers))
        for key, value in figures.items():
            if key.startswith("engine_"):
                print(f"{key}: {value}", file=sys.stderr)
    if part in ("sweep", "both"):
        figures.update(time_sweeps(preset, seeds, quick, workers, not no_artifacts))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
