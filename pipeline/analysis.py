"""The analysis stage, pure: per-seed DataFrame in, tables, conclusions, figures and report files out.

`tracking/analysis.py` fetches the per-seed table from the store and logs the files written here; nothing
in this module knows about MLflow, so a report can be rebuilt from any CSV of per-seed values.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline import conclusions, stats
from pipeline.config import (
    BASELINE,
    FACTOR_LEVELS,
    FACTORIAL_CONFIGURATIONS,
    STRATEGIC_CONFIGURATIONS,
    AblationConfig,
)
from pipeline.config_tools import flatten
from pipeline.metrics import HEADLINE_METRICS
from pipeline.plots.report import effects_forest_plot, interaction_grid, main_effects_plot, seed_strip_plot
from pipeline.tables import format_number, markdown_table, mean_plus_minus

BASELINE_NAME = "·".join(BASELINE)
DEFAULT_METRICS = HEADLINE_METRICS
SIGNIFICANCE = conclusions.SIGNIFICANCE
# Below this many finished seeds per configuration the report warns that its intervals are wide.
THIN_SEEDS = 5

# The blog's table (seed 002; 10 seeds each): MACS, Interference, Train MSE, Val MSE, L0 by configuration.
# The published code does not reproduce it: run at its latest commit for the baseline (3 seeds, 2000/1000
# epochs) it printed MACS (published form) 0.205 ± 0.017 and interference (index-mod form) 5.02
# (docs/science.md §1.4b). Both are shown, each named for what it is.
PUBLISHED = {
    "random·bipolar·l1·relu": (0.2954, 8.70, 0.0122, 0.0135, 0.4365),
    "orthogonal·bipolar·l1·relu": (0.284, 8.11, 0.0044, 0.0078, 0.439),
    "random·positive_kurtosis·l1·relu": (0.306, 9.11, 0.0133, 0.0152, 0.416),
    "random·bipolar·l2·gelu": (0.263, 7.14, 0.0024, 0.0051, 0.439),
    "orthogonal·bipolar·l2·gelu": (0.252, 6.49, 0.0020, 0.0046, 0.453),
    "orthogonal·positive_kurtosis·l1·relu": (0.285, 8.30, 0.0045, 0.0076, 0.452),
    "random·positive_kurtosis·l2·relu": (0.284, 8.35, 0.0032, 0.0058, 0.491),
    "orthogonal·positive_kurtosis·l2·gelu": (0.249, 6.37, 0.0021, 0.0048, 0.454),
}
# (published name, our metric closest to the published formula, why the numbers may differ)
PUBLISHED_CODE_BASELINE = {"MACS": "0.205 ± 0.017", "Interference": "5.02"}
PUBLISHED_CODE_SOURCE = (
    "the published code at its latest commit, run for the baseline (3 seeds, 2000/1000 epochs)"
)
PUBLISHED_METRICS = (
    (
        "MACS",
        "macs_published_form",
        "published mean includes the zeroed diagonal (= ours·(N−1)/N); "
        "our SAE has separate encoder/decoder tensors and trains on standardized activations",
    ),
    (
        "Interference",
        "interference_seed",
        "published weights latent k by I[k mod 8] (latent order is arbitrary); "
        "our `interference` matches latents to features by correlation",
    ),
    ("Train MSE", "train_mse", "same definition"),
    ("Val MSE", "val_mse", "same definition; published validation split has 204 samples, as ours"),
    (
        "L0",
        "l0_sparsity",
        "published L0 was measured on standardized inputs the SAE never saw in training; "
        "ours trains and evaluates on the same standardization",
    ),
)


@dataclass(frozen=True)
class StudyContext:
    """Where the runs of a report came from, for its Study section (filled by the tracking side).

    ``settings`` maps a configuration name to its flattened config as stored (``network.sigma`` → "0.1").
    """

    store: str = ""
    experiment: str = ""
    sweep_ids: tuple[str, ...] = ()
    code_versions: tuple[str, ...] = ()
    settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass
class Report:
    """Everything a report shows; `write` puts it on disk."""

    per_seed: pd.DataFrame
    counts: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    factorial: pd.DataFrame | None
    published: pd.DataFrame | None
    verdicts: list[str]
    notes: list[str]
    metrics: list[str]
    baseline: str
    study: list[str] = field(default_factory=list)
    conclusions: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=conclusions.CONCLUSION_COLUMNS)
    )
    caveats: list[str] = field(default_factory=list)
    published_absent: str = ""
    ladder: pd.DataFrame | None = None
    ladder_per_seed: pd.DataFrame | None = None
    # Numeric axes of the design (λ, widths): per-level means, trend and curvature tests, minimum.
    dose_levels: pd.DataFrame | None = None
    dose_tests: pd.DataFrame | None = None
    dose_readings: list[str] = field(default_factory=list)
    # The groups of a numeric axis (L1, L2 …) against the first, level by level, paired on seed.
    dose_matched: pd.DataFrame | None = None
    # A complete 2⁴ factorial at each level of one other setting (e.g. SAE architecture): the factors'
    # main effects per level and their differences from the baseline's level (pipeline.moderation).
    moderation: pd.DataFrame | None = None
    moderation_readings: list[str] = field(default_factory=list)
    # The splitting remedy on this sweep's stored networks (`split` runs; pipeline.taming_splitting).
    splitting: pd.DataFrame | None = None
    splitting_readings: list[str] = field(default_factory=list)
    # One other setting at two levels (gradient clipping off/on): per configuration, the paired mean
    # difference and the Pitman–Morgan comparison of the seed variances (pipeline.variance).
    two_levels: pd.DataFrame | None = None
    two_levels_readings: list[str] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)

    def add_splitting(self, table: pd.DataFrame, readings: list[str], figures: dict[str, Figure]) -> None:
        """Attach the splitting study of this sweep's networks (tracking.taming_splitting.splitting_section)."""
        self.splitting, self.splitting_readings = table, list(readings)
        self.figures.update(figures)

    def add_published_ladder(self, per_seed: pd.DataFrame) -> None:
        """Attach `pipeline.published.published_ladder`'s per-seed table (the baseline's stored networks)."""
        from pipeline.published import ladder_summary

        self.ladder_per_seed = per_seed
        self.ladder = ladder_summary(per_seed)

    def headline(self) -> str:
        """Study, conclusions and caveats only: short enough for a run description."""
        lines = [f"- {line}" for line in self.study]
        if self.verdicts:
            lines += ["", "Conclusions:"] + [f"- {line}" for line in self.verdicts]
        if self.dose_readings:
            lines += ["", "Dose–response:"] + [f"- {line}" for line in self.dose_readings]
        if self.moderation_readings:
            lines += ["", MODERATION_TITLE + ":"] + [f"- {line}" for line in self.moderation_readings]
        if self.caveats:
            lines += ["", "Caveats:"] + [f"- {line}" for line in self.caveats]
        return "\n".join(lines)

    def sections(self) -> list[tuple[str, list[str], pd.DataFrame | None]]:
        """(title, bullet lines, table) in reading order; Markdown and HTML both render this list."""
        sections: list[tuple[str, list[str], pd.DataFrame | None]] = [("Study", self.study, None)]
        if self.verdicts:
            sections.append((_conclusions_title(self.factorial is not None), self.verdicts, None))
        if self.dose_readings:
            sections.append((DOSE_TITLE, [*self.dose_readings, DOSE_METHOD], self.dose_tests_shown()))
        if self.dose_matched is not None:
            sections.append((MATCHED_TITLE, [MATCHED_METHOD], self.dose_matched))
        if self.moderation is not None:
            sections.append(
                (MODERATION_TITLE, [*self.moderation_readings, MODERATION_METHOD], self.moderation)
            )
        if self.splitting is not None:
            sections.append((SPLITTING_TITLE, self.splitting_readings, self.splitting))
        if self.two_levels is not None:
            sections.append(
                (TWO_LEVELS_TITLE, [*self.two_levels_readings, TWO_LEVELS_METHOD], self.two_levels)
            )
        if self.caveats:
            sections.append(("Caveats", self.caveats, None))
        sections.append(("How the numbers were computed", self.notes, None))
        sections.append(("Seeds per configuration", [], self.counts))
        sections.append(("Mean ± std over finished seeds", [], self.summary))
        if self.factorial is not None:
            sections.append(
                (
                    "Factorial effects, blocked on seed",
                    [
                        "estimate = mean(high) − mean(low) over the 16 cells (the contrast column names high "
                        "and low); CI, t and p from the per-seed contrasts (df = seeds − 1); p_holm over the "
                        "15 effects of each metric. p_pooled_ols is the pooled OLS/ANOVA that treats every "
                        "run as independent, shown only for comparison: it is not valid for this design."
                    ],
                    _readable_factorial(self.factorial),
                )
            )
        sections.append(
            (
                f"Every configuration against the baseline {self.baseline}",
                [],
                _readable_comparisons(self.comparisons),
            )
        )
        if self.published is not None:
            sections.append(("Published numbers beside ours", [], self.published))
            sections.append(("How the published metrics map onto ours", [], published_definitions()))
        elif self.published_absent:
            sections.append(("Published numbers", [self.published_absent], None))
        if self.ladder is not None:
            sections.append(
                (
                    "Published code → ours, one fix at a time",
                    [
                        f"Four SAEs trained on the same stored networks of {self.baseline} "
                        f"({int(self.ladder['seeds'].iloc[0])} seeds), one per combination of the published "
                        "code's two SAE defects: tied = the encoder a view of the decoder's transpose (both Adam "
                        "updates in one weight); raw = trained on unstandardized activations (every rung is "
                        "evaluated on standardized ones, as the published code did). The change columns are "
                        "paired on seed against the first rung.",
                        f"For reference, {PUBLISHED_CODE_SOURCE} printed MACS (published form) "
                        f"{PUBLISHED_CODE_BASELINE['MACS']} and interference (index-mod form) "
                        f"{PUBLISHED_CODE_BASELINE['Interference']}; the blog (seed 002) reports "
                        f"{PUBLISHED[BASELINE_NAME][0]} and {PUBLISHED[BASELINE_NAME][1]}.",
                    ],
                    self.ladder,
                )
            )
        return sections

    def dose_tests_shown(self) -> pd.DataFrame | None:
        if self.dose_tests is None:
            return None
        columns = [
            "axis", "metric", "group", "levels", "seeds", "trend_estimate", "trend_ci_low", "trend_ci_high",
            "trend_p", "trend_p_holm", "curvature_estimate", "curvature_ci_low", "curvature_ci_high",
            "curvature_p", "curvature_p_holm",
            "minimum_level", "minimum_ci_low", "minimum_ci_high", "is_u_shaped",
        ]  # fmt: skip
        return self.dose_tests[[column for column in columns if column in self.dose_tests]]

    def markdown(self) -> str:
        lines = ["# Polysemanticity lab report", ""]
        for title, bullets, table in self.sections():
            lines += [f"## {title}", ""]
            if bullets:
                lines += [f"- {line}" for line in bullets] + [""]
            if table is not None:
                lines += [markdown_table(table), ""]
        return "\n".join(lines)

    def write(self, folder: Path) -> list[Path]:
        """comparisons.csv, factorial.csv, conclusions.csv, per_seed.csv, report.md, report.html, PNGs."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        tables = {
            "comparisons.csv": self.comparisons,
            "factorial.csv": self.factorial
            if self.factorial is not None
            else pd.DataFrame(columns=stats.FACTORIAL_COLUMNS),
            "conclusions.csv": self.conclusions,
            "per_seed.csv": self.per_seed,
        }
        if self.ladder_per_seed is not None:
            tables["published_ladder.csv"] = self.ladder_per_seed
        if self.moderation is not None:
            tables["effects_by_level.csv"] = self.moderation
        if self.splitting is not None:
            tables["splitting.csv"] = self.splitting
        if self.two_levels is not None:
            tables["two_levels.csv"] = self.two_levels
        if self.dose_matched is not None:
            tables["dose_response_matched.csv"] = self.dose_matched
        if self.dose_tests is not None:
            tables["dose_response_tests.csv"] = self.dose_tests
            tables["dose_response_levels.csv"] = self.dose_levels
        for name, frame in tables.items():
            path = folder / name
            frame.to_csv(path, index=False)
            written.append(path)
        images = {}
        for name, figure in self.figures.items():
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            images[name] = buffer.getvalue()
            path = folder / f"{name}.png"
            path.write_bytes(images[name])
            written.append(path)
        path = folder / "report.md"
        path.write_text(
            self.markdown() + "\n" + "\n".join(f"![{name}]({name}.png)" for name in images) + "\n"
        )
        written.append(path)
        path = folder / "report.html"
        path.write_text(self.html(images))
        written.append(path)
        return written

    def html(self, images: dict[str, bytes]) -> str:
        """A self-contained page: tables and figures embedded as base64 PNGs."""
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>Polysemanticity lab report</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
            "table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
            "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}</style></head><body>",
            "<h1>Polysemanticity lab report</h1>",
        ]
        for title, bullets, table in self.sections():
            parts.append(f"<h2>{html.escape(title)}</h2>")
            if bullets:
                # Conclusions mark the subject in **bold** for Markdown; HTML gets <b>.
                items = [_bold_to_html(html.escape(line)) for line in bullets]
                parts += ["<ul>", *(f"<li>{item}</li>" for item in items), "</ul>"]
            if table is not None:
                shown = table.map(lambda value: format_number(value))
                parts.append(shown.to_html(index=False, escape=True))
        parts.append("<h2>Figures</h2>")
        for name, data in images.items():
            encoded = base64.b64encode(data).decode()
            parts.append(
                f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>"
            )
        parts.append("</body></html>")
        return "\n".join(parts)


TWO_LEVELS_TITLE = "One setting at two levels: its effect on each configuration's mean and seed variance"
TWO_LEVELS_METHOD = (
    "Within each configuration (the other settings fixed), the two levels share every seed's data, inits and "
    "noise, so both comparisons are paired on seed: the mean by a paired t-test, the seed variance by the "
    "Pitman–Morgan test (correlation of the pairs' sums and differences, df = pairs − 2; Levene's or the F "
    "test would assume independent samples), with the variance ratio (second level over first) and its "
    "interval. Holm over every configuration and metric, separately for means and variances."
)
SPLITTING_TITLE = "Splitting the polysemantic neurons of the last hidden layer (the split runs of this sweep)"
MODERATION_TITLE = "Do the training factors' effects persist across levels of another setting?"
MODERATION_METHOD = (
    "Each main effect is estimated at each level from the seeds that ran all 16 cells at every level: per "
    "seed the contrast mean(high) − mean(low) over the cells, then a one-sample t across seeds (df = seeds − "
    "1). The difference from the reference level is the per-seed difference of the two contrasts, tested "
    "the same way (paired on seed: every level shares the seed's data, inits and noise, and a decomposition "
    "even the same trained networks), Holm-adjusted over the differences of each metric. 'Persists' = same "
    "sign and CI clear of 0 at that level."
)
MATCHED_TITLE = "Groups compared at matched levels of the numeric axis"
MATCHED_METHOD = (
    "At each level, each group minus the first group (sorted by label), paired on seed over the seeds that "
    "ran both; one-sample t across seeds (df = seeds − 1), Holm over every level and group of a metric."
)
DOSE_TITLE = "Dose–response along the numeric axes of the design"
DOSE_METHOD = (
    "Per seed, the metric is fitted across the levels (x = log10 of the level when the levels span a "
    "factor ≥ 10, else the level): trend = least-squares slope, curvature = quadratic coefficient; each "
    "is tested across seeds with a one-sample t (df = seeds − 1), so the seed, which shares data, inits "
    "and noise across levels, is the unit of replication. The readings use each test's own p < 0.05; the "
    "table adds Holm-adjusted p across all its rows (p_holm) for reading many at once. U-shaped = curvature CI above 0 and the lowest "
    "mean at an interior level with the fitted minimum inside the range. The minimum's 95 % CI resamples "
    "whole seeds (percentile bootstrap; with 10 seeds it covered the true minimum 89 % of the time in "
    "bench/dose_response_inference.py, so read it as approximate)."
)


def dose_response_section(
    finished: pd.DataFrame,
    metrics: Sequence[str],
    n_resamples: int = 2000,
    figures: bool = True,
    baseline: str | None = None,
):
    """Dose–response of every metric along each numeric setting that takes ≥ 3 values among the
    configurations, grouped by the other varying settings. Returns (levels, tests, readings, figures)
    or None when the design has no such axis."""
    from pipeline.design import FACTOR_PATHS, field_specs
    from pipeline.dose_response import (
        dose_response,
        group_label,
        matched_level_differences,
        matched_readings,
        numeric_axes,
    )
    from pipeline.plots.dose_response import dose_response_figures

    varying = varying_settings(finished)
    candidates = [path for path in varying if path not in FACTOR_PATHS]
    if not candidates:
        return None
    axes = numeric_axes(finished.drop_duplicates("config_hash"), candidates, minimum_levels=3)
    if not axes:
        return None
    specs = field_specs()
    levels, tests, readings, plots, matched = [], [], [], {}, []
    for axis in axes:
        groups = [path for path in varying if path != axis]
        # Only groups (combinations of the other varying settings) that tested ≥ 3 levels of the axis: a
        # preset sweep stored beside a λ sweep would otherwise add a row per preset cell with one level.
        level_counts = (
            finished.groupby(groups, dropna=False)[axis].nunique()
            if groups
            else pd.Series([finished[axis].nunique()])
        )
        enough = level_counts[level_counts >= 3]
        if enough.empty:
            continue
        rows = finished
        if groups:
            keys = finished.set_index(groups).index
            rows = finished[keys.isin(enough.index)]
        left_out = len(level_counts) - len(enough)
        if left_out:
            readings.append(
                f"{left_out} group(s) of configurations with fewer than 3 values of {specs[axis].short} "
                "are left out of its dose–response."
            )
        results = []
        for metric in metrics:
            result = dose_response(
                rows,
                axis,
                metric,
                group_columns=groups,
                n_resamples=n_resamples,
                axis_label=specs[axis].short,
            )
            results.append(result)
            levels.append(result.levels.assign(axis=axis, metric=metric))
            tests.append(result.tests)
            readings.extend(result.readings)
            if groups:
                # The baseline's group (L1 in the λ study) is what the others are compared with.
                reference = None
                if baseline is not None and baseline in set(rows["config"]):
                    values = tuple(rows.loc[rows["config"] == baseline, groups].iloc[0])
                    reference = group_label(groups, values)
                matched.append(matched_level_differences(rows, axis, metric, groups, reference=reference))
        if figures:
            plots[f"dose_response_{axis.rpartition('.')[2]}"] = dose_response_figures(results)
    if not tests:
        return None
    matched_frame = pd.concat(matched, ignore_index=True) if matched else None
    if matched_frame is not None and not matched_frame.empty:
        for axis, rows in matched_frame.groupby("axis", sort=False):
            readings.extend(matched_readings(rows, specs[axis].short))
    else:
        matched_frame = None
    tests_frame = pd.concat(tests, ignore_index=True)
    # Many rows (metrics × groups × axes) are read at once: Holm across all of them, beside the raw p.
    for test in ("trend", "curvature"):
        tests_frame[f"{test}_p_holm"] = stats.adjust_pvalues(tests_frame[f"{test}_p"].to_numpy(), "holm")
    return pd.concat(levels, ignore_index=True), tests_frame, readings, plots, matched_frame


def two_levels_section(finished: pd.DataFrame, metrics: Sequence[str]):
    """(table, readings) when exactly one setting other than the four factors varies and takes two values
    (the clipping study: `sae.grad_clip` 0 and 1); else None. One row per (configuration, metric)."""
    from pipeline.design import FACTOR_PATHS
    from pipeline.stats import adjust_pvalues
    from pipeline.variance import paired_variance_comparison

    others = [path for path in varying_settings(finished) if path not in FACTOR_PATHS]
    if len(others) != 1:
        return None
    setting = others[0]
    values = sorted(pd.unique(finished[setting].astype(str)), key=lambda text: (_as_number(text), text))
    if len(values) != 2:
        return None
    frame = finished.assign(**{setting: finished[setting].astype(str)})
    groups = list(FACTOR_LEVELS)
    rows = []
    for metric in metrics:
        table = paired_variance_comparison(frame, setting, metric, group_columns=groups, levels=tuple(values))
        table["config"] = [
            "·".join(str(value) for value in cell) for cell in table[groups].itertuples(index=False)
        ]
        rows.extend(table.to_dict("records"))
    result = pd.DataFrame(rows)
    for column in ("mean_p", "p"):
        tested = result[column].notna()
        result[f"{column}_holm"] = math.nan
        if tested.any():
            result.loc[tested, f"{column}_holm"] = adjust_pvalues(
                result.loc[tested, column].to_numpy(), "holm"
            )
    shown = [
        "config", "metric", "pairs", "reference_mean", "mean", "mean_difference", "mean_ci_low", "mean_ci_high",
        "mean_p_holm", "reference_variance", "variance", "variance_ratio", "ratio_ci_low", "ratio_ci_high",
        "pair_correlation", "p", "p_holm",
    ]  # fmt: skip
    result = result[shown].rename(columns={"p": "variance_p", "p_holm": "variance_p_holm"})
    readings = []
    name = setting.rpartition(".")[2]
    for metric, rows_of_metric in result.groupby("metric", sort=False):
        narrower = rows_of_metric[
            (rows_of_metric["variance_p_holm"] < 0.05) & (rows_of_metric["variance_ratio"] < 1)
        ]
        wider = rows_of_metric[
            (rows_of_metric["variance_p_holm"] < 0.05) & (rows_of_metric["variance_ratio"] > 1)
        ]
        moved = rows_of_metric[rows_of_metric["mean_p_holm"] < 0.05]
        ratios = rows_of_metric["variance_ratio"].dropna()
        readings.append(
            f"{metric}: {name} {values[1]} against {values[0]} — seed variance clearly narrower in {len(narrower)} "
            f"and wider in {len(wider)} of {len(rows_of_metric)} configurations (Holm); variance ratio "
            f"{ratios.min():.3g} … {ratios.max():.3g} (median {ratios.median():.3g}); mean clearly moved in "
            f"{len(moved)} configuration(s)"
            + (
                ": "
                + "; ".join(
                    f"{row.config} {row.mean_difference:+.3g} [{row.mean_ci_low:.3g}, {row.mean_ci_high:.3g}]"
                    for row in moved.itertuples()
                )
                if len(moved)
                else ""
            )
            + "."
        )
    return result, readings


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def moderation_section(finished: pd.DataFrame, metrics: Sequence[str], baseline: str):
    """(table, readings) when exactly one setting other than the four factors varies and at least two of
    its levels hold a complete 2⁴ factorial (the SAE × training study); else None. The reference level is
    the baseline's."""
    from pipeline.design import FACTOR_PATHS
    from pipeline.moderation import complete_levels, factor_effects_by_level, moderation_readings

    others = [path for path in varying_settings(finished) if path not in FACTOR_PATHS]
    if len(others) != 1:
        return None
    moderator = others[0]
    factors = dict(FACTOR_LEVELS)
    if len(complete_levels(finished, moderator, factors)) < 2:
        return None
    reference = None
    if baseline in set(finished["config"]):
        reference = finished.loc[finished["config"] == baseline, moderator].iloc[0]
    if reference not in complete_levels(finished, moderator, factors):
        reference = None
    table = factor_effects_by_level(finished, moderator, metrics, factors, reference=reference)
    return table, moderation_readings(table)


