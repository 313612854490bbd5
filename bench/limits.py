"""Benchmark: the sweep-size limits (pipeline/config.py `model_footprint`) against measured memory and time.

    python bench/limits.py            # three shapes, each trained in a fresh process
    python bench/limits.py --quick    # smaller shapes, for a smoke run

`check_sweep_size` refuses a sweep whose estimated memory exceeds SWEEP_MEMORY_LIMIT_BYTES or whose
estimated multiply-adds exceed SWEEP_WORK_LIMIT. This measures, per shape, the peak resident memory of a
fresh process that trains and evaluates it (ru_maxrss, imports included) and the wall time (warm compile
cache: run it twice after a change to pipeline/fused.py), and prints them beside the estimates
(`sweep_footprint`): the memory ratio says whether the estimate is an upper bound, and the
measured multiply-adds per second turn the work limit into hours on this machine. The last line printed
is one JSON object with every row.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (label, hidden_dim, samples, seeds, network epochs, SAE epochs): wide, many samples, many seeds.
SHAPES = [
    ("wide", 256, 2048, 2, 60, 30),
    ("many samples", 16, 65536, 2, 20, 10),
    ("many seeds", 8, 820, 400, 200, 100),
]
QUICK_SHAPES = [
    ("wide", 128, 1024, 2, 20, 10),
    ("many samples", 16, 16384, 2, 10, 5),
    ("many seeds", 8, 820, 100, 50, 20),
]


def _measure(hidden: int, samples: int, seeds: int, epochs: int, sae_epochs: int) -> dict:
    """Train in this process (called in a child); the estimate and the measured figures."""
    from pipeline.config import AblationConfig, sweep_footprint
    from pipeline.experiments.taming import run_ablations

    config = AblationConfig()
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, samples=samples),
        network=dataclasses.replace(config.network, hidden_dim=hidden, epochs=epochs),
        sae=dataclasses.replace(config.sae, epochs=sae_epochs, d_sae=max(config.sae.d_sae, 2 * hidden)),
    )
    estimated_bytes, estimated_work = sweep_footprint([config], seeds)
    import torch  # noqa: F401 - counted as the process, as the estimate does

    imports_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    run_ablations([config], range(seeds))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "estimated_bytes": estimated_bytes,
        # The whole process's peak, imports included: what the machine must hold.
        "measured_bytes": after,
        "imports_bytes": imports_bytes,
        "estimated_multiply_adds": estimated_work,
        "seconds": seconds,
    }


@click.command()
@click.option("--quick", is_flag=True, help="Smaller shapes (about a minute).")
@click.option("--child", hidden=True, default=None)
def main(quick: bool, child: str | None) -> None:
    if child is not None:
        print(json.dumps(_measure(*json.loads(child))))
        return
    rows = []
    for label, *shape in QUICK_SHAPES if quick else SHAPES:
        # A fresh process per shape: ru_maxrss only grows, so one process would hide the smaller peaks.
        output = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(shape)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = {"shape": label, **json.loads(output.strip().splitlines()[-1])}
        row["memory_estimate_over_measured"] = row["estimated_bytes"] / max(row["measured_bytes"], 1)
        row["multiply_adds_per_s"] = row["estimated_multiply_adds"] / row["seconds"]
        rows.append(row)
        print(
            f"{label:>13}: memory estimated {row['estimated_bytes'] / 2**20:8.1f} MiB, measured "
            f"{row['measured_bytes'] / 2**20:8.1f} MiB (ratio {row['memory_estimate_over_measured']:.2f}); "
            f"{row['estimated_multiply_adds']:.2g} multiply-adds in {row['seconds']:.1f} s "
            f"= {row['multiply_adds_per_s']:.2g}/s"
        )
    from pipeline.config import SWEEP_WORK_LIMIT

    slowest = min(row["multiply_adds_per_s"] for row in rows)
    print(
        f"the work limit {SWEEP_WORK_LIMIT:g} is {SWEEP_WORK_LIMIT / slowest / 3600:.1f} h at the slowest rate"
    )
    print(json.dumps({"rows": rows, "work_limit_hours_at_slowest": SWEEP_WORK_LIMIT / slowest / 3600}))


if __name__ == "__main__":
    main()
