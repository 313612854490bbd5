"""Smoke tests of the taming figures: right number of axes, fixed colour scales, saveable as PNG."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pipeline.metrics import attribution_matrix, macs, polysemantic_units
from pipeline.plots.taming import (
    attribution_heatmap,
    overlap_grid,
    overlap_grid_png,
    overlap_heatmap,
    overlap_png,
)

GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7]]


def random_decoder(seed: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(seed))


def test_overlap_heatmap_has_heatmap_and_colourbar(tmp_path):
    decoder = random_decoder(0)
    figure = overlap_heatmap(decoder, title="seed 0")
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2
    heatmap = figure.axes[0]
    assert heatmap.images[0].get_clim() == (0.0, 1.0)
    assert f"{macs(decoder):.3f}" in heatmap.get_title()
    figure.savefig(tmp_path / "overlap.png")
    assert (tmp_path / "overlap.png").stat().st_size > 0


def test_overlap_heatmap_draws_on_a_given_axis():
    figure = Figure()
    ax = figure.add_subplot()
    assert overlap_heatmap(random_decoder(1), ax=ax) is figure
    assert len(figure.axes) == 2


def test_overlap_grid_has_one_axis_per_decoder_and_one_shared_colourbar(tmp_path):
    decoders = [random_decoder(seed) for seed in range(5)]
    figure = overlap_grid(decoders, [f"seed {seed}" for seed in range(5)], suptitle="baseline")
    assert len(figure.axes) == 5 + 1
    assert sum(len(ax.images) for ax in figure.axes) == 5
    figure.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_attribution_heatmap_marks_polysemantic_units(tmp_path):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(200, 8, generator=generator)
    units = torch.stack([features[:, 0], features[:, 0] + features[:, 3], features[:, 5]], dim=1)
    attribution = attribution_matrix(units, features)
    flags = polysemantic_units(attribution, GROUPS)
    figure = attribution_heatmap(attribution, GROUPS, unit_label="latent", polysemantic=flags)
    assert len(figure.axes) == 2
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels[0] == "latent 0"
    assert labels[1].startswith("latent 1") and labels[1] != "latent 1"
    assert len(figure.axes[0].lines) == len(GROUPS) - 1
    figure.savefig(tmp_path / "attribution.png")
    assert (tmp_path / "attribution.png").stat().st_size > 0


def pixels(png: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(png))


def full_draw(figure: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return pixels(buffer.getvalue())


@pytest.mark.parametrize("title", ["orthogonal·bipolar·l2·gelu seed 3", None])
def test_painted_heatmap_is_the_full_matplotlib_drawing(title):
    """The painter redraws only image, frame and title over a cached frame: the pixels must match a full
    draw of the same figure (a few antialiased corner pixels of the frame may differ by a shade)."""
    for seed in range(3):  # the same painter is reused; no earlier heatmap may show through
        decoder = random_decoder(seed)
        painted, drawn = pixels(overlap_png(decoder, title)), full_draw(overlap_heatmap(decoder, title))
        assert painted.shape == drawn.shape
        difference = np.abs(painted - drawn).max(axis=-1)
        assert difference.max() < 0.05 and (difference > 0).mean() < 0.001


def test_painted_grid_is_the_full_matplotlib_drawing():
    for count, suptitle in [(10, "random·bipolar·l1·relu"), (3, None), (10, "orthogonal·bipolar·l2·gelu")]:
        decoders = [random_decoder(seed + count) for seed in range(count)]
        titles = [f"seed {seed}" for seed in range(count)]
        painted = pixels(overlap_grid_png(decoders, titles, suptitle))
        drawn = full_draw(overlap_grid(decoders, titles, suptitle))
        assert painted.shape == drawn.shape
        assert np.abs(painted - drawn).max() < 0.05


def test_painter_refuses_decoders_it_was_not_built_for():
    with pytest.raises(ValueError, match="share their number of latents"):
        overlap_grid_png([random_decoder(0), torch.randn(8, 12)], ["a", "b"])
    with pytest.raises(ValueError, match="at least one decoder"):
        overlap_grid_png([], [])


def test_painting_from_several_threads_gives_each_call_its_own_pixels():
    from concurrent.futures import ThreadPoolExecutor

    decoders = [random_decoder(seed) for seed in range(24)]
    expected = [pixels(overlap_png(decoder, f"seed {seed}")) for seed, decoder in enumerate(decoders)]
    with ThreadPoolExecutor(6) as threads:
        painted = list(threads.map(lambda seed: overlap_png(decoders[seed], f"seed {seed}"), range(24)))
    for seed, png in enumerate(painted):
        assert np.array_equal(pixels(png), expected[seed]), seed