def _conclusions_title(factorial: bool) -> str:
    scope = (
        "per factor: main effects of the 2⁴ factorial"
        if factorial
        else "per configuration against the baseline"
    )
    return f"Conclusions {scope} (clear = Holm-adjusted p < {SIGNIFICANCE}; [95 % CI] over seeds, unadjusted)"


def _bold_to_html(text: str) -> str:
    pieces = text.split("**")
    return "".join(f"<b>{piece}</b>" if index % 2 else piece for index, piece in enumerate(pieces))


def _readable_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    # The baseline is named once in the heading; the effect-size columns are named after the test they
    # belong to (d_z and its correction when paired, Cohen's d and Hedges' g when not).
    frame = comparisons.drop(columns=["config_b"]).rename(columns={"config_a": "configuration"})
    tests = set(frame["test"]) if len(frame) else set()
    if tests == {stats.PAIRED_TEST}:
        frame = frame.drop(columns=["effect_size"]).rename(
            columns={"d": "d_z", "g": "g_z (Hedges-corrected d_z)"}
        )
    elif tests == {stats.WELCH_TEST}:
        frame = frame.drop(columns=["effect_size"]).rename(columns={"d": "Cohen's d", "g": "Hedges' g"})
    return frame


def _readable_factorial(factorial: pd.DataFrame) -> pd.DataFrame:
    frame = factorial.drop(columns=["p_pooled_ols_holm"]).copy()
    frame["significant"] = ["yes" if p < SIGNIFICANCE else "" for p in frame["p_holm"].fillna(1.0)]
    return frame


