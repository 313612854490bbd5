"""Benchmark: drawing the study's Student-t noise, three ways side by side in one run.

    python bench/noise.py                # 10-epoch chunks of the published network's last layer
    python bench/noise.py --repeats 9    # more interleaved rounds (medians are reported)

reference: `pipeline.train.fill_unit_noise` (numpy passes over every candidate).
fused, numpy uniforms: `pipeline.fused.fill_unit_noise` with the uniforms drawn by `Generator.random`.
fused: `pipeline.fused.fill_unit_noise` as it runs, the uniforms converted from raw PCG64 outputs.
All three give the same numbers bit for bit (checked here before timing). The rounds alternate the three,
so machine noise falls on each alike. The last line is one JSON object: nanoseconds per draw (median)
and the ratios to the reference.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import fused  # noqa: E402
from pipeline.runtime import retain_freed_memory  # noqa: E402
from pipeline.train import NOISE_CHUNK_EPOCHS, fill_unit_noise  # noqa: E402


def _numpy_uniforms(generator: np.random.Generator, candidates: int) -> np.ndarray:
    return generator.random((2, candidates), dtype=np.float32)


def _fused_with_numpy_uniforms(kind: str, out: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    raw_uniforms = fused._uniform_pairs
    fused._uniform_pairs = _numpy_uniforms
    try:
        return fused.fill_unit_noise(kind, out, generator)
    finally:
        fused._uniform_pairs = raw_uniforms


WAYS = {
    "reference": fill_unit_noise,
    "fused, numpy uniforms": _fused_with_numpy_uniforms,
    "fused": fused.fill_unit_noise,
}


@click.command()
@click.option("--hidden", default=12, show_default=True, help="Units of the noisy layer.")
@click.option("--samples", default=820, show_default=True, help="Training samples.")
@click.option(
    "--chunks", default=50, show_default=True, help="Chunks of NOISE_CHUNK_EPOCHS epochs per round."
)
@click.option(
    "--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds."
)
def main(hidden: int, samples: int, chunks: int, repeats: int) -> None:
    if fused.numba is None:
        raise click.ClickException("numba is not installed: the fused noise path does not exist here")
    retain_freed_memory()  # as train_pass does: freed blocks reused, not re-faulted from the kernel
    shape = (NOISE_CHUNK_EPOCHS, hidden, samples)
    draws = [
        fill("positive_kurtosis", torch.empty(shape), np.random.default_rng(7)) for fill in WAYS.values()
    ]
    if not all(torch.equal(draws[0], other) for other in draws[1:]):
        raise click.ClickException("the three ways drew different numbers")
    per_draw: dict[str, list[float]] = {name: [] for name in WAYS}
    generators = {name: np.random.default_rng(11) for name in WAYS}
    out = torch.empty(shape)
    for round_index in range(repeats):
        order = list(WAYS) if round_index % 2 == 0 else list(reversed(WAYS))
        for name in order:
            started = time.perf_counter()
            for _ in range(chunks):
                WAYS[name]("positive_kurtosis", out, generators[name])
            elapsed = time.perf_counter() - started
            per_draw[name].append(elapsed / (chunks * out.numel()) * 1e9)
        click.echo(
            f"round {round_index + 1}: " + ", ".join(f"{name} {per_draw[name][-1]:.2f} ns" for name in WAYS)
        )
    medians = {name: round(statistics.median(values), 2) for name, values in per_draw.items()}
    ratios = {name: round(medians["reference"] / medians[name], 2) for name in WAYS}
    click.echo(
        ", ".join(f"{name}: {medians[name]} ns a draw ({ratios[name]}× the reference)" for name in WAYS)
    )
    click.echo(json.dumps({"ns_per_draw": medians, "speedup_over_reference": ratios}))


if __name__ == "__main__":
    main()
