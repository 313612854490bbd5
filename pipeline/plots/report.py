"""Figures of a study report: per-seed strip plots and factorial main-effect and interaction plots.

Every figure is drawn from the tidy per-seed table (one row per run, a configuration label or factor columns,
one column per metric), summarised by `pipeline.stats`, so the error bars are the same 95 % t-intervals the
statistics tables report. Figures are built with `matplotlib.figure.Figure` directly, never through pyplot,
so nothing touches global state or the backend; every function returns the Figure and the caller decides
where it goes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.conclusions import METRIC_DIRECTIONS, sign_of_reading
from pipeline.stats import describe, factorial_cell_means

_POINT_COLOR = "tab:blue"
_BASELINE_COLOR = "tab:orange"
_SUMMARY_COLOR = "black"
_LEVEL_COLORS = ("tab:blue", "tab:red")
# Points sit left of the configuration's tick, the mean and CI right of it, so neither hides the other.
_POINT_OFFSET, _JITTER_HALF_WIDTH, _SUMMARY_OFFSET = -0.1, 0.12, 0.22
# Labels longer than this (or more configurations than _MANY_CONFIGS) are rotated to stay legible.
_LONG_LABEL, _MANY_CONFIGS = 10, 6


def _require_columns(per_seed: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in per_seed.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; available: {list(per_seed.columns)}")


def _error_bar_extent(summary: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """(below, above) half-widths of the CI for `Axes.errorbar`; 0 where the CI is undefined (n < 2)."""
    mean, low, high = summary["mean"], summary["ci_low"], summary["ci_high"]
    if math.isnan(low) or math.isnan(high):
        return [0.0], [0.0]
    return [mean - low], [high - mean]


def _config_order(
    per_seed: pd.DataFrame, config_column: str, order: Sequence[Any] | None, baseline: Any | None
) -> list[Any]:
    present = list(pd.unique(per_seed[config_column].dropna()))
    if order is None:
        # Baseline first: the reference sits at the left edge where the eye starts.
        configs = [baseline, *(c for c in present if c != baseline)] if baseline is not None else present
    else:
        unknown = [c for c in order if c not in present]
        if unknown:
            raise ValueError(
                f"order names config(s) {unknown} not in {config_column!r}; available: {present}"
            )
        configs = list(order)
    if baseline is not None and baseline not in present:
        raise ValueError(f"baseline {baseline!r} not found in {config_column!r}; available: {present}")
    if baseline is not None and baseline not in configs:
        raise ValueError(f"baseline {baseline!r} is not in the given order {list(configs)}")
    return configs


def seed_strip_plot(
    per_seed: pd.DataFrame,
    config_column: str,
    metric: str,
    order: Sequence[Any] | None = None,
    baseline: Any | None = None,
) -> Figure:
    """One column per configuration: every seed as a point, the mean with its 95 % t-interval beside them.

    per_seed: tidy, one row per run. NaN values (failed metric) are left out; each tick label gives the
    number of seeds drawn. Points are jittered horizontally by a fixed-seed generator, so the same table
    always gives the same picture. ``order`` selects and orders the configurations (default: order of
    first appearance, ``baseline`` first); the baseline's points, background and tick label are
    highlighted and a dashed line marks its mean across the whole axis for comparison.
    """
    _require_columns(per_seed, [config_column, metric])
    configs = _config_order(per_seed, config_column, order, baseline)
    jitter = np.random.default_rng(0)
    figure = Figure(figsize=(max(4.0, 0.9 * len(configs) + 1.5), 4.2), layout="constrained")
    ax = figure.add_subplot()
    labels = []
    for position, config in enumerate(configs):
        values = per_seed.loc[per_seed[config_column] == config, metric].to_numpy(dtype=float)
        values = values[~np.isnan(values)]
        is_baseline = baseline is not None and config == baseline
        color = _BASELINE_COLOR if is_baseline else _POINT_COLOR
        if is_baseline:
            ax.axvspan(position - 0.5, position + 0.5, color=_BASELINE_COLOR, alpha=0.1, linewidth=0)
        offsets = jitter.uniform(-_JITTER_HALF_WIDTH, _JITTER_HALF_WIDTH, size=values.size)
        ax.scatter(position + _POINT_OFFSET + offsets, values, s=18, color=color, alpha=0.75, zorder=2)
        summary = describe(values)
        if summary["n"] > 0:
            below, above = _error_bar_extent(summary)
            ax.errorbar(
                [position + _SUMMARY_OFFSET],
                [summary["mean"]],
                yerr=[below, above],
                fmt="o",
                color=_SUMMARY_COLOR,
                capsize=4,
                markersize=5,
                zorder=3,
            )
            if is_baseline:
                ax.axhline(summary["mean"], color=_BASELINE_COLOR, linestyle="--", linewidth=1, zorder=1)
        labels.append(f"{config}\n(n={summary['n']})")

    rotate = len(configs) > _MANY_CONFIGS or any(len(str(c)) > _LONG_LABEL for c in configs)
    ax.set_xticks(
        range(len(configs)),
        labels,
        rotation=30 if rotate else 0,
        ha="right" if rotate else "center",
        fontsize="small",
    )
    if baseline is not None:
        ax.get_xticklabels()[configs.index(baseline)].set_fontweight("bold")
    ax.set_xlim(-0.6, len(configs) - 0.4)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: seeds, mean and 95 % CI", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    return figure


def main_effects_plot(per_seed: pd.DataFrame, factors: Mapping[str, tuple[Any, Any]], metric: str) -> Figure:
    """One panel per factor: mean ± 95 % CI of ``metric`` at the low and the high level, joined by a line.

    Each level's mean pools every run at that level (all other factors mixed), the marginal mean whose
    difference is the factor's main effect in a balanced design. Panels share the y axis, so slopes
    compare directly; the dashed line is the grand mean. The CI is the t-interval of those pooled runs,
    so its width includes the spread caused by the other factors: it describes the runs, while the test
    of the effect (residual error only) is `pipeline.stats.factorial_effects`.
    """
    _require_columns(per_seed, [*factors, metric])
    if not factors:
        raise ValueError("main_effects_plot needs at least one factor")
    figure = Figure(figsize=(2.6 * len(factors) + 0.8, 3.6), layout="constrained")
    axes = figure.subplots(1, len(factors), sharey=True, squeeze=False).ravel()
    grand_mean = describe(per_seed[metric].to_numpy(dtype=float))["mean"]
    for ax, (factor, levels) in zip(axes, factors.items(), strict=True):
        cells = factorial_cell_means(per_seed, {factor: tuple(levels)}, metric)
        ax.axhline(grand_mean, color="grey", linestyle="--", linewidth=1)
        ax.plot([0, 1], cells["mean"], color=_SUMMARY_COLOR, linewidth=1.2, label="level means")
        for position, (_, cell) in enumerate(cells.iterrows()):
            below, above = _error_bar_extent(cell)
            ax.errorbar(
                [position], [cell["mean"]], yerr=[below, above], fmt="o", color=_SUMMARY_COLOR, capsize=4
            )
        ax.set_xticks([0, 1], [str(level) for level in levels], fontsize="small")
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(factor, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(metric)
    figure.suptitle(f"Main effects on {metric} (mean ± 95 % CI)", fontsize="medium")
    return figure


def _draw_interaction(
    ax: Axes,
    per_seed: pd.DataFrame,
    factor_a: str,
    factor_b: str,
    levels: Mapping[str, tuple[Any, Any]],
    metric: str,
) -> None:
    """Mean ± 95 % CI against factor_a's levels, one line per level of factor_b."""
    cells = factorial_cell_means(
        per_seed, {factor_a: tuple(levels[factor_a]), factor_b: tuple(levels[factor_b])}, metric
    )
    for line_index, level_b in enumerate(levels[factor_b]):
        line = cells[cells[factor_b] == level_b]
        # A small horizontal dodge keeps the two lines' error bars from sitting on top of each other.
        positions = np.array([0.0, 1.0]) + (line_index - 0.5) * 0.08
        color = _LEVEL_COLORS[line_index]
        ax.plot(positions, line["mean"], color=color, marker="o", label=str(level_b))
        for position, (_, cell) in zip(positions, line.iterrows(), strict=True):
            below, above = _error_bar_extent(cell)
            ax.errorbar([position], [cell["mean"]], yerr=[below, above], color=color, capsize=3, fmt="none")
    ax.set_xticks([0, 1], [str(level) for level in levels[factor_a]], fontsize="small")
    ax.set_xlim(-0.4, 1.4)
    ax.set_xlabel(factor_a)
    ax.set_title(f"{factor_a} × {factor_b}", fontsize="medium")
    ax.legend(title=factor_b, fontsize="small", title_fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def interaction_plot(
    per_seed: pd.DataFrame,
    factor_a: str,
    factor_b: str,
    levels: Mapping[str, tuple[Any, Any]],
    metric: str,
) -> Figure:
    """Two-factor interaction plot: mean ± 95 % CI of ``metric`` at each level of ``factor_a``, one line
    per level of ``factor_b``, pooled over every other factor.

    ``levels`` maps each factor to its (low, high) levels and must contain both factors (the full
    ``factors`` mapping of the study works). Parallel lines mean no interaction; the A×B interaction
    estimate is the difference of the two lines' slopes divided by 2 (for ±1 coding, balanced data).
    """
    _check_pair(factor_a, factor_b, levels)
    _require_columns(per_seed, [factor_a, factor_b, metric])
    figure = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = figure.add_subplot()
    _draw_interaction(ax, per_seed, factor_a, factor_b, levels, metric)
    ax.set_ylabel(metric)
    return figure


def _check_pair(factor_a: str, factor_b: str, levels: Mapping[str, tuple[Any, Any]]) -> None:
    if factor_a == factor_b:
        raise ValueError(f"an interaction needs two different factors, got {factor_a!r} twice")
    missing = [factor for factor in (factor_a, factor_b) if factor not in levels]
    if missing:
        raise ValueError(f"levels has no entry for {missing}; it names {list(levels)}")


def interaction_grid(per_seed: pd.DataFrame, factors: Mapping[str, tuple[Any, Any]], metric: str) -> Figure:
    """Interaction plots of every pair of factors (k(k−1)/2 panels, in factor order), shared y axis.

    Three panels per row; unused grid cells are removed, so the Figure holds exactly one axis per pair.
    """
    names = list(factors)
    if len(names) < 2:
        raise ValueError(f"interaction_grid needs at least two factors, got {names}")
    _require_columns(per_seed, [*names, metric])
    pairs = list(itertools.combinations(names, 2))
    columns = min(3, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.2 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    for ax, (factor_a, factor_b) in zip(axes, pairs, strict=False):
        _draw_interaction(ax, per_seed, factor_a, factor_b, factors, metric)
    for ax in axes[len(pairs) :]:
        figure.delaxes(ax)
    for ax in axes[: len(pairs) : columns]:
        ax.set_ylabel(metric)
    figure.suptitle(f"Two-factor interactions on {metric} (mean ± 95 % CI)", fontsize="medium")
    return figure


def effects_forest_plot(table: pd.DataFrame) -> Figure:
    """Each subject's estimate and 95 % CI per metric, one panel per metric, coloured by reading.

    Green: the good direction (e.g. less polysemantic), red: the bad one, grey: no clear effect.
    """
    metrics = list(pd.unique(table["metric"]))
    subjects = list(pd.unique(table["subject"]))
    figure = Figure(figsize=(3.2 * len(metrics), 0.45 * len(subjects) + 1.6), layout="constrained")
    axes = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        rows = table[table["metric"] == metric].set_index("subject").reindex(subjects)
        for position, (_, row) in enumerate(rows.iterrows()):
            sign = sign_of_reading(metric, row["estimate"], row["p_holm"])
            color = {1: "tab:green", -1: "tab:red", 0: "0.5"}[sign]
            low, high = row["ci_low"], row["ci_high"]
            if pd.notna(low) and pd.notna(high):
                axis.plot([low, high], [position, position], color=color, linewidth=2)
            axis.plot([row["estimate"]], [position], "o", color=color)
        axis.axvline(0.0, color="black", linewidth=0.8)
        direction = METRIC_DIRECTIONS.get(metric)
        better = "" if direction is None else (" (← better)" if direction.better < 0 else " (better →)")
        axis.set_title(f"{metric}{better}", fontsize=10)
        axis.set_yticks(range(len(subjects)), subjects)
        axis.xaxis.set_major_locator(MaxNLocator(nbins=4))
    # The panels share their y axis: inverting it once puts the first subject on top in every panel.
    axes[0].invert_yaxis()
    figure.suptitle(
        "Effects with 95 % CIs (green: good direction, red: bad, grey: Holm p ≥ 0.05)", fontsize=10
    )
    return figure
