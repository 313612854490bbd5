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