def in_study_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered baseline first, then the published strategic order, then the other factorial cells."""
    if frame.empty:
        return frame
    names = ["·".join(cell) for cell in (*STRATEGIC_CONFIGURATIONS, *FACTORIAL_CONFIGURATIONS)]
    rank = {name: position for position, name in reversed(list(enumerate(names)))}
    # The factor part of a name ranks it; then the varying settings in numeric order (λ = 1e-5 before 1e-4).
    keys = frame["config"].map(lambda name: rank.get(name.split(" · ")[0], len(rank)))
    ordered = frame.assign(_rank=keys)
    sort_columns = ["_rank"]
    for position, path in enumerate(varying_settings(frame)):
        numeric = pd.to_numeric(frame[path], errors="coerce")
        ordered[f"_setting{position}"] = numeric if numeric.notna().all() else frame[path].astype(str)
        sort_columns.append(f"_setting{position}")
    helpers = [column for column in ordered.columns if column.startswith(("_rank", "_setting"))]
    return ordered.sort_values([*sort_columns, "config", "seed"], kind="stable").drop(columns=helpers)


def seed_counts(all_seeds: pd.DataFrame) -> pd.DataFrame:
    """Finished and failed seed runs per configuration (failed ones are counted, never dropped)."""
    if all_seeds.empty:
        return pd.DataFrame(columns=["configuration", "finished", "failed", "other"])
    status = all_seeds["status"]
    frame = all_seeds.assign(
        finished=status.eq("FINISHED"), failed=status.eq("FAILED"), other=~status.isin(["FINISHED", "FAILED"])
    )
    counts = frame.groupby("config", sort=False)[["finished", "failed", "other"]].sum().reset_index()
    return counts.rename(columns={"config": "configuration"}).astype(
        {"finished": int, "failed": int, "other": int}
    )


def summary_table(per_seed: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    rows = []
    for config, group in per_seed.groupby("config", sort=False):
        row: dict[str, object] = {"configuration": config, "n": len(group)}
        for metric in metrics:
            values = group[metric].dropna().to_numpy() if metric in group else []
            description = stats.describe(values)
            row[metric] = mean_plus_minus(description["mean"], description["std"])
        rows.append(row)
    return pd.DataFrame(rows)


def published_table(per_seed: pd.DataFrame) -> pd.DataFrame | None:
    """The blog's numbers (seed 002), the published code's measured output and ours, per configuration.

    The published code's output is known for the baseline only (docs/science.md §1.4b); elsewhere it is "–".
    """
    rows = []
    for config, published in PUBLISHED.items():
        group = per_seed[per_seed["config"] == config]
        if group.empty:
            continue
        row: dict[str, object] = {"configuration": config, "n": len(group)}
        for (label, metric, _), value in zip(PUBLISHED_METRICS, published, strict=True):
            ours = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            row[f"{label} blog (seed 002)"] = value
            if label in PUBLISHED_CODE_BASELINE:
                row[f"{label} published code"] = (
                    PUBLISHED_CODE_BASELINE[label] if config == BASELINE_NAME else "–"
                )
            row[f"{label} ours"] = mean_plus_minus(ours.mean(), ours.std()) if len(ours) else "–"
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def published_definitions() -> pd.DataFrame:
    """Which of our columns stands beside each published metric, and why the numbers may differ."""
    return pd.DataFrame(
        [
            {"metric": label, "our column": metric, "why they may differ": reason}
            for label, metric, reason in PUBLISHED_METRICS
        ]
    )


def factorial_is_complete(per_seed: pd.DataFrame, minimum_per_cell: int = 2) -> tuple[bool, list[str]]:
    """Whether all 16 factor cells have >= minimum_per_cell finished seeds; else the short cells' names.

    Cells are found by the factor columns (init, noise, reg, act), not by configuration names, which may
    carry other settings ('… · λ=0.001')."""
    if per_seed.empty or not set(FACTOR_LEVELS) <= set(per_seed.columns):
        return False, ["·".join(cell) for cell in FACTORIAL_CONFIGURATIONS]
    counts = per_seed.groupby(list(FACTOR_LEVELS)).size()
    short = [
        "·".join(cell) for cell in FACTORIAL_CONFIGURATIONS if counts.get(tuple(cell), 0) < minimum_per_cell
    ]
    return not short, short


def factorial_scope(finished: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, str]:
    """The seeds the 2⁴ factorial is analysed on, and a phrase saying where.

    When other settings vary too (a λ sweep crossed with the factors), the factorial is analysed among the
    configurations that share the baseline's other settings, so that each cell is one configuration;
    the rest enter the pairwise comparisons only."""
    from pipeline.design import FACTOR_PATHS, field_specs

    others = [path for path in varying_settings(finished) if path not in FACTOR_PATHS]
    if not others or baseline not in set(finished["config"]):
        return finished, ""
    reference = finished[finished["config"] == baseline].iloc[0]
    mask = pd.Series(True, index=finished.index)
    for path in others:
        mask &= finished[path].astype(str) == str(reference[path])
    specs = field_specs()
    where = ", ".join(f"{specs[path].short}={reference[path]}" for path in others)
    return finished[mask], where


def _missing_value_notes(finished: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """One note per metric that is NaN (or ±inf) for some finished seeds: the statistics leave those seeds
    out, and a reader must be told so rather than see a mean over fewer seeds than the counts say."""
    notes = []
    for metric in metrics:
        values = pd.to_numeric(finished[metric], errors="coerce")
        missing = ~np.isfinite(values.to_numpy(dtype=float))
        if missing.any():
            where = sorted(pd.unique(finished.loc[missing, "config"]))
            notes.append(
                f"{metric} is NaN or infinite for {int(missing.sum())} of {len(finished)} finished seeds "
                f"({', '.join(map(str, where))}); its statistics use the other seeds only."
            )
    return notes


def build_report(
    all_seeds: pd.DataFrame,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    baseline: str = BASELINE_NAME,
    paired: bool | None = None,
    n_resamples: int = 9999,
    figures: bool = True,
    extra_notes: Sequence[str] = (),
    context: StudyContext | None = None,
) -> Report:
    """Build a report from the tidy seed table (every status; only FINISHED seeds enter statistics).

    Columns needed: config, seed, status, the four factor columns, and the metric columns. ``paired``:
    None pairs each configuration with the baseline on shared seeds (the design shares random numbers
    by seed), True insists, False asks for Welch's test. ``context`` names the store, sweeps, code
    versions and settings for the Study section and the caveats.
    """
    metrics = list(metrics)
    context = context or StudyContext()
    all_seeds = in_study_order(all_seeds)
    finished = all_seeds[all_seeds["status"] == "FINISHED"].copy() if not all_seeds.empty else all_seeds
    missing_metrics = [metric for metric in metrics if metric not in finished.columns]
    if missing_metrics:
        raise ValueError(
            f"metric(s) {missing_metrics} are not in the store; available: {sorted(finished.columns)}"
        )
    configs = list(pd.unique(finished["config"]))
    if baseline not in configs:
        raise ValueError(
            f"baseline {baseline!r} has no finished seeds; configurations present: {', '.join(configs)}"
        )
    counts = seed_counts(all_seeds)
    comparisons = stats.compare_to_baseline(
        finished,
        config_column="config",
        metrics=metrics,
        baseline=baseline,
        paired=paired,
        n_resamples=n_resamples,
    )
    factorial_rows, factorial_where = factorial_scope(finished, baseline)
    complete, short = factorial_is_complete(factorial_rows)
    factorial = (
        stats.factorial_effects(factorial_rows, factors=dict(FACTOR_LEVELS), metrics=metrics)
        if complete
        else None
    )
    notes = _method_notes(finished, counts, comparisons, factorial, n_resamples)
    if factorial is not None and factorial_where:
        notes.append(
            f"Other settings vary too: the 2⁴ factorial is analysed at the baseline's {factorial_where}; "
            "configurations at other values enter the pairwise comparisons only."
        )
    notes.extend(_missing_value_notes(finished, metrics))
    notes.extend(extra_notes)
    present = set(configs)
    strategic = {"·".join(cell) for cell in STRATEGIC_CONFIGURATIONS}
    factorial_names = {"·".join(cell) for cell in FACTORIAL_CONFIGURATIONS}
    if present <= strategic and present != strategic:
        notes.append(f"Missing from the strategic 8: {', '.join(sorted(strategic - present))}.")
    has_factorial_cells = bool(present & factorial_names) or bool(factorial_where)
    if factorial is None and has_factorial_cells and present - strategic and len(short) < 16:
        scope = f" at {factorial_where}" if factorial_where else ""
        notes.append(f"Factorial incomplete{scope}; cells with < 2 finished seeds: {', '.join(short)}.")

    if factorial is not None:
        main_effects = factorial[factorial["effect"].isin(list(FACTOR_LEVELS))]
        table = conclusions.conclusion_table(main_effects.rename(columns={"contrast": "subject"}), "subject")
    else:
        rows = comparisons.rename(columns={"config_a": "subject", "diff": "estimate"})
        level_columns = list(FACTOR_LEVELS) + [
            path for path in varying_settings(finished) if path not in {f"network.{f}" for f in FACTOR_LEVELS}
        ]
        levels = finished.drop_duplicates("config").set_index("config")[level_columns]
        rows["subject"] = [_with_changes(name, baseline, levels) for name in rows["subject"]]
        table = conclusions.conclusion_table(rows, "subject")
    differing = non_default_settings(context.settings)
    caveats = derive_caveats(all_seeds, finished, counts, factorial, differing)
    published, published_absent = published_section(finished, context.settings, differing)
    report = Report(
        per_seed=finished,
        counts=counts,
        summary=summary_table(finished, metrics),
        comparisons=comparisons,
        factorial=factorial,
        published=published,
        verdicts=conclusions.conclusion_lines(table),
        notes=notes,
        metrics=metrics,
        baseline=baseline,
        study=study_lines(finished, context, differing),
        conclusions=table,
        caveats=caveats,
        published_absent=published_absent,
    )
    dose = dose_response_section(finished, metrics, figures=figures, baseline=baseline)
    if dose is not None:
        report.dose_levels, report.dose_tests, report.dose_readings, dose_figures, report.dose_matched = dose
        report.figures.update(dose_figures)
    two_levels = two_levels_section(finished, metrics)
    if two_levels is not None:
        report.two_levels, report.two_levels_readings = two_levels
    moderation = moderation_section(finished, metrics, baseline)
    if moderation is not None:
        report.moderation, report.moderation_readings = moderation
        if figures:
            from pipeline.plots.moderation import effects_by_level_figure

            moderator = str(report.moderation["moderator"].iloc[0]).rpartition(".")[2]
            report.figures[f"effects_by_{moderator}"] = effects_by_level_figure(report.moderation)
    if figures:
        if len(table):
            report.figures["conclusions"] = effects_forest_plot(table)
        for metric in metrics:
            report.figures[f"seeds_{metric}"] = seed_strip_plot(finished, "config", metric, baseline=baseline)
            if factorial is not None:
                report.figures[f"main_effects_{metric}"] = main_effects_plot(
                    factorial_rows, dict(FACTOR_LEVELS), metric
                )
                report.figures[f"interactions_{metric}"] = interaction_grid(
                    factorial_rows, dict(FACTOR_LEVELS), metric
                )
    return report


def _with_changes(config: str, baseline: str, levels: pd.DataFrame) -> str:
    """'orthogonal·bipolar·l2·gelu (init, reg, act changed)': which factors and settings a comparison
    changes at once.

    ``levels``: one row per configuration, one column per factor or varying setting.
    """
    if config not in levels.index or baseline not in levels.index:
        return config
    changed = [
        column.removeprefix("network.")
        for column in levels.columns
        if str(levels.loc[config, column]) != str(levels.loc[baseline, column])
    ]
    return f"{config} ({', '.join(changed)} changed)" if changed else config


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The per-seed table's setting columns (dotted config paths), in field order."""
    from pipeline.design import field_specs

    return [path for path in field_specs() if path in frame.columns]


