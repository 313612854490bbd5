"""The incidental study's analysis: tables, fits, comparisons and the report, from trained or stored points.

Split from `pipeline.experiments.incidental` (which trains) so that the tracking layer reads results
without importing the trainers, and so that editing a table or the report never changes the code version
under which trained points are reused (tracking/store.py RESULT_SOURCES).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from pipeline import stats
from pipeline.experiments.incidental import PointResult
from pipeline.experiments.incidental_defaults import COLLISIONS
from pipeline.incidental import (
    CONVERGENCE_THRESHOLD,
    IncidentalConfig,
    assess_convergence,
    noise_excess_kurtosis,
    predicted_polysemantic_neurons,
)
from pipeline.tables import format_number, markdown_table


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


def noise_label(config: IncidentalConfig) -> str:
    """Legend label of a noise point, e.g. "bipolar σ=0.1" (the noise type comes first)."""
    return f"{config.noise} σ={config.sigma:g}"


def curves_by_label(points: Sequence[PointResult]) -> dict[str, dict[str, list[float]]]:
    """{noise_label: curves} for `pipeline.plots.incidental.fourth_norm_plot`."""
    return {noise_label(point.config): point.curves for point in points}


def summarize_points(points: Sequence[PointResult], keys: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per point: the chosen params (default n, m, l1, noise, sigma, noise_sharing) and all metrics."""
    columns = keys or {name: name for name in ("n", "m", "l1", "noise", "sigma", "noise_sharing")}
    return pd.DataFrame(
        [{label: point.params[name] for label, name in columns.items()} | point.metrics for point in points]
    )


