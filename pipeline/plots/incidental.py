"""Figures of the incidental-polysemanticity study (docs/science.md §2), built without pyplot.

Each function returns a `matplotlib.figure.Figure`; the caller decides where it goes (`fig.savefig(...)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.incidental import NOISE_TYPES, predicted_l1_norm, predicted_nonzeros
from pipeline.incidental_analysis import confidence_halfwidth

# One colour family per noise type; σ picks the shade within it (darker = larger σ), as in the published figure.
_NOISE_COLORMAPS = {"bipolar": "Reds", "gaussian": "Blues", "laplace": "Greens", "student_t": "Purples"}


# Points with a zero mean count have no place on a log axis; they are drawn at this height in axes
# coordinates (just above the bottom edge) with a "0" beside them, so they stay visible without a fake value.
ZERO_COUNT_HEIGHT = 0.03


def collisions_plot(table: pd.DataFrame) -> Figure:
    """Polysemantic neurons vs m on log–log axes, one series per λ, with the n²/(4m) prediction.

    table: one row per point with columns n, m, l1, instances, polysemantic_neurons (mean over instances),
        polysemantic_neurons_std and optionally converged (as from `collisions_table`, `collisions_summary`
        or a tracking store). Error bars are the 95 % Student-t confidence interval of the mean across
        instances. Converged points are filled; unconverged ones are hollow, in a series labelled as left out
        of the slope fit. A point whose mean is 0 has no logarithm: it is drawn as a triangle at the bottom
        edge of the axes (ZERO_COUNT_HEIGHT in axes coordinates) with the text "0", in a series of its own.
    """
    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.add_subplot()
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (l1, group) in enumerate(table.sort_values("m").groupby("l1")):
        color = cycle[index % len(cycle)]
        ms = group["m"].to_numpy()
        means = group["polysemantic_neurons"].to_numpy(dtype=float)
        converged = (
            group["converged"].to_numpy(dtype=bool) if "converged" in group else np.ones(len(group), bool)
        )
        halfwidth = confidence_halfwidth(group["polysemantic_neurons_std"], group["instances"])
        halfwidth = np.nan_to_num(halfwidth)
        lower = np.minimum(halfwidth, means * (1 - 1e-3))  # keep the lower bar above 0 on a log axis
        positive = means > 0
        for selected, label, face in (
            (positive & converged, f"λ = {l1:g} (mean, 95 % CI)", color),
            (positive & ~converged, f"λ = {l1:g} unconverged (not fitted)", "none"),
        ):
            if selected.any():
                axes.errorbar(
                    ms[selected],
                    means[selected],
                    yerr=np.vstack([lower[selected], halfwidth[selected]]),
                    fmt="o-" if face != "none" else "o",
                    color=color,
                    markerfacecolor=face,
                    capsize=4,
                    label=label,
                )
        zero = ~positive
        if zero.any():
            # x in data coordinates, y in axes coordinates: the marker sits at the bottom edge at any y range.
            axes.plot(
                ms[zero],
                np.full(zero.sum(), ZERO_COUNT_HEIGHT),
                "v",
                color=color,
                markerfacecolor="none",
                transform=axes.get_xaxis_transform(),
                label=f"λ = {l1:g}: 0 polysemantic neurons (at the bottom edge)",
            )
            for m, is_converged in zip(ms[zero], converged[zero], strict=True):
                axes.annotate(
                    "0" if is_converged else "0, unconverged",
                    (m, ZERO_COUNT_HEIGHT),
                    xycoords=axes.get_xaxis_transform(),
                    xytext=(6, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize="small",
                    color=color,
                )
    for n in sorted(table["n"].unique()):
        ms = np.geomspace(table["m"].min(), table["m"].max(), 100)
        suffix = f" (n = {n})" if table["n"].nunique() > 1 else ""
        axes.plot(ms, n * n / (4 * ms), "k--", label=f"prediction n²/(4m){suffix}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("hidden neurons m")
    axes.set_ylabel("polysemantic neurons")
    n_values = ", ".join(str(n) for n in sorted(table["n"].unique()))
    axes.set_title(f"Incidental polysemantic neurons, n = {n_values}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def _label_colors(labels: Sequence[str]) -> dict[str, Any]:
    """Colour per label: a noise family's colormap when the label starts with a noise type, else the cycle."""
    families: dict[str, list[str]] = {}
    for label in labels:
        family = label.split()[0] if label.split() else ""
        families.setdefault(family if family in NOISE_TYPES else "", []).append(label)
    colors: dict[str, Any] = {}
    cycle = iter(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
    for family, members in families.items():
        if family in _NOISE_COLORMAPS:
            colormap = matplotlib.colormaps[_NOISE_COLORMAPS[family]]
            for rank, label in enumerate(members):
                colors[label] = colormap(0.45 + 0.5 * (rank + 1) / len(members))
        else:
            for label in members:
                colors[label] = next(cycle)
    return colors


def fourth_norm_plot(
    curves_by_label: Mapping[str, Mapping[str, Sequence[float]]], m: int | None = None
) -> Figure:
    """Mean fourth norm Σ_j W_ij⁴ over training steps for each label (log–log, as in the published figure).

    curves_by_label: {label: curves} with "step" and "fourth_norm" lists (see `curves_by_label`); labels that
        start with a noise type ("bipolar σ=0.1") are coloured by family and shaded by order.
    m: hidden size; when given, draws the isotropic level 3/(m+2) (a random unit direction, where Gaussian noise
        keeps the encodings) dashed and the init expectation 3/m dotted. One-hot encodings sit at 1.
    """
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    colors = _label_colors(list(curves_by_label))
    for label, curves in curves_by_label.items():
        steps = np.asarray(curves["step"], dtype=float)
        values = np.asarray(curves["fourth_norm"], dtype=float)
        positive = steps > 0  # step 0 has no place on a log axis
        axes.plot(steps[positive], values[positive], color=colors[label], label=label)
    if m is not None:
        axes.axhline(3 / (m + 2), color="black", linestyle="--", linewidth=1, label=f"3/(m+2), m = {m}")
        axes.axhline(3 / m, color="grey", linestyle=":", linewidth=1, label="3/m (init expectation)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("training step")
    axes.set_ylabel("mean fourth norm Σ_j W_ij⁴")
    axes.set_title("Sparsification by hidden-layer noise")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    return figure


def sparsification_plot(simulations: Sequence[Mapping[str, Any]]) -> Figure:
    """‖w‖₁ (left) and non-zeros m′ (right) vs t on log–log axes, predictions dashed, one colour per run.

    simulations: outputs of `simulate_sparsification` (they carry "m" and "l1", from which the predictions
        1/(1/√m + λt) and its square are drawn).
    """
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    l1_axes, nonzeros_axes = figure.subplots(1, 2)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, simulation in enumerate(simulations):
        color = cycle[index % len(cycle)]
        times = np.asarray(simulation["t"], dtype=float)
        positive = times > 0
        m, l1 = simulation["m"], simulation["l1"]
        label = f"m = {m}, λ = {l1:g}"
        l1_axes.plot(times[positive], np.asarray(simulation["l1_norm"])[positive], color=color, label=label)
        l1_axes.plot(times[positive], predicted_l1_norm(m, l1, times[positive]), "--", color=color)
        nonzeros_axes.plot(
            times[positive], np.asarray(simulation["nonzeros"])[positive], color=color, label=label
        )
        nonzeros_axes.plot(times[positive], predicted_nonzeros(m, l1, times[positive]), "--", color=color)
    for axes, name in ((l1_axes, "‖w‖₁"), (nonzeros_axes, "non-zeros m′")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("t")
        axes.set_ylabel(name)
        axes.grid(True, which="both", alpha=0.3)
        axes.plot([], [], "k--", label="prediction")
        axes.legend(fontsize="small")
    l1_axes.set_title("‖w‖₁ vs 1/(1/√m + λt)")
    nonzeros_axes.set_title("m′ vs ‖w‖₁² prediction")
    nonzeros_axes.set_ylim(bottom=0.5)
    return figure


def cooccurrence_plot(summary: pd.DataFrame) -> Figure:
    """Left: polysemantic neurons vs p, one series per m (mean, 95 % CI over instances), p = 0 drawn on a
    symmetric-log axis with its linear part below the smallest positive p. Right: the same counts vs m/n, one
    series per p, with the basis-data law n²/(4m) and the capacity bound (n − m)₊ (superposition for m < n).

    summary: `pipeline.incidental_analysis.cooccurrence_summary`.
    """
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    by_p, by_m = figure.subplots(1, 2)
    positive = summary["p"][summary["p"] > 0]
    threshold = float(positive.min()) if len(positive) else 1e-3
    colormap = matplotlib.colormaps["viridis"]
    ms = sorted(summary["m"].unique())
    for index, m in enumerate(ms):
        group = summary[summary["m"] == m].sort_values("p")
        color = colormap(index / max(len(ms) - 1, 1))
        means = group["polysemantic_neurons"].to_numpy(dtype=float)
        errors = np.vstack([means - group["ci_low"], group["ci_high"] - means])
        n = int(group["n"].iloc[0])
        by_p.errorbar(
            group["p"], means, yerr=np.nan_to_num(errors), fmt="o-", color=color, capsize=3,
            label=f"m = {m} (m/n = {m / n:g})",
        )  # fmt: skip
    by_p.set_xscale("symlog", linthresh=threshold)
    by_p.set_xlim(left=0)
    by_p.set_xlabel("p (each feature on independently with probability p)")
    by_p.set_ylabel("polysemantic neurons (mean, 95 % CI)")
    by_p.set_title("Polysemantic neurons vs co-occurrence")
    by_p.grid(True, which="both", alpha=0.3)
    by_p.legend(fontsize="small")
    ps = sorted(summary["p"].unique())
    plasma = matplotlib.colormaps["plasma"]
    for index, p in enumerate(ps):
        group = summary[summary["p"] == p].sort_values("m")
        means = group["polysemantic_neurons"].to_numpy(dtype=float)
        errors = np.vstack([means - group["ci_low"], group["ci_high"] - means])
        by_m.errorbar(
            group["m_over_n"], means, yerr=np.nan_to_num(errors), fmt="o-",
            color=plasma(0.85 * index / max(len(ps) - 1, 1)), capsize=3, label=f"p = {p:g}",
        )  # fmt: skip
    ratios = np.geomspace(summary["m_over_n"].min(), summary["m_over_n"].max(), 100)
    n = int(summary["n"].iloc[0])
    by_m.plot(ratios, n / (4 * ratios), "k--", label="n²/(4m) (incidental, p = 0)")
    by_m.plot(ratios, np.maximum(n - ratios * n, 0), "k:", label="(n − m)₊ (capacity)")
    by_m.axvline(1.0, color="grey", linewidth=0.8)
    by_m.set_xscale("log", base=2)
    by_m.set_xlabel("m / n")
    by_m.set_ylabel("polysemantic neurons")
    by_m.set_title(f"Superposition (m < n) to incidental (m > n), n = {n}")
    by_m.grid(True, which="both", alpha=0.3)
    by_m.legend(fontsize="small", ncol=2)
    return figure


def splitting_plot(summary: Any, splits: Mapping[str, pd.DataFrame]) -> Figure:
    """The splitting remedy from stored arms. Top left: the resolved fraction vs extra steps per arm (pooled
    over instances, 95 % cluster-bootstrap band). Top right: polysemantic neurons vs extra steps. Bottom:
    before/after for the split arm with the most resolved neurons: each feature of each split neuron as a
    point (weight on copy 1, weight on copy 2) right after the split (left) and after training on (right),
    coloured by its neuron's outcome; resolved features end on an axis, each pair on different axes.

    summary: `pipeline.incidental_analysis.SplittingSummary`; splits: {arm: splits.csv}.
    """
    figure = Figure(figsize=(12, 9), layout="constrained")
    (resolved_axes, count_axes), (start_axes, end_axes) = figure.subplots(2, 2)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (arm, group) in enumerate(summary.curves.groupby("arm", sort=False)):
        color = "black" if arm.startswith("baseline") else cycle[index % len(cycle)]
        style = "--" if arm.startswith("baseline") else "-"
        resolved_axes.plot(group["step"], group["resolved_fraction"], style, color=color, label=arm)
        resolved_axes.fill_between(group["step"], group["ci_low"], group["ci_high"], color=color, alpha=0.15)
        count_axes.plot(group["step"], group["polysemantic_neurons"], style, color=color, label=arm)
    resolved_axes.set_xlabel("extra training steps")
    resolved_axes.set_ylabel("fraction of split neurons resolved")
    resolved_axes.set_ylim(-0.02, 1.02)
    resolved_axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    resolved_axes.set_title("Resolved: each copy carries one of the neuron's features")
    count_axes.set_xlabel("extra training steps")
    count_axes.set_ylabel("polysemantic neurons (mean over instances)")
    count_axes.set_title("Polysemantic neurons after the split")
    for axes in (resolved_axes, count_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    split_arms = [arm for arm in splits if not arm.startswith("baseline") and len(splits[arm])]
    if split_arms:
        shown = max(split_arms, key=lambda arm: (splits[arm]["outcome"] == "resolved").mean())
        table = splits[shown]
        colors = {"resolved": "tab:green", "recollided": "tab:red", "other": "tab:grey"}
        for axes, first, second, when in (
            (start_axes, "first_start", "second_start", "right after the split"),
            (end_axes, "first_after", "second_after", "after training on"),
        ):
            for name, color in colors.items():
                selected = table[table["outcome"] == name]
                axes.scatter(selected[first], selected[second], s=14, color=color, alpha=0.7, label=name)
            axes.axhline(0, color="black", linewidth=0.5)
            axes.axvline(0, color="black", linewidth=0.5)
            axes.set_xlim(-1.3, 1.3)
            axes.set_ylim(-1.3, 1.3)
            axes.set_aspect("equal")
            axes.set_xlabel("weight on copy 1")
            axes.set_ylabel("weight on copy 2")
            axes.set_title(f"{shown}: features of split neurons, {when}")
            axes.legend(fontsize="small", title="neuron's outcome")
    else:
        for axes in (start_axes, end_axes):
            axes.set_axis_off()
    return figure