def varying_settings(frame: pd.DataFrame) -> list[str]:
    """Setting columns whose value differs between the configurations (config hashes) of the table."""
    columns = setting_columns(frame)
    if frame.empty or "config_hash" not in frame:
        return []
    per_config = frame.drop_duplicates("config_hash")[columns].astype(str)
    return [column for column in columns if per_config[column].nunique() > 1]


def relabel_configurations(frame: pd.DataFrame) -> pd.DataFrame:
    """Name every configuration (config hash) of a per-seed table by its factors and the settings that
    differ between the configurations present: 'random·bipolar·l1·relu · λ=0.001'.

    Grouping is by identity, so two configurations with the same factor levels but another λ are two
    rows of every table, never one. Within one sweep the names equal the run names. Rows without a config
    hash or settings keep their name.
    """
    from pipeline.design import FACTOR_PATHS, coerce_value, field_specs, format_value

    if frame.empty or "config_hash" not in frame or not setting_columns(frame):
        return frame
    specs = field_specs()
    varying = [path for path in varying_settings(frame) if path not in FACTOR_PATHS]
    frame = frame.copy()
    labels: dict[str, str] = {}
    for config_hash, rows in frame.groupby("config_hash", sort=False):
        first = rows.iloc[0]
        factors = "·".join(str(first[path]) for path in FACTOR_PATHS if path in rows) or str(first["config"])
        extras = []
        for path in varying:
            try:
                shown = format_value(coerce_value(path, first[path]))
            except ValueError:
                shown = str(first[path])
            extras.append(f"{specs[path].short}={shown}")
        labels[config_hash] = " · ".join([factors, *extras])
    frame["config"] = [
        labels.get(value, name) for value, name in zip(frame["config_hash"], frame["config"], strict=True)
    ]
    return frame


