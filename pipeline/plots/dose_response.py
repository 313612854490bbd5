"""Dose–response figures: a metric's level means along a numeric axis, one line per group.

Drawn only from a :class:`pipeline.dose_response.DoseResponse`, so the error bars are the per-level 95 %
t-intervals of its ``levels`` table and the marked minimum is the one its ``tests`` table reports. Built with
`matplotlib.figure.Figure` directly (never pyplot), so it is safe under any backend; every function returns
the Figure and the caller decides where it goes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.dose_response import DoseResponse

LINE_COLORS = (
    "tab:blue",
    "tab:red",
    "tab:green",
    "tab:purple",
    "tab:orange",
    "tab:brown",
    "tab:pink",
    "tab:olive",
)
_PANEL_WIDTH, _PANEL_HEIGHT, _MAX_COLUMNS = 5.0, 3.8, 3
# Matplotlib leaves artists whose label starts with "_" out of legends; the minimum markers are explained
# by one legend entry of their own instead of one per group.
MINIMUM_LABEL_PREFIX = "_minimum"


def half_widths(centre: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``[2, n]`` (below, above) extents for `Axes.errorbar`; 0 where the interval is undefined."""
    below = np.where(np.isfinite(low), centre - low, 0.0)
    above = np.where(np.isfinite(high), high - centre, 0.0)
    return np.stack([below, above])


def draw_dose_response(ax: Axes, result: DoseResponse, metric: str | None = None) -> None:
    """Draw ``result`` onto ``ax``: per group, the level means with their seed-blocked CIs joined by a
    line, and the level with the lowest mean (as the readings name it) as a diamond with its bootstrap CI
    over seeds as a horizontal bar."""
    for index, (group, levels) in enumerate(result.levels.groupby("group", sort=False)):
        color = LINE_COLORS[index % len(LINE_COLORS)]
        level = levels["level"].to_numpy(dtype=float)
        mean = levels["mean"].to_numpy(dtype=float)
        ax.errorbar(
            level,
            mean,
            # Seed-blocked intervals (Cousineau–Morey), the variation the paired tests see; a level's own
            # t-interval would carry the offset each seed shares across levels and hide real differences.
            yerr=half_widths(
                mean, levels["within_ci_low"].to_numpy(float), levels["within_ci_high"].to_numpy(float)
            ),
            marker="o",
            capsize=3,
            color=color,
            label=group,
        )
        test = result.tests.loc[result.tests["group"] == group].iloc[0]
        # The level the readings name (lowest mean) with its bootstrap interval, so figure and text agree.
        where, low, high = test["minimum_level"], test["minimum_ci_low"], test["minimum_ci_high"]
        if not math.isfinite(where) or not np.isfinite(mean).any():
            continue
        ax.errorbar(
            [where],
            [np.nanmin(mean)],
            xerr=half_widths(np.array([where]), np.array([low]), np.array([high])),
            fmt="D",
            markersize=7,
            markerfacecolor="white",
            capsize=4,
            elinewidth=2,
            color=color,
            label=f"{MINIMUM_LABEL_PREFIX} {group}",
            zorder=3,
        )
    if result.log_scale:
        ax.set_xscale("log")
    ax.set_xlabel(result.axis_label + (" (log scale)" if result.log_scale else ""))
    ax.set_ylabel(metric or result.metric)
    ax.set_title(f"{metric or result.metric} vs {result.axis_label}")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(
        Line2D([], [], marker="D", markerfacecolor="white", color="grey", linestyle="-", linewidth=2)
    )
    labels.append(f"minimum, bootstrap {result.confidence * 100:.3g} % CI")
    ax.legend(handles, labels, fontsize="small")
    ax.grid(True, alpha=0.3)


def dose_response_figure(result: DoseResponse, metric: str | None = None) -> Figure:
    """One panel: ``result``'s level means with 95 % CIs, one line per group, the minimum marked.

    ``metric`` labels the y-axis (default ``result.metric``). The x-axis is logarithmic when the analysis
    used log10 of the axis. The error bars are seed-blocked (Cousineau–Morey) intervals: each seed's offset
    across levels is removed, as in the paired trend and curvature tests.
    """
    figure = Figure(figsize=(_PANEL_WIDTH, _PANEL_HEIGHT), layout="constrained")
    draw_dose_response(figure.add_subplot(), result, metric)
    return figure


def dose_response_figures(results: Sequence[DoseResponse]) -> Figure:
    """One panel per result (typically one per metric along the same axis), up to three per row."""
    if not results:
        raise ValueError("dose_response_figures needs at least one result")
    columns = min(_MAX_COLUMNS, len(results))
    rows = math.ceil(len(results) / columns)
    figure = Figure(figsize=(_PANEL_WIDTH * columns, _PANEL_HEIGHT * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, result in zip(axes, results, strict=False):
        draw_dose_response(ax, result)
    for ax in axes[len(results) :]:
        ax.remove()
    return figure
