"""Benchmark: the tracked sweep as a user runs it, into a new SQLite store, timed from outside.

    python bench/sweep_time.py                                   # strategic × 10 seeds, 5 runs
    python bench/sweep_time.py --preset factorial --runs 5
    python bench/sweep_time.py --compare POLYLAB_START_METHOD=fork,spawn --runs 4

Each run is `python cli.py sweep --preset P --seeds N` in a fresh empty folder (so a new SQLite store: its
creation, every run, metric, curve, PNG and checkpoint, and the summary table are all inside the time).
Reported per run: wall seconds and the CPU seconds (user + system) of the command and every process it
started. On a 2-core machine the CPU seconds say how much work there is; the wall time also depends on
how well the processes overlap, and on the machine: a shared host's speed varies by tens of percent over
minutes, which is why `--compare` alternates its variants run by run (A, B, B, A, …) instead of timing
one after the other. The numba cache is warm after the first run of the session; the first run of a
fresh clone compiles (stated separately in the issue notes, not measured here). The last line printed is
one JSON object with every run and the medians per variant.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_sweep(preset: str, seeds: int, environment: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one sweep command into a new store."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(ROOT / "cli.py"), "sweep", "--preset", preset, "--seeds", str(seeds)]
        cpu_before = _children_cpu_s()
        started = time.perf_counter()
        finished = subprocess.run(
            command,
            cwd=folder,
            capture_output=True,
            text=True,
            env={**os.environ, **environment},
            check=False,
        )
        wall = time.perf_counter() - started
        cpu = _children_cpu_s() - cpu_before
    if finished.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    return round(wall, 2), round(cpu, 2)


def _variants(compare: str | None) -> list[tuple[str, dict[str, str]]]:
    if compare is None:
        return [("as configured", {})]
    name, _, values = compare.partition("=")
    if not name or not values:
        raise click.BadParameter("give NAME=VALUE1,VALUE2,…", param_hint="--compare")
    return [(f"{name}={value}", {name: value}) for value in values.split(",")]


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="strategic", show_default=True
)
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Runs per variant.")
@click.option(
    "--compare",
    default=None,
    metavar="NAME=V1,V2",
    help="An environment variable to alternate between values, run by run.",
)
@click.option("--warm-up/--no-warm-up", default=True, show_default=True, help="One untimed run first.")
def main(preset: str, seeds: int, runs: int, compare: str | None, warm_up: bool) -> None:
    variants = _variants(compare)
    if warm_up:
        timed_sweep(preset, seeds, variants[0][1])
    results: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name, _ in variants}
    for run in range(runs):
        order = variants if run % 2 == 0 else list(reversed(variants))
        for name, environment in order:
            wall, cpu = timed_sweep(preset, seeds, environment)
            results[name]["wall_s"].append(wall)
            results[name]["cpu_s"].append(cpu)
            click.echo(f"run {run + 1} {name}: {wall} s wall, {cpu} s CPU", err=True)
    for name, figures in results.items():
        figures["median_wall_s"] = round(statistics.median(figures["wall_s"]), 2)
        figures["median_cpu_s"] = round(statistics.median(figures["cpu_s"]), 2)
        click.echo(f"{name}: median {figures['median_wall_s']} s wall, {figures['median_cpu_s']} s CPU")
    click.echo(json.dumps({"preset": preset, "seeds": seeds, "cores": os.cpu_count(), "variants": results}))


if __name__ == "__main__":
    main()