def default_baseline(frame: pd.DataFrame) -> str:
    """The configuration to compare against when none is named: the published baseline when present,
    else the finished configuration with the fewest settings away from the published defaults (the
    first of those in table order)."""
    from pipeline.design import coerce_value, field_specs

    finished = frame[frame["status"] == "FINISHED"] if "status" in frame else frame
    configs = list(pd.unique(finished["config"]))
    if BASELINE_NAME in configs or not configs:
        return BASELINE_NAME
    specs = field_specs()
    columns = setting_columns(finished)

    def distance(config: str) -> int:
        row = finished[finished["config"] == config].iloc[0]
        differing = 0
        for path in columns:
            try:
                differing += coerce_value(path, row[path]) != specs[path].default
            except ValueError:
                differing += 1
        return differing

    return min(configs, key=distance)


def _method_notes(finished, counts, comparisons, factorial, n_resamples: int) -> list[str]:
    tests = comparisons["test"].value_counts().to_dict() if len(comparisons) else {}
    described = ", ".join(f"{test} ({count} rows)" for test, count in tests.items()) or "none"
    notes = [
        f"{len(finished)} finished seed runs in {finished['config'].nunique()} configurations; "
        f"{int(counts['failed'].sum())} failed seed runs are counted in the seed table and left out of the statistics.",
        "Seed k of every configuration shares its data set, SAE initialization, network initialization (per "
        "init level) and noise draws (per noise kind), so the seed is the unit of replication: comparisons "
        "are paired on seed where both configurations ran it, factorial effects are tested across seeds, "
        "and bootstrap intervals resample whole seeds.",
        f"Comparisons with the baseline: {described}. "
        + " ".join(
            text
            for test, text in (
                (
                    stats.PAIRED_TEST,
                    "Paired rows: effect size d_z = mean per-seed difference / its SD, g_z its Hedges correction.",
                ),
                (stats.WELCH_TEST, "Welch rows: Cohen's d with pooled SD and Hedges' g."),
            )
            if test in tests
        )
        + f" CI: bootstrap 95 % of the mean difference over seeds ({n_resamples} resamples, BCa); Holm and "
        "Benjamini–Hochberg adjusted p across every row of that table.",
    ]
    if factorial is not None:
        seeds = int(factorial["seeds"].min())
        notes.append(
            f"The 2⁴ factorial is complete: each of the 15 effects is the mean of its per-seed contrast over "
            f"{seeds} seeds with every cell, tested with a one-sample t (df = {seeds - 1}); Holm across the 15 "
            "effects of each metric (bench/factorial_inference.py: this test keeps its false-positive rate at "
            "5 % on seed-shared data, the pooled OLS does not)."
        )
    return notes


