"""Benchmark: what a GELU network costs the fused engine against a ReLU one, on one core.

    python bench/activations.py                 # published sizes, 40 models × 400 epochs per side
    python bench/activations.py --repeats 5

Each side is one `train_pass` of the strategic configurations with every activation set to one kind and
no noise (so only the activation differs), on one thread, 5 seeds × 8 configurations, 400 network epochs
and 1 SAE epoch. The rounds alternate the two sides. Reported: microseconds per model-epoch (median of
the rounds; curves every 50 epochs included) and GELU's cost as a multiple of ReLU's. The last line is
one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import fused  # noqa: E402
from pipeline.config import AblationConfig, preset_configs  # noqa: E402
from pipeline.train import train_pass  # noqa: E402


def side(activation: str, seeds: int, epochs: int) -> tuple[list[AblationConfig], list[int]]:
    configs = [
        config.with_factors(config.factors["init"], "none", config.factors["reg"], activation).with_epochs(
            epochs, 1
        )
        for config in preset_configs("strategic", AblationConfig())
    ]
    return [config for config in configs for _ in range(seeds)], [
        seed for _ in configs for seed in range(seeds)
    ]


@click.command()
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--epochs", type=click.IntRange(min=50), default=400, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def main(seeds: int, epochs: int, repeats: int) -> None:
    if fused.numba is None or not fused.applies(torch.device("cpu")):
        raise click.ClickException(
            "the fused engine does not apply here (numba missing or POLYLAB_ENGINE=torch)"
        )
    torch.set_num_threads(1)
    sides = {activation: side(activation, seeds, epochs) for activation in ("relu", "gelu")}
    for configs, seed_list in sides.values():  # load (or compile) the kernels first
        train_pass(configs[:1], seed_list[:1])
    per_model_epoch: dict[str, list[float]] = {activation: [] for activation in sides}
    for round_index in range(repeats):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for activation in order:
            configs, seed_list = sides[activation]
            started = time.perf_counter()
            train_pass(configs, seed_list)
            elapsed = time.perf_counter() - started
            per_model_epoch[activation].append(elapsed / (len(configs) * epochs) * 1e6)
            click.echo(
                f"round {round_index + 1}: {activation} {per_model_epoch[activation][-1]:.1f} µs", err=True
            )
    medians = {
        activation: round(statistics.median(values), 1) for activation, values in per_model_epoch.items()
    }
    ratio = round(medians["gelu"] / medians["relu"], 2)
    click.echo(
        f"ReLU {medians['relu']} µs, GELU {medians['gelu']} µs a model-epoch on one core: GELU {ratio}×"
    )
    click.echo(json.dumps({"us_per_model_epoch": medians, "gelu_over_relu": ratio, "models": len(configs)}))


if __name__ == "__main__":
    main()
