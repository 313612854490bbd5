"""Figures of the taming study: decoder overlap heatmaps and feature-attribution heatmaps.

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot, so nothing touches global
state or the backend; every function returns the Figure and the caller decides where it goes.
"""

from __future__ import annotations

import functools
import io
import math
import threading
from collections.abc import Sequence

import matplotlib
import matplotlib.image
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


class OverlapPainter:
    """PNGs of overlap heatmaps (one, or a grid) for many decoder sets of one shape, fast.

    A sweep logs one heatmap per seed run and one grid per ablation. A full matplotlib draw spends most of
    its time (about 70 ms for a heatmap, 250 ms for a grid of ten) laying out ticks, labels and the
    colourbar, which are the same every time because the colour scale is fixed to [0, 1]. The painter
    draws that frame once, keeps its pixels, and per call redraws only the images, their frames and the
    titles over a copy (about 10 ms). `figure` must come from `overlap_heatmap` or `overlap_grid`.
    """

    def __init__(self, figure: Figure, latents: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.figure, self.latents = figure, latents
        # One figure and canvas are redrawn per call: calls from several threads (Dask workers run
        # tasks in threads) must take turns, or one seed's pixels land in another's PNG.
        self.lock = threading.Lock()
        self.canvas = FigureCanvasAgg(figure)
        self.axes = [ax for ax in figure.axes if ax.images and ax.get_label() != "<colorbar>"]
        self.images = [ax.images[0] for ax in self.axes]
        self.suptitle = figure._suptitle
        # The first draw places every title; a draw with titles hidden moves them, so their places are
        # put back. Spines lie over the images, so they are redrawn after them (and kept out of the
        # frame, where their antialiased edges would be blended twice).
        self.canvas.draw()
        title_positions = [ax.title.get_position() for ax in self.axes]
        self.redrawn = [
            (ax, artist) for ax in self.axes for artist in (ax.images[0], *ax.spines.values(), ax.title)
        ]
        if self.suptitle is not None:
            self.redrawn.append((None, self.suptitle))
        for _, artist in self.redrawn:
            artist.set_visible(False)
        self.canvas.draw()
        self.frame = self.canvas.copy_from_bbox(figure.bbox)
        for _, artist in self.redrawn:
            artist.set_visible(True)
        for ax, position in zip(self.axes, title_positions, strict=True):
            ax.title.set_position(position)

    def png(
        self,
        decoders: Sequence[torch.Tensor | np.ndarray],
        titles: Sequence[str | None],
        suptitle: str | None = None,
    ) -> bytes:
        """PNG bytes of the painter's figure drawn for `decoders` (each [latent, hidden]), one per panel."""
        if len(decoders) != len(self.axes) or len(titles) != len(self.axes):
            raise ValueError(f"this painter draws {len(self.axes)} panel(s); got {len(decoders)} decoders")
        with self.lock:
            return self._paint(decoders, titles, suptitle)

    def _paint(self, decoders, titles, suptitle) -> bytes:
        for ax, decoder, title in zip(self.axes, decoders, titles, strict=True):
            decoder = torch.as_tensor(decoder)
            if decoder.shape[0] != self.latents:
                raise ValueError(f"this painter draws {self.latents} latents; got {decoder.shape[0]}")
            absolute = cosine_matrix(decoder).abs().numpy()
            np.fill_diagonal(absolute, np.nan)
            ax.images[0].set_data(absolute)
            overlap = f"MACS {macs(decoder):.3f}"
            ax.title.set_text(f"{title}\n{overlap}" if title else overlap)
        if self.suptitle is not None:
            self.suptitle.set_text(suptitle or "")
        self.canvas.restore_region(self.frame)
        for ax, artist in self.redrawn:
            (ax or self.figure).draw_artist(artist)
        buffer = io.BytesIO()
        # Compression level 1: two thirds of the encoding time of the default 6, files ~15 % larger.
        matplotlib.image.imsave(
            buffer,
            np.asarray(self.canvas.buffer_rgba()),
            format="png",
            pil_kwargs={"compress_level": 1},
        )
        return buffer.getvalue()


def _placeholder(latents: int) -> torch.Tensor:
    return torch.eye(latents, max(latents, 2))


@functools.lru_cache(maxsize=4)
def _heatmap_painter(latents: int, dpi: int) -> OverlapPainter:
    # A two-line placeholder title, like every real one, so the title is placed as it will be drawn.
    figure = overlap_heatmap(_placeholder(latents), title="placeholder")
    figure.set_dpi(dpi)
    return OverlapPainter(figure, latents)


@functools.lru_cache(maxsize=4)
def _grid_painter(panels: int, latents: int, suptitle: bool, dpi: int) -> OverlapPainter:
    figure = overlap_grid(
        [_placeholder(latents)] * panels, ["placeholder"] * panels, "placeholder" if suptitle else None
    )
    figure.set_dpi(dpi)
    return OverlapPainter(figure, latents)


def prepare_overlap_grid_painter(latents: int, panels: int, dpi: int = 80) -> None:
    """Build the painter `overlap_grid_png` will use for grids of `panels` seeds of decoders with `latents`
    rows (about 0.1 CPU-s, once), so a sweep can pay it while its workers train rather than when the last
    results arrive. The seed heatmaps' painter is not built here: a pool's workers draw those
    (`PassPool.paint_overlaps`), and a single process builds it at its first seed, nothing training beside."""
    _grid_painter(panels, latents, True, dpi)


def overlap_png(decoder: torch.Tensor | np.ndarray, title: str | None = None, dpi: int = 80) -> bytes:
    """PNG bytes of `overlap_heatmap(decoder, title)` at `dpi`, drawn by a cached OverlapPainter."""
    decoder = torch.as_tensor(decoder)
    return _heatmap_painter(decoder.shape[0], dpi).png([decoder], [title])


def overlap_grid_png(
    decoders: Sequence[torch.Tensor | np.ndarray],
    titles: Sequence[str],
    suptitle: str | None = None,
    dpi: int = 80,
) -> bytes:
    """PNG bytes of `overlap_grid(decoders, titles, suptitle)` at `dpi`, drawn by a cached OverlapPainter.

    All decoders must have the same number of latents.
    """
    if len(decoders) == 0:
        raise ValueError("overlap_grid_png needs at least one decoder")
    latents = {torch.as_tensor(decoder).shape[0] for decoder in decoders}
    if len(latents) != 1:
        raise ValueError(f"decoders of one grid must share their number of latents; got {sorted(latents)}")
    painter = _grid_painter(len(decoders), latents.pop(), bool(suptitle), dpi)
    return painter.png(decoders, titles, suptitle)


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
