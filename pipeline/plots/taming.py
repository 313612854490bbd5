"""Figures of the taming study: decoder overlap heatmaps and feature-attribution heatmaps.

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot, so nothing touches global
state or the backend; every function returns the Figure and the caller decides where it goes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from pipeline.metrics import cosine_matrix, macs

_OVERLAP_COLORMAP = "viridis"
_ATTRIBUTION_COLORMAP = "magma"
_POLYSEMANTIC_MARK = " ●"
_POLYSEMANTIC_COLOR = "tab:red"


def _overlap_colormap() -> Colormap:
    # The diagonal is masked (always 1, and excluded from MACS); show it in neutral grey.
    return matplotlib.colormaps[_OVERLAP_COLORMAP].with_extremes(bad="lightgrey")


def _draw_overlap(ax: Axes, decoder: torch.Tensor, title: str | None, labels: bool = True) -> AxesImage:
    """|cos| matrix of the decoder directions on `ax`, diagonal masked; returns the image for a colourbar.

    `labels=False` drops axis labels and ticks, which are most of matplotlib's drawing time and only
    clutter a grid of small panels.
    """
    absolute = cosine_matrix(decoder).abs().numpy()
    np.fill_diagonal(absolute, np.nan)
    image = ax.imshow(absolute, cmap=_overlap_colormap(), vmin=0.0, vmax=1.0, interpolation="nearest")
    overlap = f"MACS {macs(decoder):.3f}"
    ax.set_title(f"{title}\n{overlap}" if title else overlap, fontsize="medium")
    if not labels:
        ax.set_xticks([])
        ax.set_yticks([])
        return image
    ax.set_xlabel("latent")
    ax.set_ylabel("latent")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    return image


def overlap_heatmap(decoder: torch.Tensor, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Heatmap of |cos(d_k, d_l)| between decoder directions, colour scale fixed to [0, 1].

    decoder: [latent, hidden]. The diagonal is masked (grey) because MACS averages only k ≠ l; MACS is
    written in the title. Draws on `ax` when given (adding a colourbar beside it), else on a new Figure.
    Returns the Figure that holds the heatmap.
    """
    if ax is None:
        # Fixed axes positions instead of a layout engine: constrained layout draws the figure twice, and
        # this figure is rendered once per seed run (it was most of the logging time).
        figure = Figure(figsize=(4.6, 4.0))
        ax = figure.add_axes((0.1, 0.1, 0.7, 0.78))
        colourbar_axes = figure.add_axes((0.84, 0.1, 0.035, 0.78))
        image = _draw_overlap(ax, decoder, title)
        figure.colorbar(image, cax=colourbar_axes, label="|cos|")
        return figure
    figure = ax.get_figure()
    image = _draw_overlap(ax, decoder, title)
    figure.colorbar(image, ax=ax, label="|cos|")
    return figure


