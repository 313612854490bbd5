"""Benchmark: what recording costs. The same sweep run as a fresh process without a store and with one.

    python bench/tracking.py                 # strategic 8 × 10 seeds, published sizes
    python bench/tracking.py --repeats 3     # alternate the two sides three times, report each and medians
    python bench/tracking.py --quick         # 200 + 100 epochs

untracked: a fresh Python process that trains and evaluates the sweep exactly as `cli.py sweep` does
(the same worker processes, chosen by `auto_workers`), then exits; nothing is written.
tracked: `python cli.py sweep --preset P --seeds N` in an empty folder, so into a new SQLite store: the
whole command as a user runs it, imports, store creation, every run, metric, curve, PNG and checkpoint,
and the summary table included.
Both are timed from outside (wall clock of the process) and alternate, so machine noise falls on both
sides. The last line is a JSON object: the per-run times, their medians, logging_overhead_s (median
tracked − median untracked) and overhead_fraction (of the untracked time).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import QUICK_EPOCHS, QUICK_SAE_EPOCHS, AblationConfig, preset_configs  # noqa: E402


def _base(quick: bool) -> AblationConfig:
    base = AblationConfig()
    return base.with_epochs(QUICK_EPOCHS, QUICK_SAE_EPOCHS) if quick else base


def train_untracked(preset: str, seeds: int, quick: bool) -> None:
    """The child process of the untracked side: the sweep's training as the CLI sets it up, no store."""
    from pipeline.experiments.pool import PassPool, auto_workers
    from pipeline.experiments.taming import run_ablations

    configs, seed_list = preset_configs(preset, _base(quick)), list(range(seeds))
    workers = auto_workers(configs, seed_list)
    pool = PassPool(workers).start() if workers > 1 else None
    try:
        run_ablations(configs, seed_list, pool=pool)
    finally:
        if pool is not None:
            pool.close()
    print(json.dumps({"workers": workers}))


def _timed_process(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = round(time.perf_counter() - started, 2)
    if finished.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    return elapsed, finished.stdout


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="strategic", show_default=True
)
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--quick", is_flag=True, help="200 network and 100 SAE epochs.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--untracked-child", is_flag=True, hidden=True)
def main(preset, seeds, quick, repeats, untracked_child):
    if untracked_child:
        import atexit
        import gc

        atexit.register(gc.freeze)  # exit as fast as cli.py does
        train_untracked(preset, seeds, quick)
        return
    sweep_options = ["--preset", preset, "--seeds", str(seeds)]
    if quick:
        sweep_options += ["--epochs", str(QUICK_EPOCHS), "--sae-epochs", str(QUICK_SAE_EPOCHS)]
    untracked, tracked, workers = [], [], None
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, str(Path(__file__).resolve()), "--untracked-child"]
            command += ["--preset", preset, "--seeds", str(seeds)] + (["--quick"] if quick else [])
            elapsed, output = _timed_process(command, Path(folder))
            workers = json.loads(output.strip().splitlines()[-1])["workers"]
            untracked.append(elapsed)
        with tempfile.TemporaryDirectory() as folder:
            elapsed, _ = _timed_process(
                [sys.executable, str(ROOT / "cli.py"), "sweep", *sweep_options], Path(folder)
            )
            tracked.append(elapsed)
        print(f"repeat {repeat + 1}: untracked {untracked[-1]} s, tracked {tracked[-1]} s", file=sys.stderr)
    untracked_s, tracked_s = statistics.median(untracked), statistics.median(tracked)
    figures = {
        "preset": preset,
        "configs": len(preset_configs(preset)),
        "seeds": seeds,
        "quick": quick,
        "workers": workers,
        "untracked_s": untracked,
        "tracked_s": tracked,
        "untracked_median_s": untracked_s,
        "tracked_median_s": tracked_s,
        "logging_overhead_s": round(tracked_s - untracked_s, 2),
        "overhead_fraction": round((tracked_s - untracked_s) / untracked_s, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
