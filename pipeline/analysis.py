"""The analysis stage, pure: per-seed DataFrame in, tables, verdicts, figures and report files out.

`tracking/analysis.py` fetches the per-seed table from the store and logs the files written here; nothing
in this module knows about MLflow, so a report can be rebuilt from any CSV of per-seed values.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pipeline import stats
from pipeline.config import BASELINE, FACTOR_LEVELS, FACTORIAL_CONFIGURATIONS, STRATEGIC_CONFIGURATIONS
from pipeline.metrics import HEADLINE_METRICS
from pipeline.plots.report import interaction_grid, main_effects_plot, seed_strip_plot
from pipeline.tables import format_number, markdown_table, mean_plus_minus

BASELINE_NAME = "·".join(BASELINE)
DEFAULT_METRICS = HEADLINE_METRICS
SIGNIFICANCE = 0.05

# Seed 002's table (10 seeds each): MACS, Interference, Train MSE, Val MSE, L0 by configuration.
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
    figures: dict[str, Figure] = field(default_factory=dict)

    def headline(self) -> str:
        """Notes and verdicts only: short enough for a run description."""
        lines = [f"- {note}" for note in self.notes]
        if self.verdicts:
            lines += ["", "What matters (Holm-adjusted p < 0.05):"] + [f"- {line}" for line in self.verdicts]
        return "\n".join(lines)

    def markdown(self) -> str:
        sections = ["# Polysemanticity lab report", ""]
        sections += [f"- {note}" for note in self.notes] + [""]
        sections += ["## Seeds per configuration", "", markdown_table(self.counts), ""]
        sections += ["## Mean ± std over finished seeds", "", markdown_table(self.summary), ""]
        if self.verdicts:
            sections += (
                ["## What matters (Holm-adjusted p < 0.05)", ""]
                + [f"- {line}" for line in self.verdicts]
                + [""]
            )
        if self.factorial is not None:
            sections += ["## Factorial effects (2⁴, OLS/ANOVA; estimate = mean(high) − mean(low))", ""]
            sections += [markdown_table(_readable_factorial(self.factorial)), ""]
        sections += [f"## Every configuration against the baseline {self.baseline}", ""]
        sections += [markdown_table(_readable_comparisons(self.comparisons)), ""]
        if self.published is not None:
            sections += ["## Published (seed 002) beside ours", "", markdown_table(self.published), ""]
            sections += [markdown_table(published_definitions()), ""]
        return "\n".join(sections)

    def write(self, folder: Path) -> list[Path]:
        """comparisons.csv, factorial.csv, report.md, report.html and one PNG per figure."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        path = folder / "comparisons.csv"
        self.comparisons.to_csv(path, index=False)
        written.append(path)
        path = folder / "factorial.csv"
        (
            self.factorial if self.factorial is not None else pd.DataFrame(columns=stats.FACTORIAL_COLUMNS)
        ).to_csv(path, index=False)
        written.append(path)
        path = folder / "per_seed.csv"
        self.per_seed.to_csv(path, index=False)
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
            "<h1>Polysemanticity lab report</h1><ul>",
            *(f"<li>{html.escape(note)}</li>" for note in self.notes),
            "</ul>",
        ]
        if self.verdicts:
            parts += ["<h2>What matters (Holm-adjusted p &lt; 0.05)</h2><ul>"]
            parts += [f"<li>{html.escape(line)}</li>" for line in self.verdicts] + ["</ul>"]
        tables = [
            ("Seeds per configuration", self.counts),
            ("Mean ± std over finished seeds", self.summary),
            (
                "Factorial effects",
                _readable_factorial(self.factorial) if self.factorial is not None else None,
            ),
            (
                f"Every configuration against the baseline {self.baseline}",
                _readable_comparisons(self.comparisons),
            ),
            ("Published (seed 002) beside ours", self.published),
            (
                "How the published metrics map onto ours",
                published_definitions() if self.published is not None else None,
            ),
        ]
        for title, frame in tables:
            if frame is None:
                continue
            shown = frame.map(lambda value: format_number(value))
            parts += [f"<h2>{html.escape(title)}</h2>", shown.to_html(index=False, escape=True)]
        parts.append("<h2>Figures</h2>")
        for name, data in images.items():
            encoded = base64.b64encode(data).decode()
            parts.append(
                f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>"
            )
        parts.append("</body></html>")
        return "\n".join(parts)


def _readable_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    # The baseline is named once in the heading and Hedges' g stands for the effect size, so both
    # config_b and Cohen's d are left out of the printed table (they stay in comparisons.csv).
    columns = [column for column in stats.COMPARISON_COLUMNS if column not in ("config_b", "cohen_d")]
    return comparisons[columns].rename(columns={"config_a": "configuration"})


def _readable_factorial(factorial: pd.DataFrame) -> pd.DataFrame:
    frame = factorial.copy()
    frame["significant"] = ["yes" if p < SIGNIFICANCE else "" for p in frame["p_holm"].fillna(1.0)]
    return frame


