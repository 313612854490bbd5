"""Benchmark: the batched engines at GPU scale (issue 13, item 6). Needs a device to mean anything.

    python bench/gpu.py                                   # on CUDA: 10,000 taming models, n = 256 collisions
    python bench/gpu.py --models 10000 --epochs 2000      # the factorial × 625 seeds, published epochs
    python bench/gpu.py --device cpu --models 32 --epochs 20 --sae-epochs 10 --m 256 --steps 50   # smoke run

taming: one `train_pass` of the full factorial (16 configurations) repeated over as many seeds as make
`--models` models, on `--device` (the torch engine; the fused one is CPU-only), timed for training alone.
incidental: one `train_incidental` per m in `--m` at n = `--n` (the collisions model, all instances in one
batched pass), timed, with the polysemantic-neuron count against n²/(4m).
The last line printed is one JSON object with every time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import AblationConfig, preset_configs  # noqa: E402
from pipeline.incidental import IncidentalConfig, train_incidental  # noqa: E402
from pipeline.train import resolve_device, train_pass  # noqa: E402


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@click.command()
@click.option("--device", default="cuda", show_default=True, help="cuda, mps or cpu.")
@click.option("--models", type=click.IntRange(min=16), default=10_000, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=2000, show_default=True, help="Network epochs.")
@click.option("--sae-epochs", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--n", "features", type=click.IntRange(min=2), default=256, show_default=True)
@click.option(
    "--m", "widths", default="512,1024,2048,4096", show_default=True, help="Comma-separated neuron counts."
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Incidental steps (default: the config's)."
)
def main(device, models, epochs, sae_epochs, features, widths, steps) -> None:
    try:
        chosen = resolve_device(device)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--device") from None
    try:
        width_list = [int(width) for width in widths.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"a comma-separated list of integers; got {widths!r}", param_hint="--m"
        ) from None
    report: dict = {"device": str(chosen), "torch": torch.__version__}
    if chosen.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(chosen)

    factorial = preset_configs("factorial", AblationConfig().with_epochs(epochs, sae_epochs))
    seeds = max(1, models // len(factorial))
    configs = [config for config in factorial for _ in range(seeds)]
    seed_list = [seed for _ in factorial for seed in range(seeds)]
    _synchronize(chosen)
    started = time.perf_counter()
    trained = train_pass(configs, seed_list, device=str(chosen))
    _synchronize(chosen)
    taming_s = time.perf_counter() - started
    failed = sum(not result.finished for result in trained)
    click.echo(
        f"taming: {len(configs)} models ({len(factorial)} configs × {seeds} seeds), {epochs} + {sae_epochs} "
        f"epochs, one pass: {taming_s:.1f} s ({failed} failed)"
    )
    report["taming"] = {
        "models": len(configs),
        "epochs": epochs,
        "sae_epochs": sae_epochs,
        "seconds": taming_s,
    }

    report["incidental"] = []
    for width in width_list:
        config = IncidentalConfig(n=features, m=width, device=str(chosen))
        if steps is not None:
            config = dataclasses.replace(config, steps=steps)
        _synchronize(chosen)
        started = time.perf_counter()
        result = train_incidental(config)
        _synchronize(chosen)
        seconds = time.perf_counter() - started
        counts = result.measurements["polysemantic_neurons"]
        counted = sum(counts) / len(counts)
        predicted = features**2 / (4 * width)
        click.echo(
            f"incidental n={features} m={width}: {config.instances} instances, {config.steps} steps, "
            f"{seconds:.1f} s; polysemantic neurons {counted:.1f} (n²/4m = {predicted:.1f})"
        )
        report["incidental"].append(
            {"n": features, "m": width, "steps": config.steps, "seconds": seconds, "polysemantic": counted}
        )
    click.echo(json.dumps(report))


if __name__ == "__main__":
    main()
