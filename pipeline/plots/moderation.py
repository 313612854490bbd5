"""The SAE × training figure: each training factor's main effect under each level of a moderator.

Drawn only from `pipeline.moderation.factor_effects_by_level`'s table, so every error bar is the seed-blocked
95 % t-interval of that table. One panel per metric; within a panel one group per factor, one point per
level. Built with `matplotlib.figure.Figure` directly (never pyplot), safe under any backend.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.plots.dose_response import LINE_COLORS, half_widths


def effects_by_level_figure(table: pd.DataFrame, max_columns: int = 3) -> Figure:
    """Panels of main effects with 95 % CIs, one colour per level, a zero line (no effect)."""
    metrics = list(pd.unique(table["metric"]))
    columns = min(max_columns, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    levels = list(pd.unique(table["level"]))
    width = 0.8 / max(len(levels), 1)
    for axis, metric in zip(axes, metrics, strict=False):
        rows_of_metric = table[table["metric"] == metric]
        effects = list(pd.unique(rows_of_metric["effect"]))
        for position, level in enumerate(levels):
            shown = rows_of_metric[rows_of_metric["level"] == level].set_index("effect").reindex(effects)
            x = np.arange(len(effects)) + (position - (len(levels) - 1) / 2) * width
            centre = shown["estimate"].to_numpy(dtype=float)
            low, high = shown["ci_low"].to_numpy(dtype=float), shown["ci_high"].to_numpy(dtype=float)
            extent = half_widths(centre, low, high)
            axis.errorbar(
                x,
                centre,
                yerr=extent,
                fmt="o",
                color=LINE_COLORS[position % len(LINE_COLORS)],
                capsize=3,
                label=str(level),
            )
        axis.axhline(0.0, color="0.5", linewidth=0.8)
        contrasts = rows_of_metric.drop_duplicates("effect").set_index("effect")["contrast"].reindex(effects)
        axis.set_xticks(np.arange(len(effects)), [str(text) for text in contrasts], rotation=20, fontsize=8)
        axis.set_ylabel(f"effect on {metric}")
        seeds = int(rows_of_metric["seeds"].iloc[0])
        axis.set_title(f"{metric} ({seeds} seeds)", fontsize=10)
    for axis in axes[len(metrics) :]:
        axis.set_visible(False)
    moderator = str(table["moderator"].iloc[0]).rpartition(".")[2]
    axes[0].legend(title=moderator, fontsize=8)
    figure.suptitle(f"Training factors' main effects by {moderator} (95 % CI, blocked on seed)")
    return figure