def in_study_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered baseline first, then the published strategic order, then the other factorial cells."""
    if frame.empty:
        return frame
    names = ["·".join(cell) for cell in (*STRATEGIC_CONFIGURATIONS, *FACTORIAL_CONFIGURATIONS)]
    rank = {name: position for position, name in reversed(list(enumerate(names)))}
    keys = frame["config"].map(lambda name: rank.get(name, len(rank)))
    return (
        frame.assign(_rank=keys).sort_values(["_rank", "config", "seed"], kind="stable").drop(columns="_rank")
    )


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
    """Seed 002's numbers beside our means (± std) for the strategic configurations present."""
    rows = []
    for config, published in PUBLISHED.items():
        group = per_seed[per_seed["config"] == config]
        if group.empty:
            continue
        row: dict[str, object] = {"configuration": config, "n": len(group)}
        for (label, metric, _), value in zip(PUBLISHED_METRICS, published, strict=True):
            ours = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            row[f"{label} published"] = value
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
    """Whether all 16 cells have >= minimum_per_cell finished seeds; else the names of the short cells."""
    counts = per_seed.groupby("config").size()
    short = [
        "·".join(cell)
        for cell in FACTORIAL_CONFIGURATIONS
        if counts.get("·".join(cell), 0) < minimum_per_cell
    ]
    return not short, short


def verdicts_from_factorial(factorial: pd.DataFrame) -> list[str]:
    lines = []
    for metric, group in factorial.groupby("metric", sort=False):
        significant = group[group["p_holm"] < SIGNIFICANCE].sort_values("p_holm")
        if significant.empty:
            lines.append(
                f"{metric}: no factor or interaction survives Holm correction at α = {SIGNIFICANCE}."
            )
            continue
        parts = [
            f"{row.effect} ({'+' if row.estimate >= 0 else '−'}{format_number(abs(row.estimate))}, "
            f"p_holm = {format_number(row.p_holm)})"
            for row in significant.itertuples()
        ]
        lines.append(f"{metric}: " + "; ".join(parts) + ".")
    return lines


def verdicts_from_comparisons(comparisons: pd.DataFrame) -> list[str]:
    lines = []
    for metric, group in comparisons.groupby("metric", sort=False):
        significant = group[group["p_holm"] < SIGNIFICANCE]
        if significant.empty:
            lines.append(f"{metric}: no configuration differs from the baseline after Holm correction.")
            continue
        parts = [
            f"{row.config_a} ({'+' if row.diff >= 0 else '−'}{format_number(abs(row.diff))}, g = "
            f"{format_number(row.hedges_g)}, p_holm = {format_number(row.p_holm)})"
            for row in significant.itertuples()
        ]
        lines.append(f"{metric} vs baseline: " + "; ".join(parts) + ".")
    return lines


def build_report(
    all_seeds: pd.DataFrame,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    baseline: str = BASELINE_NAME,
    paired: bool = False,
    n_resamples: int = 9999,
    figures: bool = True,
    extra_notes: Sequence[str] = (),
) -> Report:
    """Build a report from the tidy seed table (every status; only FINISHED seeds enter statistics).

    Columns needed: config, seed, status, the four factor columns, and the metric columns.
    """
    metrics = list(metrics)
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
    notes = [
        f"{len(finished)} finished seed runs in {len(configs)} configurations; "
        f"{int(counts['failed'].sum())} failed seed runs counted in the table below and left out of the statistics.",
        f"Tests: {'paired t-test on shared seeds' if paired else 'Welch t-test'}; Cohen's d with pooled SD, Hedges' g; "
        f"bootstrap 95 % CI of the difference in means ({n_resamples} resamples); Holm and Benjamini–Hochberg "
        "adjusted p across every comparison in the table.",
    ]
    notes.extend(extra_notes)
    thin = counts[counts["finished"] < 2]["configuration"].tolist()
    if thin:
        notes.append(f"Fewer than 2 finished seeds (listed with n, no test): {', '.join(thin)}.")
    present = set(configs)
    strategic = {"·".join(cell) for cell in STRATEGIC_CONFIGURATIONS}
    factorial_names = {"·".join(cell) for cell in FACTORIAL_CONFIGURATIONS}
    if present <= strategic and present != strategic:
        notes.append(f"Missing from the strategic 8: {', '.join(sorted(strategic - present))}.")
    comparisons = stats.compare_to_baseline(
        finished,
        config_column="config",
        metrics=metrics,
        baseline=baseline,
        paired=paired,
        n_resamples=n_resamples,
    )
    complete, short = factorial_is_complete(finished)
    factorial = None
    if complete:
        factorial = stats.factorial_effects(finished, factors=dict(FACTOR_LEVELS), metrics=metrics)
        notes.append(
            "The 2⁴ factorial is complete: all 15 effects fitted by OLS/ANOVA; Holm across the 15 effects of each metric."
        )
    elif present & factorial_names and present - strategic:
        notes.append(f"Factorial incomplete; cells with < 2 finished seeds: {', '.join(short)}.")
    verdicts = (
        verdicts_from_factorial(factorial)
        if factorial is not None
        else verdicts_from_comparisons(comparisons)
    )
    report = Report(
        per_seed=finished,
        counts=counts,
        summary=summary_table(finished, metrics),
        comparisons=comparisons,
        factorial=factorial,
        published=published_table(finished),
        verdicts=verdicts,
        notes=notes,
        metrics=metrics,
        baseline=baseline,
    )
    if figures:
        for metric in metrics:
            report.figures[f"seeds_{metric}"] = seed_strip_plot(finished, "config", metric, baseline=baseline)
            if factorial is not None:
                report.figures[f"main_effects_{metric}"] = main_effects_plot(
                    finished, dict(FACTOR_LEVELS), metric
                )
                report.figures[f"interactions_{metric}"] = interaction_grid(
                    finished, dict(FACTOR_LEVELS), metric
                )
    return report