# Documented behaviour of the sparsification ODE (docs/science.md §2.4), shown beside the measured values.
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
    unit-length encoding without a privileged basis sits (docs/science.md §2.3).
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
    cooccurrence: pd.DataFrame | None = None
    cooccurrence_comparisons: pd.DataFrame | None = None
    crossover: pd.DataFrame | None = None
    splitting: SplittingSummary | None = None

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
                "## Polysemantic neurons against n²/(4m) (docs/science.md §2.2)",
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
                "## Final fourth norm Σ_j W_ij⁴ by noise type (docs/science.md §2.3)",
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
            sections += [
                "## Speed of sparsification: ODE against ‖w‖₁ ≈ 1/(1/√m + λt) (docs/science.md §2.4)",
                "",
            ]
            sections += [markdown_table(shown.rename(columns={"l1": "λ"})), ""]
            sections += [f"- {name}: documented {text}" for name, text in _DYNAMICS_EXPECTATIONS.items()]
            sections += [""]
        if self.cooccurrence is not None:
            sections += self._cooccurrence_markdown()
        if self.splitting is not None:
            sections += self._splitting_markdown()
        return "\n".join(sections)

    def _cooccurrence_markdown(self) -> list[str]:
        table = self.cooccurrence
        shown = pd.DataFrame(
            {
                "m": table["m"],
                "m/n": table["m_over_n"],
                "p": table["p"],
                "instances": table["instances"],
                "polysemantic (mean)": table["polysemantic_neurons"],
                "95 % CI": _intervals(table, "ci_low", "ci_high"),
                "features per used neuron": table.get("features_per_neuron", np.nan),
                "features represented": table.get("features_represented", np.nan),
                "data loss": table.get("data_loss", np.nan),
            }
        )
        n = int(table["n"].iloc[0])
        sections = [
            "## Co-occurring features: polysemantic neurons vs p (seed 001, discussion)",
            "",
            f"Each of the n = {n} features is on independently with probability p at value 1 (the magnitude of a "
            "basis vector), empty inputs left out; p = 0 is the limit of one feature per input. Polysemantic: "
            "≥ 2 features with |W_ij| ∈ [0.8, 1.2] (as for the basis data). Features per used neuron is the "
            "participation ratio (Σ_i W_ij²)²/Σ_i W_ij⁴ over neurons with Σ_i W_ij² ≥ 0.25: 1 = monosemantic, "
            "2 = a pair, large = dense mixing that the count's [0.8, 1.2] window does not see. Features "
            "represented: ‖W_i‖² ≥ 0.5. CIs: Student t over instances, which are independent within a point.",
            "",
            markdown_table(shown),
            "",
        ]
        if self.crossover is not None and len(self.crossover):
            crossover = self.crossover
            shown = pd.DataFrame(
                {
                    "m": crossover["m"],
                    "m/n": crossover["m_over_n"],
                    "count at p = 0": crossover["count_at_p0"],
                    "95 % CI": _intervals(crossover, "count_at_p0_ci_low", "count_at_p0_ci_high"),
                    "n²/(4m)": crossover["predicted_incidental"],
                    "(n − m)₊": crossover["forced_polysemantic"],
                    "p at half the p = 0 count": [
                        _p_text(row.p_half, row.largest_p, row.smallest_p) for row in crossover.itertuples()
                    ],
                    "95 % CI ": [
                        f"[{_p_text(row.p_half_ci_low, row.largest_p, row.smallest_p)}, "
                        f"{_p_text(row.p_half_ci_high, row.largest_p, row.smallest_p)}]"
                        for row in crossover.itertuples()
                    ],
                }
            )
            sections += [
                "### Crossover from superposition (m < n) to incidental polysemanticity (m ≥ n)",
                "",
                "p at half: where the mean count falls to half its p = 0 value (log-p interpolation on the grid); "
                "its CI is a percentile bootstrap over instances, resampling the same instances at every p "
                "because instance k shares its init and its input uniforms across p (paired).",
                "",
                markdown_table(shown),
                "",
            ]
        if self.cooccurrence_comparisons is not None and len(self.cooccurrence_comparisons):
            columns = ["n", "m", "config_a", "n_a", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "t", "p"]
            columns += ["p_holm"]
            readable = self.cooccurrence_comparisons[columns].rename(
                columns={"config_a": "p (vs 0)", "p": "p-value", "p_holm": "p-value (Holm)"}
            )
            sections += [
                "### Each p against p = 0 at the same m (paired t on instances, bootstrap CI of the difference)",
                "",
                markdown_table(readable),
                "",
            ]
        return sections

    def _splitting_markdown(self) -> list[str]:
        arms = self.splitting.arms
        shown = pd.DataFrame(
            {
                "arm": arms["arm"],
                "instances": arms["instances"],
                "polysemantic before": arms["polysemantic_before"],
                "split neurons": arms["split_neurons"],
                "resolved": arms["resolved_fraction"],
                "95 % CI": _intervals(arms, "resolved_ci_low", "resolved_ci_high"),
                "recollided": arms.get("recollided_fraction", np.nan),
                "other": arms.get("other_fraction", np.nan),
                "separated anywhere": arms.get("separated_fraction", np.nan),
                "coin flip": arms.get("coin_flip_prediction", np.nan),
                "polysemantic after": arms["polysemantic_after"],
                "95 % CI ": _intervals(arms, "polysemantic_after_ci_low", "polysemantic_after_ci_high"),
                "mixed after": arms.get("mixed_after", np.nan),
                "loss before": arms["loss_before"],
                "loss at split": arms["loss_at_split"],
                "loss after": arms["loss_after"],
            }
        )
        sections = [
            "## The splitting remedy (seed 001, discussion)",
            "",
            "Each polysemantic neuron of the trained tied model is replaced by two copies w/√2 (W Wᵀ and the output "
            "unchanged; the L1 term grows by (√2 − 1)·λ·Σ|w|), each copy perturbed by ε·N(0, 1) per weight, then "
            "the model trains on with a fresh optimizer; the baseline trains the same extra steps unsplit. "
            "Resolved: each copy carries exactly one of the neuron's former features (|W| ∈ [0.8, 1.2]), a "
            "different one (baseline: the neuron carries one). Recollided: a copy still carries two or more. "
            "Separated anywhere: every former feature ends alone on some neuron. Coin flip: the fraction "
            "expected if each feature independently keeps a random copy (1/2 per two-feature neuron). "
            "Fractions pool the split neurons of all instances; CIs resample whole instances (cluster "
            "bootstrap), the same resamples for every arm, since all arms of instance k start from the same "
            "trained base. Polysemantic after: the usual count (≥ 2 features at |W| ∈ [0.8, 1.2]) on the grown "
            "model; it misses copies that still hold both features at about 1/√2 (ε = 0 keeps them there), which "
            "mixed after counts: neurons with ≥ 2 features at |W| ≥ 0.5. Loss: squared error + λ·Σ|W| on the "
            "basis inputs, mean over instances.",
            "",
            markdown_table(shown),
            "",
        ]
        if len(self.splitting.comparisons):
            columns = ["metric", "config_a", "n_a", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "t", "p"]
            columns += ["p_holm"]
            readable = self.splitting.comparisons[columns].rename(
                columns={"config_a": "arm", "p": "p-value", "p_holm": "p-value (Holm)"}
            )
            sections += [
                "### Each split arm against the baseline (paired t on instances, bootstrap CI of the difference)",
                "",
                markdown_table(readable),
                "",
            ]
        return sections

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
            "cooccurrence": self.cooccurrence,
            "cooccurrence_comparisons": self.cooccurrence_comparisons,
            "cooccurrence_crossover": self.crossover,
            "splitting": self.splitting.arms if self.splitting is not None else None,
            "splitting_curves": self.splitting.curves if self.splitting is not None else None,
            "splitting_comparisons": self.splitting.comparisons if self.splitting is not None else None,
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
    cooccurrence_instances: pd.DataFrame | None = None,
    splitting: Mapping[str, Mapping[str, pd.DataFrame]] | None = None,
) -> IncidentalReport:
    """Assemble the report from stored values; each part is optional.

    collisions_instances, noise_instances: per-instance rows (see `collisions_summary`, `noise_summary`);
    noise_curves: {label: {"step": [...], "fourth_norm": [...]}} for the fourth-norm figure;
    dynamics_table: one row per simulated λ (params and metrics of `dynamics`); simulations: their
    trajectories (`simulate_sparsification` outputs with the predictions) for the figure;
    cooccurrence_instances: per-instance rows of co-occurrence points (`cooccurrence_summary`); splitting:
    {arm: {"per_instance", "checkpoints", "splits"}} of the splitting arms (`splitting_summary`).
    Raises ValueError when every part is missing.
    """
    # pipeline.plots.incidental imports this module (confidence_halfwidth), so import it when needed.
    from pipeline.plots.incidental import (
        collisions_plot,
        cooccurrence_plot,
        fourth_norm_plot,
        sparsification_plot,
        splitting_plot,
    )

    given = (collisions_instances, noise_instances, dynamics_table, cooccurrence_instances, splitting)
    if all(part is None for part in given):
        raise ValueError(
            "nothing to report: no collisions, noise, dynamics, cooccurrence or splitting runs were given"
        )
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
    cooccurrence = cooccurrence_tests = crossover = None
    if cooccurrence_instances is not None:
        cooccurrence = cooccurrence_summary(cooccurrence_instances)
        cooccurrence_tests = cooccurrence_comparisons(cooccurrence_instances, n_resamples=n_resamples)
        crossover = crossover_table(cooccurrence_instances, n_resamples=min(n_resamples, 2000))
        figures["cooccurrence"] = cooccurrence_plot(cooccurrence)
    splitting_result = None
    if splitting:
        splitting_result = splitting_summary(
            {arm: parts["per_instance"] for arm, parts in splitting.items()},
            {arm: parts["checkpoints"] for arm, parts in splitting.items()},
            {arm: parts["splits"] for arm, parts in splitting.items()},
            n_resamples=n_resamples,
        )
        figures["splitting"] = splitting_plot(
            splitting_result, {arm: parts["splits"] for arm, parts in splitting.items()}
        )
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
        cooccurrence=cooccurrence,
        cooccurrence_comparisons=cooccurrence_tests,
        crossover=crossover,
        splitting=splitting_result,
    )