def non_default_settings(settings: Mapping[str, Mapping[str, str]]) -> dict[str, list[str]]:
    """Every stored setting that differs from the published defaults: field → the values seen.

    The four factor fields are the design, not settings, and are left out.
    """
    defaults = {name: _as_param(value) for name, value in flatten(AblationConfig()).items()}
    factor_fields = {f"network.{factor}" for factor in FACTOR_LEVELS}
    differing: dict[str, set[str]] = {}
    for values in settings.values():
        for name, default in defaults.items():
            if name in factor_fields or name not in values:
                continue
            if str(values[name]) != default:
                differing.setdefault(name, set()).add(str(values[name]))
    return {name: sorted(found) for name, found in sorted(differing.items())}


def _as_param(value: object) -> str:
    # Stored params are strings; lists were stored as JSON (tracking.taming._params).
    return json.dumps(value) if isinstance(value, list) else str(value)


def study_lines(
    finished: pd.DataFrame, context: StudyContext, differing: Mapping[str, list[str]]
) -> list[str]:
    seeds = finished.groupby("config")["seed"].nunique()
    lines = []
    if context.store:
        lines.append(f"Store: {context.store}; experiment: {context.experiment or '–'}.")
    lines.append(
        "Sweeps: "
        + (", ".join(context.sweep_ids) if context.sweep_ids else "none recorded on these runs")
        + "."
    )
    if context.code_versions:
        lines.append("Code version(s): " + ", ".join(context.code_versions) + ".")
    lines.append(
        f"{finished['config'].nunique()} configurations, {seeds.min()}–{seeds.max()} finished seeds each."
        if len(seeds) and seeds.min() != seeds.max()
        else f"{finished['config'].nunique()} configurations, {seeds.max() if len(seeds) else 0} finished seeds each."
    )
    if not context.settings:
        lines.append("Settings: not recorded with these runs.")
    elif differing:
        lines.append(
            "Settings that differ from the published defaults: "
            + "; ".join(f"{name} = {', '.join(values)}" for name, values in differing.items())
            + "."
        )
    else:
        lines.append("Settings: the published defaults (only the four factors vary).")
    return lines


