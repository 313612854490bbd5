"""Benchmark: why the fused kernels read sample ranges through one-dimensional row slices.

    python bench/indexing.py               # the published network's last layer, 10 epochs a round
    python bench/indexing.py --repeats 9   # more interleaved rounds (medians are reported)

The kernels in `pipeline/fused.py` walk 256-sample tiles and, per unit, loop over the tile's samples
(the vector loop). Two ways of reading the tile's part of a larger array are timed here in numba loops of
the kernels' shape, interleaved round by round, on one core:

indexed: the element at [stream, epoch, unit, start + sample] of the 4-D noise chunk (and [model, unit,
    start + sample] of the 3-D inputs), as the kernels read them before.
rows: the row slice chunk[stream, epoch][unit, start:start + count] taken once per unit, then [sample].

Both add noise·σ to a [unit, sample] tile (the noise of the last hidden layer) and copy the inputs into a
tile; the results are checked equal before timing. Reported: microseconds per model-epoch (820 samples,
12 units; 8 features for the copy) and the ratio. The last line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import fused  # noqa: E402

if fused.numba is None:
    raise SystemExit("numba is not installed: there are no fused kernels to explain")

from numba import njit  # noqa: E402

FASTMATH = {"reassoc", "contract"}  # the kernels' flags
TILE = 256


@njit(fastmath=FASTMATH, cache=True)
def _noise_indexed(tile, noise, stream, epochs, scale, samples):
    for epoch in range(epochs):
        for start in range(0, samples, TILE):
            count = min(TILE, samples - start)
            for unit in range(tile.shape[0]):
                for sample in range(count):
                    tile[unit, sample] += noise[stream, epoch, unit, start + sample] * scale


@njit(fastmath=FASTMATH, cache=True)
def _noise_rows(tile, noise, stream, epochs, scale, samples):
    for epoch in range(epochs):
        epoch_noise = noise[stream, epoch]
        for start in range(0, samples, TILE):
            count = min(TILE, samples - start)
            for unit in range(tile.shape[0]):
                unit_noise = epoch_noise[unit, start : start + count]
                unit_values = tile[unit]
                for sample in range(count):
                    unit_values[sample] += unit_noise[sample] * scale


@njit(fastmath=FASTMATH, cache=True)
def _copy_indexed(tile, inputs, model, epochs, samples):
    for _ in range(epochs):
        for start in range(0, samples, TILE):
            count = min(TILE, samples - start)
            for unit in range(tile.shape[0]):
                for sample in range(count):
                    tile[unit, sample] = inputs[model, unit, start + sample]


@njit(fastmath=FASTMATH, cache=True)
def _copy_rows(tile, inputs, model, epochs, samples):
    model_inputs = inputs[model]
    for _ in range(epochs):
        for start in range(0, samples, TILE):
            count = min(TILE, samples - start)
            for unit in range(tile.shape[0]):
                source = model_inputs[unit, start : start + count]
                destination = tile[unit]
                for sample in range(count):
                    destination[sample] = source[sample]


@click.command()
@click.option("--hidden", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--features", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=820, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Per call.")
@click.option("--calls", type=click.IntRange(min=1), default=400, show_default=True, help="Per round.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
def main(hidden, features, samples, epochs, calls, repeats) -> None:
    generator = np.random.default_rng(3)
    noise = generator.standard_normal((6, epochs, hidden, samples), dtype=np.float32)
    inputs = generator.standard_normal((24, features, samples), dtype=np.float32)
    scale = np.float32(0.1)
    ways = {
        "noise, indexed": lambda tile: _noise_indexed(tile, noise, 2, epochs, scale, samples),
        "noise, rows": lambda tile: _noise_rows(tile, noise, 2, epochs, scale, samples),
        "copy, indexed": lambda tile: _copy_indexed(tile, inputs, 5, epochs, samples),
        "copy, rows": lambda tile: _copy_rows(tile, inputs, 5, epochs, samples),
    }
    tiles = {name: np.zeros((hidden if "noise" in name else features, TILE), np.float32) for name in ways}
    for name, way in ways.items():  # compile (or load), and check both ways compute the same
        way(tiles[name])
    for task in ("noise", "copy"):
        if not np.array_equal(tiles[f"{task}, indexed"], tiles[f"{task}, rows"]):
            raise click.ClickException(f"the two ways of the {task} loop computed different tiles")
    per_model_epoch: dict[str, list[float]] = {name: [] for name in ways}
    for round_index in range(repeats):
        order = list(ways) if round_index % 2 == 0 else list(reversed(ways))
        for name in order:
            tile = tiles[name]
            started = time.perf_counter()
            for _ in range(calls):
                ways[name](tile)
            per_model_epoch[name].append((time.perf_counter() - started) / (calls * epochs) * 1e6)
    medians = {name: round(statistics.median(values), 3) for name, values in per_model_epoch.items()}
    ratios = {
        task: round(medians[f"{task}, indexed"] / medians[f"{task}, rows"], 2) for task in ("noise", "copy")
    }
    for name, value in medians.items():
        click.echo(f"{name}: {value} µs a model-epoch")
    click.echo(", ".join(f"{task}: rows {ratio}× faster than indexed" for task, ratio in ratios.items()))
    click.echo(json.dumps({"us_per_model_epoch": medians, "rows_speedup": ratios}))


if __name__ == "__main__":
    main()
