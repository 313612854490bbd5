"""The three incidental-polysemanticity experiments (SCIENCE.md §2) as pure functions returning plain data.

- collisions: polysemantic neurons vs m against n²/(4m), L1 as the winner-take-all force (§2.2);
- noise: fourth norm under hidden-layer noise of negative, zero and positive excess kurtosis (§2.3);
- dynamics: the sparsification ODE against its closed-form prediction (§2.4).

A point is one config; `run_point` trains it and returns params (the flattened config), scalar metrics,
per-instance rows and curves, so a tracking layer can log each point as one run. Nothing here writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from pipeline import stats
from pipeline.config_tools import flatten
from pipeline.experiments.incidental_defaults import COLLISIONS, DYNAMICS, NOISE
from pipeline.incidental import (
    CONVERGENCE_THRESHOLD,
    SPARSIFICATION_MIDDLE_WINDOW,
    Convergence,
    IncidentalConfig,
    assess_convergence,
    noise_excess_kurtosis,
    predicted_l1_norm,
    predicted_nonzeros,
    predicted_polysemantic_neurons,
    simulate_sparsification,
    train_incidental,
)
from pipeline.tables import format_number, markdown_table

# The scalar metrics of one trained point, in this order.
POINT_METRICS = (
    "polysemantic_neurons",
    "polysemantic_neurons_std",
    "predicted_polysemantic_neurons",
    "fourth_norm",
    "initial_collisions",
    "winner_was_initial_argmax",
    "opposite_sign_fraction",
    "final_loss",
    "encoding_sparsity_min",
    "unconverged_instances",
    "converged",
)


@dataclass
class PointResult:
    """One trained point.

    params: the flattened config (every IncidentalConfig field).
    metrics: exactly POINT_METRICS; means over instances unless the name says otherwise.
        polysemantic_neurons_std is the sample standard deviation across instances (NaN with one instance);
        opposite_sign_fraction pools all instances (opposite-sign polysemantic neurons / polysemantic neurons,
        NaN when there are none). encoding_sparsity_min, unconverged_instances and converged (1/0) are the
        convergence check of an L1 point (`pipeline.incidental.assess_convergence`); NaN for a noise point,
        where sparsification is the outcome being measured (Gaussian noise is expected to stay dense).
    convergence: that check, None for a noise point.
    per_instance: one row per instance: "instance" (global index) and every measurement of
        `pipeline.incidental.measure_instances`.
    curves: "step", "loss", "fourth_norm", "polysemantic_neurons" (means over instances).
    initial_weights, final_weights: [instance, n, m] CPU tensors.
    """

    config: IncidentalConfig
    params: dict[str, Any]
    metrics: dict[str, float]
    per_instance: pd.DataFrame
    curves: dict[str, list[float]]
    initial_weights: torch.Tensor
    final_weights: torch.Tensor
    wall_time_s: float
    convergence: Convergence | None = None


def run_point(config: IncidentalConfig, progress: Callable[[int], None] | None = None) -> PointResult:
    """Train one config (all its instances in one batched pass) and summarise it."""
    result = train_incidental(config, progress=progress)
    per_instance = pd.DataFrame({"instance": result.instance_indices, **result.measurements})
    counts = per_instance["polysemantic_neurons"]
    polysemantic_total = counts.sum()
    metrics = {
        "polysemantic_neurons": float(counts.mean()),
        "polysemantic_neurons_std": float(counts.std(ddof=1)) if len(counts) > 1 else math.nan,
        "predicted_polysemantic_neurons": predicted_polysemantic_neurons(config.n, config.m),
        "fourth_norm": float(per_instance["fourth_norm"].mean()),
        "initial_collisions": float(per_instance["initial_collisions"].mean()),
        "winner_was_initial_argmax": float(per_instance["winner_was_initial_argmax"].mean()),
        "opposite_sign_fraction": (
            float(per_instance["opposite_sign_neurons"].sum() / polysemantic_total)
            if polysemantic_total > 0
            else math.nan
        ),
        "final_loss": float(per_instance["final_loss"].mean()),
    }
    convergence = assess_convergence(per_instance["encoding_sparsity"]) if config.noise == "none" else None
    metrics |= {
        "encoding_sparsity_min": convergence.lowest_sparsity if convergence else math.nan,
        "unconverged_instances": float(convergence.unconverged_instances) if convergence else math.nan,
        "converged": float(convergence.converged) if convergence else math.nan,
    }
    return PointResult(
        config=config,
        params=flatten(config),
        metrics={name: metrics[name] for name in POINT_METRICS},
        per_instance=per_instance,
        curves=result.curves,
        initial_weights=result.initial_weights,
        final_weights=result.final_weights,
        wall_time_s=result.wall_time_s,
        convergence=convergence,
    )


# ------------------------------------------------------------------------------------------------------------
# Experiment 1: collisions and the n²/(4m) law


def collisions_points(
    n: int = COLLISIONS["n"],
    ms: Iterable[int] = COLLISIONS["ms"],
    l1_values: Iterable[float] = COLLISIONS["l1_values"],
    instances: int = COLLISIONS["instances"],
    steps: int = COLLISIONS["steps"],
    **overrides: Any,
) -> list[IncidentalConfig]:
    """Configs of the collision sweep, ordered by λ then m.

    Defaults: the published recipe (AdamW lr 1e-3, torch's weight decay 0.01, 16 instances) at n = 64, trained
    for 12 000 steps instead of the published 7500: at m = n = 64 the encodings sparsify (every instance at
    CONVERGENCE_THRESHOLD) only at 8750–9000 steps (seeds 0–3), and 7500 steps leave its count about 4 % low.
    The sweep takes about 70 s on an idle 2-core CPU. The published figure used n = 256, m = 256…4096 and
    λ ∈ {1e-3, 1e-2, 1e-1}. `overrides` go to every IncidentalConfig (seed, lr, device, …).
    """
    return [
        IncidentalConfig(n=n, m=m, l1=l1, instances=instances, steps=steps, **overrides)
        for l1 in l1_values
        for m in ms
    ]


def confidence_halfwidth(std: Any, count: Any, level: float = 0.95) -> np.ndarray:
    """Half-width of the Student-t confidence interval of a mean: t_{(1+level)/2, k−1}·s/√k (NaN for k < 2)."""
    std = np.asarray(std, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        quantile = scipy.stats.t.ppf((1 + level) / 2, count - 1)
        return np.where(count > 1, quantile * std / np.sqrt(count), np.nan)


def collisions_table(points: Sequence[PointResult]) -> pd.DataFrame:
    """One row per point: n, m, l1, instances, steps, the metrics, the 95 % CI of the mean count and the
    convergence check: converged (bool) and convergence (why not, "" when converged; `Convergence.reason`)."""
    rows = [
        {
            "n": point.config.n,
            "m": point.config.m,
            "l1": point.config.l1,
            "instances": point.config.instances,
            "steps": point.config.steps,
            **point.metrics,
        }
        for point in points
    ]
    table = pd.DataFrame(rows)
    checks = [
        point.convergence or assess_convergence(point.per_instance["encoding_sparsity"]) for point in points
    ]
    table["converged"] = [check.converged for check in checks]
    table["convergence"] = [check.reason() for check in checks]
    halfwidth = confidence_halfwidth(table["polysemantic_neurons_std"], table["instances"])
    table["polysemantic_neurons_ci_low"] = table["polysemantic_neurons"] - halfwidth
    table["polysemantic_neurons_ci_high"] = table["polysemantic_neurons"] + halfwidth
    return table


def loglog_slope(ms: Sequence[float], counts: Sequence[float]) -> tuple[float, float, float, float]:
    """OLS fit of log(count) on log(m): (slope, intercept, slope 95 % CI low, high). Theory: slope −1.

    Points with a zero count have no logarithm and are dropped; the CI uses the Student-t quantile with
    (points − 2) degrees of freedom on scipy.stats.linregress's standard error (NaN with fewer than 3 points).
    """
    ms = np.asarray(ms, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    log_m, log_count = np.log(ms[keep]), np.log(counts[keep])
    if log_m.size < 2:
        return (math.nan, math.nan, math.nan, math.nan)
    fit = scipy.stats.linregress(log_m, log_count)
    if log_m.size < 3:
        return (float(fit.slope), float(fit.intercept), math.nan, math.nan)
    halfwidth = scipy.stats.t.ppf(0.975, log_m.size - 2) * fit.stderr
    return (
        float(fit.slope),
        float(fit.intercept),
        float(fit.slope - halfwidth),
        float(fit.slope + halfwidth),
    )


def suggested_steps(steps: int) -> int:
    """Steps to suggest for a rerun of an unconverged sweep: twice as many, and at least the default sweep's
    (which converges at every default m), rounded up to a thousand."""
    return int(math.ceil(max(2 * steps, COLLISIONS["steps"]) / 1000) * 1000)


def usable_for_fit(summary: pd.DataFrame) -> pd.Series:
    """Rows of a collisions table the log–log fit can use: converged, with a positive mean count. [row] bool.

    A table without a `converged` column (built before the check existed) counts every row as converged.
    """
    converged = summary["converged"].astype(bool) if "converged" in summary else True
    return (summary["polysemantic_neurons"] > 0) & converged


def unconverged_notes(summary: pd.DataFrame) -> list[str]:
    """One sentence per unconverged point of a collisions table, then the rerun hint; [] when all converged.

    summary: `collisions_table` or `collisions_summary` (columns n, l1, m, steps, converged, convergence).
    """
    if "converged" not in summary:
        return []
    flagged = summary[~summary["converged"].astype(bool)]
    if flagged.empty:
        return []
    notes = [
        f"unconverged: n = {row.n}, λ = {row.l1:g}, m = {row.m} after {row.steps} steps: {row.convergence}; "
        "left out of the slope fit"
        for row in flagged.itertuples()
    ]
    notes.append(
        "the encodings of these points have not sparsified yet, so their counts are still rising: rerun "
        f"with more steps, e.g. --steps {suggested_steps(int(flagged['steps'].max()))}"
    )
    return notes


def slope_sentence(row: Any) -> str:
    """One line for a `slope_table` row: the slope with its CI, or why there is none."""
    head = f"n = {row.n}, λ = {row.l1:g}: "
    if row.points < 2:
        return head + f"no log–log slope: {row.note}"
    interval = (
        f"95 % CI {row.slope_ci_low:.3f} to {row.slope_ci_high:.3f}"
        if math.isfinite(row.slope_ci_low)
        else "no CI with 2 points"
    )
    text = f"log–log slope {row.slope:.3f} ({interval}, {row.points} points; theory −1)"
    return head + text + (f"; {row.note}" if row.note else "")


# ------------------------------------------------------------------------------------------------------------
# Experiment 2: noise as the winner-take-all force


def noise_points(
    n: int = NOISE["n"],
    m: int = NOISE["m"],
    instances: int = NOISE["instances"],
    steps: int = NOISE["steps"],
    sigmas: Iterable[float] = NOISE["sigmas"],
    noise_types: Iterable[str] = NOISE["noise_types"],
    optimizer: str = NOISE["optimizer"],
    lr: float = NOISE["lr"],
    l1: float = NOISE["l1"],
    **overrides: Any,
) -> list[IncidentalConfig]:
    """Configs of the noise comparison, ordered by noise type then σ.

    Published run (seed 003 code): n = 8, m = 16, 5 instances, plain SGD lr 0.02, λ = 0, 100 000 steps,
    Bernoulli and Gaussian noise at σ ∈ {0.07, 0.1, 0.15}. The default here stops at 20 000 steps so all
    twelve points run in 30–45 s on a 2-core CPU; pass steps=100_000 for the published length.
    Noise is drawn per sample by default; noise_sharing="per_step" reproduces the published sharing.
    """
    weight_decay = overrides.pop("weight_decay", 0.01 if optimizer == "adamw" else 0.0)
    return [
        IncidentalConfig(
            n=n,
            m=m,
            instances=instances,
            steps=steps,
            noise=noise,
            sigma=sigma,
            optimizer=optimizer,
            lr=lr,
            l1=l1,
            weight_decay=weight_decay,
            **overrides,
        )
        for noise in noise_types
        for sigma in sigmas
    ]


def noise_label(config: IncidentalConfig) -> str:
    """Legend label of a noise point, e.g. "bipolar σ=0.1" (the noise type comes first)."""
    return f"{config.noise} σ={config.sigma:g}"


def curves_by_label(points: Sequence[PointResult]) -> dict[str, dict[str, list[float]]]:
    """{noise_label: curves} for `pipeline.plots.incidental.fourth_norm_plot`."""
    return {noise_label(point.config): point.curves for point in points}


# ------------------------------------------------------------------------------------------------------------
# Experiment 3: speed of sparsification


@dataclass
class DynamicsPoint:
    """One simulated encoding against the prediction.

    params: m, l1, dt, t_max, seed.
    metrics: completion_time (first t with m′ ≤ 1), completion_time_times_l1 (documented 1.6–2),
        nonzeros_ratio_median/min/max (m′ over ‖w‖₁²-prediction for t·λ in SPARSIFICATION_MIDDLE_WINDOW;
        documented 2–2.7), l1_norm_ratio_median (‖w‖₁ over its prediction, same window).
    simulation: `simulate_sparsification`'s output plus "predicted_l1_norm" and "predicted_nonzeros" arrays.
    """

    params: dict[str, Any]
    metrics: dict[str, float]
    simulation: dict[str, Any]


def dynamics(
    m: int = DYNAMICS["m"],
    l1_values: Iterable[float] = DYNAMICS["l1_values"],
    t_max_times_l1: float = DYNAMICS["t_max_times_l1"],
    dt: float = DYNAMICS["dt"],
    seed: int = DYNAMICS["seed"],
) -> list[DynamicsPoint]:
    """Simulate the sparsification ODE for each λ up to t = t_max_times_l1/λ and compare with the prediction.

    Defaults keep λ√m ≤ 0.1 (the regime the prediction assumes) and finish in about a second; the published
    simulation used m = 1e5, λ = 1e-5 and initial standard deviation 0.9/√m.
    """
    points = []
    for l1 in l1_values:
        t_max = t_max_times_l1 / l1
        simulation = simulate_sparsification(m, l1, t_max, dt=dt, seed=seed)
        times = simulation["t"]
        simulation["predicted_l1_norm"] = predicted_l1_norm(m, l1, times)
        simulation["predicted_nonzeros"] = predicted_nonzeros(m, l1, times)
        low, high = SPARSIFICATION_MIDDLE_WINDOW
        middle = (times * l1 >= low) & (times * l1 <= high)
        nonzeros_ratio = simulation["nonzeros"][middle] / simulation["predicted_nonzeros"][middle]
        l1_ratio = simulation["l1_norm"][middle] / simulation["predicted_l1_norm"][middle]
        completion = simulation["completion_time"]
        metrics = {
            "completion_time": float(completion),
            "completion_time_times_l1": float(completion * l1),
            "nonzeros_ratio_median": float(np.median(nonzeros_ratio)),
            "nonzeros_ratio_min": float(nonzeros_ratio.min()),
            "nonzeros_ratio_max": float(nonzeros_ratio.max()),
            "l1_norm_ratio_median": float(np.median(l1_ratio)),
        }
        params = {"m": m, "l1": l1, "dt": dt, "t_max": t_max, "seed": seed}
        points.append(DynamicsPoint(params=params, metrics=metrics, simulation=simulation))
    return points


def summarize_points(points: Sequence[PointResult], keys: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per point: the chosen params (default n, m, l1, noise, sigma, noise_sharing) and all metrics."""
    columns = keys or {name: name for name in ("n", "m", "l1", "noise", "sigma", "noise_sharing")}
    return pd.DataFrame(
        [{label: point.params[name] for label, name in columns.items()} | point.metrics for point in points]
    )


# ------------------------------------------------------------------------------------------------------------
# Report: tables and figures from stored per-instance values (no tracking store here; `tracking/incidental.py`
# fetches the frames and logs the files written by `IncidentalReport.write`).

# Documented behaviour of the sparsification ODE (SCIENCE.md §2.4), shown beside the measured values.
_DYNAMICS_EXPECTATIONS = {
    "completion_time_times_l1": "1.6–2 (prediction: 1)",
    "nonzeros_ratio_median": "2–2.7 (prediction: 1)",
    "l1_norm_ratio_median": "prediction: 1",
}


def collisions_summary(per_instance: pd.DataFrame) -> pd.DataFrame:
    """Observed against predicted polysemantic neurons, one row per (n, l1, m).

    per_instance: one row per trained instance with columns n, m, l1, steps, polysemantic_neurons and
    encoding_sparsity (runs logged before that column existed fall back to the raw fourth norm, which is
    ≤ the direction one for encodings no longer than 1, so the check can only get stricter).
    Returns n, l1, m, instances, steps, polysemantic_neurons (mean), polysemantic_neurons_std, ci_low, ci_high
    (95 % Student-t interval of the mean, `pipeline.stats.describe`), predicted_polysemantic_neurons
    (n²/(4m)), observed_over_predicted, converged, unconverged_instances, encoding_sparsity_min and
    convergence (`pipeline.incidental.assess_convergence`). The column names match what
    `pipeline.plots.incidental.collisions_plot` reads.
    """
    sparsity_column = "encoding_sparsity" if "encoding_sparsity" in per_instance else "fourth_norm"
    rows = []
    for (n, l1, m), group in per_instance.groupby(["n", "l1", "m"], sort=True):
        description = stats.describe(group["polysemantic_neurons"].to_numpy(dtype=float))
        predicted = predicted_polysemantic_neurons(int(n), int(m))
        convergence = assess_convergence(group[sparsity_column].to_numpy(dtype=float))
        rows.append(
            {
                "n": int(n),
                "l1": float(l1),
                "m": int(m),
                "instances": int(description["n"]),
                "steps": int(group["steps"].max()) if "steps" in group else 0,
                "polysemantic_neurons": description["mean"],
                "polysemantic_neurons_std": description["std"],
                "ci_low": description["ci_low"],
                "ci_high": description["ci_high"],
                "predicted_polysemantic_neurons": predicted,
                "observed_over_predicted": description["mean"] / predicted,
                "converged": convergence.converged,
                "unconverged_instances": convergence.unconverged_instances,
                "encoding_sparsity_min": convergence.lowest_sparsity,
                "convergence": convergence.reason(),
            }
        )
    return pd.DataFrame(rows)


def slope_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The fitted log–log slope of mean count on m for each (n, l1) of a collisions table (theory −1).

    Only converged points with a positive mean enter the fit (`usable_for_fit`): an unconverged count is
    still rising, a zero count has no logarithm. Columns n, l1, points (the m values fitted), unconverged
    and zero_count (points left out, by reason; a point that is both counts as unconverged), slope,
    intercept, slope_ci_low, slope_ci_high (`loglog_slope`; NaN below 2 points, the CI below 3) and note
    (which points were left out and why, and why there is no slope when there is none; "" otherwise).
    """
    rows = []
    for (n, l1), group in summary.groupby(["n", "l1"], sort=True):
        usable = usable_for_fit(group)
        unconverged = ~group["converged"].astype(bool) if "converged" in group else usable & False
        zero = ~usable & ~unconverged
        slope, intercept, low, high = loglog_slope(group["m"][usable], group["polysemantic_neurons"][usable])
        left_out = []
        if unconverged.any():
            listed = ", ".join(str(m) for m in group["m"][unconverged])
            left_out.append(f"m = {listed} unconverged (rerun with more steps)")
        if zero.any():
            listed = ", ".join(str(m) for m in group["m"][zero])
            left_out.append(f"m = {listed} with 0 polysemantic neurons (no logarithm)")
        note = "left out: " + "; ".join(left_out) if left_out else ""
        if usable.sum() < 2:
            note = f"{int(usable.sum())} usable point(s) of {len(group)}, a fit needs 2" + (
                f"; {note}" if note else ""
            )
        rows.append(
            {
                "n": int(n),
                "l1": float(l1),
                "points": int(usable.sum()),
                "unconverged": int(unconverged.sum()),
                "zero_count": int(zero.sum()),
                "slope": slope,
                "intercept": intercept,
                "slope_ci_low": low,
                "slope_ci_high": high,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def noise_summary(per_instance: pd.DataFrame) -> pd.DataFrame:
    """Final fourth norm and polysemantic count per (noise, sigma), mean and 95 % CI over instances.

    per_instance: one row per instance with columns noise, sigma, nu, m, fourth_norm, fourth_norm_initial and
    polysemantic_neurons. excess_kurtosis is κ of the noise family; isotropic_fourth_norm is 3/(m+2), where a
    unit-length encoding without a privileged basis sits (SCIENCE.md §2.3).
    """
    rows = []
    for (noise, sigma), group in per_instance.groupby(["noise", "sigma"], sort=False):
        fourth = stats.describe(group["fourth_norm"].to_numpy(dtype=float))
        counts = stats.describe(group["polysemantic_neurons"].to_numpy(dtype=float))
        m = int(group["m"].iloc[0])
        rows.append(
            {
                "noise": noise,
                "sigma": float(sigma),
                "excess_kurtosis": noise_excess_kurtosis(noise, float(group["nu"].iloc[0])),
                "instances": int(fourth["n"]),
                "fourth_norm": fourth["mean"],
                "fourth_norm_ci_low": fourth["ci_low"],
                "fourth_norm_ci_high": fourth["ci_high"],
                "fourth_norm_initial": float(group["fourth_norm_initial"].mean()),
                "isotropic_fourth_norm": 3 / (m + 2),
                "polysemantic_neurons": counts["mean"],
                "polysemantic_neurons_ci_low": counts["ci_low"],
                "polysemantic_neurons_ci_high": counts["ci_high"],
            }
        )
    return pd.DataFrame(rows)


def noise_comparison(
    per_instance: pd.DataFrame,
    *,
    baseline: str = "gaussian",
    metrics: Sequence[str] = ("fourth_norm", "polysemantic_neurons"),
    paired: bool = False,
    n_resamples: int = 9999,
) -> pd.DataFrame:
    """Every noise type against `baseline` at the same σ, per metric (`pipeline.stats.compare_to_baseline`).

    Welch's t-test by default. paired=True pairs instance k of both noise types: they start from the same
    initial weights (the init stream does not depend on the noise), so the instance pairs the data.
    The multiple-testing family is the whole returned table (every σ, noise type and metric): p_holm and p_bh
    are recomputed over it. σ values without a `baseline` point are left out. Columns: sigma, then
    `pipeline.stats.COMPARISON_COLUMNS` (config_a = the noise type, config_b = the baseline).
    """
    tables = []
    for sigma, group in per_instance.groupby("sigma", sort=True):
        if baseline not in set(group["noise"]) or group["noise"].nunique() < 2:
            continue
        table = stats.compare_to_baseline(
            group,
            config_column="noise",
            metrics=list(metrics),
            baseline=baseline,
            paired=paired,
            seed_column="instance",
            n_resamples=n_resamples,
        )
        tables.append(table.assign(sigma=float(sigma)))
    if not tables:
        return pd.DataFrame(columns=["sigma", *stats.COMPARISON_COLUMNS])
    combined = pd.concat(tables, ignore_index=True)
    combined["p_holm"] = stats.adjust_pvalues(combined["p"].to_numpy(dtype=float), "holm")
    combined["p_bh"] = stats.adjust_pvalues(combined["p"].to_numpy(dtype=float), "fdr_bh")
    return combined[["sigma", *stats.COMPARISON_COLUMNS]]


def converged_column(table: pd.DataFrame) -> list[str]:
    """ "yes" or "no" per row of a collisions table ("–" when it predates the check); the reasons are in
    `unconverged_notes`."""
    if "converged" not in table:
        return ["–"] * len(table)
    return ["yes" if converged else "no" for converged in table["converged"]]


def _interval(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"[{format_number(low)}, {format_number(high)}]"


def _intervals(frame: pd.DataFrame, low: str, high: str) -> list[str]:
    """`_interval` of each row's `low` and `high` columns."""
    return [_interval(a, b) for a, b in zip(frame[low], frame[high], strict=True)]


def collisions_display(table: pd.DataFrame) -> pd.DataFrame:
    """The observed-against-predicted table as people read it, from `collisions_summary` (the report) or
    `collisions_table` (a command's freshly trained points): one function, so both show the same thing."""
    low, high = (
        ("ci_low", "ci_high")
        if "ci_low" in table
        else ("polysemantic_neurons_ci_low", "polysemantic_neurons_ci_high")
    )
    return pd.DataFrame(
        {
            "n": table["n"],
            "λ": table["l1"],
            "m": table["m"],
            "instances": table["instances"],
            "polysemantic (mean)": table["polysemantic_neurons"],
            "95 % CI": _intervals(table, low, high),
            "predicted n²/(4m)": table["predicted_polysemantic_neurons"],
            "observed / predicted": table["polysemantic_neurons"] / table["predicted_polysemantic_neurons"],
            "converged": converged_column(table),
        }
    )


@dataclass
class IncidentalReport:
    """Tables, figures and notes of the incidental study; `write` puts them on disk. Absent parts are None."""

    collisions: pd.DataFrame | None
    slopes: pd.DataFrame | None
    noise: pd.DataFrame | None
    comparisons: pd.DataFrame | None
    dynamics: pd.DataFrame | None
    per_instance: pd.DataFrame
    figures: dict[str, Any]
    notes: list[str]
    baseline: str

    def headline(self) -> str:
        """The notes and the fitted slopes: short enough for a run description."""
        lines = [f"- {note}" for note in self.notes]
        if self.slopes is not None:
            lines += [f"- {slope_sentence(row)}" for row in self.slopes.itertuples()]
        if self.collisions is not None:
            lines += [f"- {note}" for note in unconverged_notes(self.collisions)]
        return "\n".join(lines)

    def markdown(self) -> str:
        sections = ["# Incidental polysemanticity report", ""]
        sections += [f"- {note}" for note in self.notes] + [""]
        if self.collisions is not None:
            shown = collisions_display(self.collisions)
            sections += [
                "## Polysemantic neurons against n²/(4m) (SCIENCE.md §2.2)",
                "",
                markdown_table(shown),
                "",
                f"Converged: every instance has encoding sparsity (mean over features of "
                f"Σ_j W_ij⁴ / (Σ_j W_ij²)²) ≥ {CONVERGENCE_THRESHOLD:g}; one-hot encodings give 1, the "
                "random init 3/(m+2).",
            ]
            flagged = unconverged_notes(self.collisions)
            if flagged:
                sections += ["", "### Unconverged points", ""] + [f"- {note}" for note in flagged]
            sections += ["", "## Log–log slope of the mean count on m (theory −1)", ""]
            slopes = self.slopes.assign(ci=_intervals(self.slopes, "slope_ci_low", "slope_ci_high"))
            sections += [
                markdown_table(
                    slopes.rename(columns={"l1": "λ", "ci": "95 % CI"}),
                    ["n", "λ", "points", "slope", "95 % CI", "intercept", "note"],
                ),
                "",
            ]
        if self.noise is not None:
            shown = pd.DataFrame(
                {
                    "noise": self.noise["noise"],
                    "σ": self.noise["sigma"],
                    "κ": self.noise["excess_kurtosis"],
                    "instances": self.noise["instances"],
                    "fourth norm": self.noise["fourth_norm"],
                    "95 % CI": _intervals(self.noise, "fourth_norm_ci_low", "fourth_norm_ci_high"),
                    "at init": self.noise["fourth_norm_initial"],
                    "3/(m+2)": self.noise["isotropic_fourth_norm"],
                    "polysemantic (mean)": self.noise["polysemantic_neurons"],
                }
            )
            sections += [
                "## Final fourth norm Σ_j W_ij⁴ by noise type (SCIENCE.md §2.3)",
                "",
                markdown_table(shown),
            ]
            sections += ["", f"## Each noise type against {self.baseline} at the same σ", ""]
            if self.comparisons is not None and len(self.comparisons):
                columns = ["metric", "sigma", "config_a", "n_a", "n_b", "mean_a", "mean_b", "diff"]
                columns += ["ci_low", "ci_high", "t", "df", "p", "p_holm", "g"]
                readable = self.comparisons[columns].rename(columns={"config_a": "noise", "sigma": "σ"})
                sections += [markdown_table(readable), ""]
            else:
                sections += [f"(no σ has both {self.baseline} and another noise type)", ""]
        if self.dynamics is not None:
            columns = ["m", "l1", "t_max", "completion_time_times_l1", "nonzeros_ratio_median"]
            columns += ["nonzeros_ratio_min", "nonzeros_ratio_max", "l1_norm_ratio_median"]
            shown = self.dynamics[[column for column in columns if column in self.dynamics]]
            sections += ["## Speed of sparsification: ODE against ‖w‖₁ ≈ 1/(1/√m + λt) (SCIENCE.md §2.4)", ""]
            sections += [markdown_table(shown.rename(columns={"l1": "λ"})), ""]
            sections += [f"- {name}: documented {text}" for name, text in _DYNAMICS_EXPECTATIONS.items()]
            sections += [""]
        return "\n".join(sections)

    def write(self, folder: Path) -> list[Path]:
        """report.md, one CSV per table, per_instance.csv and one PNG per figure; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        tables = {
            "collisions": self.collisions,
            "collisions_slope": self.slopes,
            "noise": self.noise,
            "noise_comparisons": self.comparisons,
            "dynamics": self.dynamics,
            "per_instance": self.per_instance,
        }
        for name, frame in tables.items():
            if frame is None:
                continue
            path = folder / f"{name}.csv"
            frame.to_csv(path, index=False)
            written.append(path)
        for name, figure in self.figures.items():
            path = folder / f"{name}.png"
            figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
            written.append(path)
        path = folder / "report.md"
        images = "\n".join(f"![{name}]({name}.png)" for name in self.figures)
        path.write_text(self.markdown() + "\n" + images + "\n")
        written.append(path)
        return written


def build_report(
    *,
    collisions_instances: pd.DataFrame | None = None,
    noise_instances: pd.DataFrame | None = None,
    noise_curves: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    dynamics_table: pd.DataFrame | None = None,
    simulations: Sequence[Mapping[str, Any]] | None = None,
    baseline: str = "gaussian",
    paired: bool = False,
    n_resamples: int = 9999,
    notes: Sequence[str] = (),
) -> IncidentalReport:
    """Assemble the report from stored values; each part is optional.

    collisions_instances, noise_instances: per-instance rows (see `collisions_summary`, `noise_summary`);
    noise_curves: {label: {"step": [...], "fourth_norm": [...]}} for the fourth-norm figure;
    dynamics_table: one row per simulated λ (params and metrics of `dynamics`); simulations: their
    trajectories (`simulate_sparsification` outputs with the predictions) for the figure.
    Raises ValueError when every part is missing.
    """
    # pipeline.plots.incidental imports this module (confidence_halfwidth), so import it when needed.
    from pipeline.plots.incidental import collisions_plot, fourth_norm_plot, sparsification_plot

    if collisions_instances is None and noise_instances is None and dynamics_table is None:
        raise ValueError("nothing to report: no collisions, noise or dynamics runs were given")
    figures: dict[str, Any] = {}
    collisions = slopes = noise = comparisons = None
    frames = []
    if collisions_instances is not None:
        collisions = collisions_summary(collisions_instances)
        slopes = slope_table(collisions)
        figures["collisions"] = collisions_plot(collisions)
        frames.append(collisions_instances)
    if noise_instances is not None:
        noise = noise_summary(noise_instances)
        comparisons = noise_comparison(
            noise_instances, baseline=baseline, paired=paired, n_resamples=n_resamples
        )
        if noise_curves:
            ms = noise_instances["m"].unique()
            figures["fourth_norm"] = fourth_norm_plot(noise_curves, int(ms[0]) if len(ms) == 1 else None)
        frames.append(noise_instances)
    if simulations:
        figures["sparsification"] = sparsification_plot(simulations)
    test = "paired t-test on instances (shared init)" if paired else "Welch's t-test"
    all_notes = [*notes]
    if comparisons is not None:
        all_notes.append(
            f"noise comparisons: {test}, bootstrap 95 % CI of the difference ({n_resamples} resamples), "
            "Holm and BH over every row of the comparison table"
        )
    return IncidentalReport(
        collisions=collisions,
        slopes=slopes,
        noise=noise,
        comparisons=comparisons,
        dynamics=dynamics_table,
        per_instance=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        figures=figures,
        notes=all_notes,
        baseline=baseline,
    )