def derive_caveats(all_seeds, finished, counts, factorial, differing: Mapping[str, list[str]]) -> list[str]:
    """Caveats from the design and the data, never written for one result."""
    caveats = []
    design = finished.drop_duplicates("config")[list(FACTOR_LEVELS)]
    caveats += conclusions.confounded_factors(design, FACTOR_LEVELS)
    caveats += conclusions.constant_factors(design, FACTOR_LEVELS)
    seeds = finished.groupby("config")["seed"].nunique()
    if "code_version" in finished:
        versions = finished.groupby("config")["code_version"].nunique()
        mixed = versions[versions > 1].index.tolist()
        if mixed:
            caveats.append(
                f"Seeds of {', '.join(mixed)} come from {int(versions.max())} code versions (runs made before "
                "and after an edit of the training code); narrow the selection with --sweep-id or --filter to "
                "compare one version."
            )
    untestable = counts[counts["finished"] < 2]["configuration"].tolist()
    if untestable:
        caveats.append(f"Fewer than 2 finished seeds (listed with n, no test): {', '.join(untestable)}.")
    thin = seeds[seeds < THIN_SEEDS]
    if len(thin):
        listed = (
            f"all {len(seeds)} configurations have "
            + (f"{thin.min()}" if thin.min() == thin.max() else f"{thin.min()}–{thin.max()}")
            if len(thin) == len(seeds)
            else f"{len(thin)} configuration(s) have "
            + ", ".join(f"{name} {count}" for name, count in thin.items())
            + ","
        )
        caveats.append(
            f"Thin data: {listed} finished seeds, fewer than {THIN_SEEDS}; intervals are wide and a "
            "'no clear effect' says little."
        )
    failed = counts[counts["failed"] > 0]
    if len(failed):
        reasons = (
            all_seeds.loc[all_seeds["status"] == "FAILED", "failure_reason"].dropna().unique().tolist()
            if "failure_reason" in all_seeds
            else []
        )
        caveats.append(
            f"Failed seed runs in {len(failed)} configuration(s) ("
            + ", ".join(f"{row.configuration} {row.failed}" for row in failed.itertuples())
            + ") are excluded, so those configurations rest on fewer seeds"
            + (f"; first reason: {reasons[0]}" if reasons else "")
            + "."
        )
    unfinished = counts[counts["other"] > 0]
    if len(unfinished):
        caveats.append(
            f"{int(unfinished['other'].sum())} seed run(s) neither finished nor failed (interrupted or still "
            "running); resume the sweep to complete them."
        )
    short_training = [name for name in ("network.epochs", "sae.epochs") if name in differing]
    if short_training:
        caveats.append(
            "Trained for "
            + ", ".join(f"{name} = {', '.join(differing[name])}" for name in short_training)
            + " instead of the published 2000/1000 epochs: networks and SAEs may be unconverged, and effects "
            "at these sizes need not hold at the published ones."
        )
    elif differing:
        caveats.append(
            "Settings differ from the published protocol (see Study): results speak to those settings."
        )
    if factorial is not None:
        interactions = factorial[
            (factorial["effect"].str.contains(":")) & (factorial["p_holm"] < SIGNIFICANCE)
        ]
        for row in interactions.itertuples():
            caveats.append(
                f"{row.metric}: the {row.contrast} is clear (p_holm {format_number(row.p_holm)}), so the main "
                "effects of its factors depend on each other's levels; read them with the interaction plots."
            )
    return caveats


def published_section(
    finished: pd.DataFrame, settings: Mapping[str, Mapping[str, str]], differing: Mapping[str, list[str]]
) -> tuple[pd.DataFrame | None, str]:
    """The published-beside-ours table, or why it is absent (non-published settings, unknown settings)."""
    if not settings:
        return (
            None,
            "Not shown: these runs carry no settings, so it is unknown whether they used the published protocol.",
        )
    if differing:
        return None, (
            "Not shown: these runs do not use the published settings ("
            + ", ".join(differing)
            + " differ), so the published numbers are not comparable."
        )
    return published_table(finished), ""