# ------------------------------------------------------------------------------------------------------------
# Co-occurring features


def cooccurrence_summary(per_instance: pd.DataFrame) -> pd.DataFrame:
    """Polysemantic neurons and the other co-occurrence measurements per (n, m, p), mean and 95 % CI.

    per_instance: one row per instance with columns n, m, p, instance, polysemantic_neurons and (when logged)
    features_per_neuron, features_represented, data_loss. Instances of one point are independent replicates
    (each has its own init and input stream), so the Student-t interval over instances applies. Also:
    predicted_incidental n²/(4m) (the basis-data law, seed 001) and forced_polysemantic (n − m)₊, the fewest
    polysemantic neurons that can hold n features in m neurons two at a time (a lower bound at p = 0 when
    m < n: superposition).
    """
    rows = []
    for (n, m, p), group in per_instance.groupby(["n", "m", "p"], sort=True):
        counts = stats.describe(group["polysemantic_neurons"].to_numpy(dtype=float), bounds=(0, math.inf))
        row = {
            "n": int(n),
            "m": int(m),
            "p": float(p),
            "m_over_n": m / n,
            "instances": int(counts["n"]),
            "polysemantic_neurons": counts["mean"],
            "polysemantic_neurons_std": counts["std"],
            "ci_low": counts["ci_low"],
            "ci_high": counts["ci_high"],
            "predicted_incidental": predicted_polysemantic_neurons(int(n), int(m)),
            "forced_polysemantic": max(int(n) - int(m), 0),
        }
        for name in ("features_per_neuron", "features_represented", "data_loss", "encoding_sparsity"):
            if name in group:
                row[name] = float(group[name].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def cooccurrence_comparisons(per_instance: pd.DataFrame, n_resamples: int = 9999) -> pd.DataFrame:
    """Every p > 0 against p = 0 at the same (n, m), on the polysemantic count: paired on the instance.

    Instance k of every p at one (n, m, seed) starts from the same weights and draws its inputs from the same
    uniforms (`pipeline.incidental.cooccurring_inputs`), so the per-instance values are correlated across p
    and a paired t-test (with a bootstrap CI of the mean difference) is the right one. Holm and BH are
    recomputed over the whole table. Columns: n, m, then `pipeline.stats.COMPARISON_COLUMNS` (config_a = p).
    """
    tables = []
    for (n, m), group in per_instance.groupby(["n", "m"], sort=True):
        if 0.0 not in set(group["p"]) or group["p"].nunique() < 2:
            continue
        labelled = group.assign(p_label=[f"{value:g}" for value in group["p"]])
        table = stats.compare_to_baseline(
            labelled,
            config_column="p_label",
            metrics=["polysemantic_neurons"],
            baseline="0",
            paired=True,
            seed_column="instance",
            n_resamples=n_resamples,
        )
        tables.append(table.assign(n=int(n), m=int(m)))
    if not tables:
        return pd.DataFrame(columns=["n", "m", *stats.COMPARISON_COLUMNS])
    combined = pd.concat(tables, ignore_index=True)
    combined["p_holm"] = stats.adjust_pvalues(combined["p"].to_numpy(dtype=float), "holm")
    combined["p_bh"] = stats.adjust_pvalues(combined["p"].to_numpy(dtype=float), "fdr_bh")
    return combined[["n", "m", *stats.COMPARISON_COLUMNS]]


def half_count_p(p_values: Sequence[float], counts: Sequence[float]) -> float:
    """The co-occurrence probability at which the mean count falls to half its p = 0 value.

    Linear interpolation in log p between the last grid p above half and the first at or below it; when the
    count is already at or below half at the smallest positive p, −inf (the grid cannot say how far below
    that p it falls); +inf when it never falls to half on the grid; NaN without a p = 0 point or with a
    zero count at p = 0.
    """
    table = sorted(zip(p_values, counts, strict=True))
    if not table or table[0][0] != 0 or not table[0][1] > 0:
        return math.nan
    target = table[0][1] / 2
    previous_p, previous_count = table[0]
    for p, count in table[1:]:
        if count <= target:
            if previous_p == 0:
                return -math.inf
            fraction = (previous_count - target) / (previous_count - count)
            return float(math.exp(math.log(previous_p) + fraction * (math.log(p) - math.log(previous_p))))
        previous_p, previous_count = p, count
    return math.inf


def crossover_table(per_instance: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (n, m): the count at p = 0 against n²/(4m) and (n − m)₊, and p_half (`half_count_p`) with a 95 %
    percentile bootstrap CI that resamples instances, the same instances at every p (they are paired).

    The crossover from superposition (m < n: polysemanticity forced by capacity) to incidental (m ≥ n:
    polysemanticity by chance) shows as p_half: how much co-occurrence it takes to halve the count.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for (n, m), group in per_instance.groupby(["n", "m"], sort=True):
        wide = group.pivot_table(index="instance", columns="p", values="polysemantic_neurons").dropna()
        if 0.0 not in wide.columns or wide.empty:
            continue
        ps = [float(p) for p in wide.columns]
        values = wide.to_numpy(dtype=float)
        estimate = half_count_p(ps, values.mean(axis=0))
        draws = np.array(
            [
                half_count_p(ps, values[rng.integers(0, len(values), len(values))].mean(axis=0))
                for _ in range(n_resamples)
            ]
        )
        defined = draws[~np.isnan(draws)]
        # inverted_cdf picks sample values, so draws of ±inf (censored at the grid's ends) stay meaningful.
        low, high = (
            np.quantile(defined, [0.025, 0.975], method="inverted_cdf")
            if defined.size
            else (math.nan, math.nan)
        )
        at_zero = stats.describe(values[:, ps.index(0.0)], bounds=(0, math.inf))
        rows.append(
            {
                "n": int(n),
                "m": int(m),
                "m_over_n": m / n,
                "instances": len(values),
                "count_at_p0": at_zero["mean"],
                "count_at_p0_ci_low": at_zero["ci_low"],
                "count_at_p0_ci_high": at_zero["ci_high"],
                "predicted_incidental": predicted_polysemantic_neurons(int(n), int(m)),
                "forced_polysemantic": max(int(n) - int(m), 0),
                "p_half": estimate,
                "p_half_ci_low": float(low),
                "p_half_ci_high": float(high),
                "largest_p": max(ps),
                "smallest_p": min(p for p in ps if p > 0) if len(ps) > 1 else math.nan,
            }
        )
    return pd.DataFrame(rows)


def _p_text(value: float, largest: float, smallest: float) -> str:
    if math.isinf(value):
        return f"> {largest:g}" if value > 0 else f"≤ {smallest:g}"
    if math.isnan(value):
        return "–"
    return format_number(value)


# ------------------------------------------------------------------------------------------------------------
# The splitting remedy


@dataclass
class SplittingSummary:
    """arms: one row per arm; curves: the resolved fraction per (arm, extra step) with its CI;
    comparisons: every split arm against the baseline on per-instance measures (paired on instance)."""

    arms: pd.DataFrame
    curves: pd.DataFrame
    comparisons: pd.DataFrame


def _cluster_ratio(
    numerator: np.ndarray, denominator: np.ndarray, draws: np.ndarray
) -> tuple[float, float, float]:
    """Σ numerator / Σ denominator over instances, with a 95 % percentile CI from resampled instance sets.

    draws: [resample, instance] indices, shared by every arm so that arms are compared on the same sets.
    """
    total = denominator.sum()
    estimate = numerator.sum() / total if total > 0 else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = numerator[draws].sum(axis=1) / denominator[draws].sum(axis=1)
    ratios = ratios[np.isfinite(ratios)]
    if not ratios.size:
        return estimate, math.nan, math.nan
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(estimate), float(low), float(high)


def splitting_summary(
    per_instance: Mapping[str, pd.DataFrame],
    checkpoints: Mapping[str, pd.DataFrame],
    splits: Mapping[str, pd.DataFrame] | None = None,
    *,
    n_resamples: int = 9999,
    seed: int = 0,
) -> SplittingSummary:
    """Outcomes of the splitting arms with CIs that respect how they were generated.

    per_instance, checkpoints: {arm label: table} as `run_split_point` makes them. The replicate is the
    instance: split neurons of one instance share its training, so a fraction pools the instances (resolved
    split neurons summed over instances / split neurons summed over instances) and its 95 % CI is a cluster
    bootstrap that resamples whole instances; every arm uses the same resampled instance sets, since all arms
    of instance k start from the same trained base. splits: {arm: splits.csv}, for the coin-flip prediction:
    when two features are on one neuron and each copy is won independently by either feature, a pair is
    resolved with probability 1/2 and a neuron with three or more features never is, so the prediction is
    (1/2)·(share of split neurons that carried exactly two features).
    """
    rng = np.random.default_rng(seed)
    instances = next(iter(per_instance.values()))["instance"].to_numpy()
    draws = rng.integers(0, len(instances), (n_resamples, len(instances)))
    rows = []
    for arm, table in per_instance.items():
        table = table.sort_values("instance").reset_index(drop=True)
        split = table["split"].to_numpy(dtype=float)
        row: dict[str, Any] = {"arm": arm, "instances": len(table)}
        row["polysemantic_before"] = float(table["polysemantic_before"].mean())
        row["split_neurons"] = int(split.sum())
        for name in ("resolved", "recollided", "other", "separated"):
            if name not in table:
                continue
            estimate, low, high = _cluster_ratio(table[name].to_numpy(dtype=float), split, draws)
            row[f"{name}_fraction"] = estimate
            if name in ("resolved", "separated"):
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
        after = stats.describe(table["polysemantic_after"].to_numpy(dtype=float), bounds=(0, math.inf))
        row |= {
            "polysemantic_after": after["mean"],
            "polysemantic_after_ci_low": after["ci_low"],
            "polysemantic_after_ci_high": after["ci_high"],
            "mixed_after": float(table["mixed_after"].mean()) if "mixed_after" in table else math.nan,
            "loss_before": float(table["loss_before"].mean()),
            "loss_at_split": float(table["loss_at_split"].mean()),
            "loss_after": float(table["loss_after"].mean()),
            "squared_error_after": float(table["squared_error_after"].mean()),
        }
        if splits is not None and arm in splits and len(splits[arm]):
            sizes = splits[arm].groupby(["instance", "neuron"]).size()
            row["coin_flip_prediction"] = float((sizes == 2).mean() / 2)
        rows.append(row)
    curve_rows = []
    for arm, table in checkpoints.items():
        for step, group in table.groupby("step", sort=True):
            group = group.sort_values("instance")
            estimate, low, high = _cluster_ratio(
                group["resolved"].to_numpy(dtype=float), group["split"].to_numpy(dtype=float), draws
            )
            curve_rows.append(
                {
                    "arm": arm,
                    "step": int(step),
                    "resolved_fraction": estimate,
                    "ci_low": low,
                    "ci_high": high,
                    "polysemantic_neurons": float(group["polysemantic_neurons"].mean()),
                    "loss": float(group["loss"].mean()),
                }
            )
    tidy = pd.concat(
        [table.assign(arm=arm) for arm, table in per_instance.items()], ignore_index=True
    ).assign(resolved_share=lambda frame: frame["resolved"] / frame["split"].where(frame["split"] > 0))
    baseline = next((arm for arm in per_instance if arm.startswith("baseline")), None)
    comparisons = pd.DataFrame(columns=stats.COMPARISON_COLUMNS)
    if baseline is not None and len(per_instance) > 1:
        comparisons = stats.compare_to_baseline(
            tidy,
            config_column="arm",
            metrics=[name for name in ("polysemantic_after", "mixed_after", "loss_after") if name in tidy],
            baseline=baseline,
            paired=True,
            seed_column="instance",
            n_resamples=n_resamples,
        )
    return SplittingSummary(pd.DataFrame(rows), pd.DataFrame(curve_rows), comparisons)
