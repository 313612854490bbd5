"""Benchmark: new SAEs on stored networks (`decompose`) against training everything again (`sweep`).

    python bench/decompose.py                                  # strategic 8 × 10 seeds, 4 architectures
    python bench/decompose.py --quick                          # 200 + 100 epochs
    python bench/decompose.py --architectures leaky_relu,relu  # SAEs the fused engine trains

First a source sweep (`sweep --preset P --seeds N`) is recorded in a new SQLite store. Then, as fresh
processes run the way a user runs them:
- decompose: `decompose --sweep-id latest --grid sae.architecture=A1,A2,...` into a copy of that store
  (SAE training only; the networks come from the checkpoints);
- retrain:   `sweep --preset P --seeds N --grid sae.architecture=A1,A2,...` into a new empty store
  (every network trained again, once per architecture, since the SAE architecture splits the pass).
The two alternate `--repeats` times, so machine noise falls on both sides. The last line is a JSON object
with every time, the medians and retrain / decompose.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "cli.py")]


def _run(arguments: list[str], folder: Path) -> float:
    started = time.perf_counter()
    finished = subprocess.run([*CLI, *arguments], cwd=folder, capture_output=True, text=True, check=False)
    elapsed = round(time.perf_counter() - started, 2)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
    return elapsed


@click.command()
@click.option(
    "--preset", type=click.Choice(["strategic", "factorial"]), default="strategic", show_default=True
)
@click.option("--seeds", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--architectures", default="topk,batch_topk,jumprelu,gated", show_default=True)
@click.option("--repeats", type=click.IntRange(1, 10), default=1, show_default=True)
@click.option("--quick", is_flag=True, help="200 network + 100 SAE epochs instead of 2000 + 1000.")
def main(preset: str, seeds: int, architectures: str, repeats: int, quick: bool) -> None:
    epochs = ["--epochs", "200", "--sae-epochs", "100"] if quick else []
    sizes = ["--preset", preset, "--seeds", str(seeds), *epochs]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source = scratch / "source"
        source.mkdir()
        source_seconds = _run(["sweep", *sizes], source)
        print(f"source sweep: {source_seconds} s", flush=True)
        times: dict[str, list[float]] = {"decompose": [], "retrain": []}
        for repeat in range(repeats):
            folder = scratch / f"decompose-{repeat}"
            shutil.copytree(source, folder)
            times["decompose"].append(
                _run(
                    ["decompose", "--sweep-id", "latest", "--grid", f"sae.architecture={architectures}"],
                    folder,
                )
            )
            folder = scratch / f"retrain-{repeat}"
            folder.mkdir()
            times["retrain"].append(
                _run(["sweep", *sizes, "--grid", f"sae.architecture={architectures}"], folder)
            )
            print(
                f"repeat {repeat + 1}: decompose {times['decompose'][-1]} s, retrain {times['retrain'][-1]} s"
            )
    medians = {side: statistics.median(values) for side, values in times.items()}
    print(
        json.dumps(
            {
                "preset": preset,
                "seeds": seeds,
                "architectures": architectures,
                "quick": quick,
                "source_sweep_s": source_seconds,
                "times_s": times,
                "median_s": medians,
                "retrain_over_decompose": round(medians["retrain"] / medians["decompose"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