def overlap_png(decoder: torch.Tensor | np.ndarray, title: str | None = None, dpi: int = 80) -> bytes:
    """PNG bytes of `overlap_heatmap(decoder, title)`; a plain function of plain data, so it can run in a
    helper process (see tracking.taming.OverlapRenderer)."""
    figure = overlap_heatmap(torch.as_tensor(decoder), title=title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def overlap_grid(
    decoders: Sequence[torch.Tensor], titles: Sequence[str], suptitle: str | None = None
) -> Figure:
    """Overlap heatmaps of several decoders (e.g. one per seed) in a near-square grid, one shared colourbar.

    decoders: list of [latent, hidden]; titles: one per decoder. Unused grid cells are removed, so the
    Figure holds len(decoders) heatmap axes plus one colourbar axis.
    """
    if len(decoders) == 0:
        raise ValueError("overlap_grid needs at least one decoder")
    if len(titles) != len(decoders):
        raise ValueError(f"{len(titles)} titles for {len(decoders)} decoders")
    columns = math.ceil(math.sqrt(len(decoders)))
    rows = math.ceil(len(decoders) / columns)
    # A fixed grid (no layout engine, no ticks): one grid is drawn per ablation run, and constrained
    # layout with per-panel ticks took over a second per figure.
    panel, top = 2.4, 0.85 if suptitle else 0.5
    width, height = panel * columns + 0.9, panel * rows + top
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(
        rows,
        columns,
        left=0.02,
        right=1 - 0.9 / width,
        bottom=0.02,
        top=1 - top / height,
        wspace=0.08,
        hspace=0.3,
    )
    axes = [figure.add_subplot(grid[index // columns, index % columns]) for index in range(len(decoders))]
    image = None
    for ax, decoder, title in zip(axes, decoders, titles, strict=True):
        image = _draw_overlap(ax, decoder, title, labels=False)
    colourbar_axes = figure.add_axes((1 - 0.7 / width, 0.1, 0.18 / width, 0.8 * (1 - top / height)))
    figure.colorbar(image, cax=colourbar_axes, label="|cos|")
    if suptitle:
        figure.suptitle(suptitle, y=1 - 0.1 / height, va="top")
    return figure


def attribution_heatmap(
    attribution: torch.Tensor,
    groups: Sequence[Sequence[int]],
    unit_label: str = "neuron",
    polysemantic: torch.Tensor | None = None,
) -> Figure:
    """Heatmap of unit-to-feature attribution (e.g. |corr|), units as rows and features as columns.

    attribution: [unit, feature]; groups: lists of feature indices. Columns are ordered group by group
    (features in no group last) and thin white lines separate the groups. polysemantic: optional
    BoolTensor [unit]; those units' tick labels get a red mark. Colour scale [0, 1] unless the attribution
    exceeds 1.
    """
    matrix = attribution.detach().to(device="cpu", dtype=torch.float64).numpy()
    if matrix.ndim != 2:
        raise ValueError(f"attribution must be 2-D [unit, feature]; got shape {matrix.shape}")
    unit_count, feature_count = matrix.shape
    grouped = [feature for group in groups for feature in group]
    named = set(grouped)
    order = grouped + [feature for feature in range(feature_count) if feature not in named]
    if sorted(order) != list(range(feature_count)):
        raise ValueError(f"groups must name distinct features in 0..{feature_count - 1}; got {groups}")
    marked = np.zeros(unit_count, dtype=bool)
    if polysemantic is not None:
        marked = polysemantic.detach().cpu().numpy().astype(bool)
        if marked.shape != (unit_count,):
            raise ValueError(f"polysemantic has shape {marked.shape}; expected ({unit_count},)")

    figure = Figure(figsize=(1.2 + 0.45 * feature_count, 1.2 + 0.3 * unit_count), layout="constrained")
    ax = figure.add_subplot()
    upper = max(1.0, float(np.nanmax(matrix))) if matrix.size else 1.0
    image = ax.imshow(
        matrix[:, order],
        cmap=_ATTRIBUTION_COLORMAP,
        vmin=0.0,
        vmax=upper,
        aspect="auto",
        interpolation="nearest",
    )
    boundary = -0.5
    for group in groups[:-1] if len(grouped) == feature_count else groups:
        boundary += len(group)
        ax.axvline(boundary, color="white", linewidth=2)

    ax.set_xticks(range(feature_count), [f"x{feature}" for feature in order])
    ax.set_xlabel("input feature (grouped)")
    ax.set_yticks(
        range(unit_count),
        [f"{unit_label} {unit}{_POLYSEMANTIC_MARK if marked[unit] else ''}" for unit in range(unit_count)],
    )
    for label, is_polysemantic in zip(ax.get_yticklabels(), marked, strict=True):
        if is_polysemantic:
            label.set_color(_POLYSEMANTIC_COLOR)
    title = f"{unit_label} attribution"
    if polysemantic is not None:
        title += f": {int(marked.sum())} of {unit_count} polysemantic"
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="attribution")
    return figure
