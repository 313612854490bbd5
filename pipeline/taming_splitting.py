"""Analysis of the splitting remedy on the taming MLP: stored per-network records in, (table, readings,
figures) out. Pure: no store, no training (the computation is `pipeline.experiments.taming_splitting`).

Input: one row per (configuration, seed, arm, epochs) with the record fields of
`pipeline.experiments.taming_splitting.RECORD_FIELDS` and the columns config, seed, arm ("baseline" or
"split"), epsilon (NaN for the baseline), epochs.

Statistics (docs/science.md §4). Each split arm (ε, E) is compared with the no-split baseline fine-tuned for
the same E epochs, paired on (configuration, seed): only pairs present in both enter. Seeds are the
independent replicates; the configurations of a sweep share seeds (same data, inits, noise), so they are not
pooled as independent: the paired differences are first averaged over configurations within each seed,
then a Student t-interval and a paired t-test (`scipy.stats.ttest_rel` on the per-seed means, equivalently
a one-sample t on the per-seed differences) run across seeds. Holm adjusts the p-values of each metric over
the (ε, E) comparisons. `per_configuration_table` gives the same comparison within each configuration
(paired over its seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats

from pipeline import stats

# Compared between arms, with the words a table or a reading uses.
COMPARED_METRICS: dict[str, str] = {
    "polysemantic_after": "polysemantic neurons",
    "polysemantic_fraction_after": "polysemantic fraction",
    "resolved_fraction": "resolved fraction",
    "val_mse_after": "validation MSE",
}
# The value before splitting of each compared metric (None: no "before" exists).
BEFORE_OF = {
    "polysemantic_after": "polysemantic_before",
    "polysemantic_fraction_after": "polysemantic_fraction_before",
    "resolved_fraction": None,
    "val_mse_after": "val_mse_before",
}
TABLE_COLUMNS = (
    "epsilon",
    "epochs",
    "metric",
    "before",
    "baseline",
    "split",
    "difference",
    "ci_low",
    "ci_high",
    "t",
    "p",
    "p_holm",
    "seeds",
    "networks",
)
# What the split command prints in the terminal: the table without t, p (p_holm is the one to read) and
# the count of stored networks, to fit a terminal's width.
TERMINAL_COLUMNS = tuple(column for column in TABLE_COLUMNS if column not in ("t", "p", "networks"))
PAIR_KEYS = ("config", "seed")
METHOD = (
    "paired on (configuration, seed) against the no-split baseline fine-tuned for the same epochs; "
    "differences averaged over configurations within each seed, then a t-interval and paired t-test "
    "across seeds (configurations share seeds, so they are not pooled as independent replicates); "
    "Holm over the (ε, epochs) comparisons of each metric"
)


def _check(frame: pd.DataFrame) -> None:
    missing = [
        column
        for column in (*PAIR_KEYS, "arm", "epsilon", "epochs", *COMPARED_METRICS)
        if column not in frame
    ]
    if missing:
        raise ValueError(f"split records lack columns {', '.join(missing)}")


def _seed_values(pairs: pd.DataFrame, metric: str, side: str) -> pd.Series:
    """Per-seed value of one side ("split" or "baseline") of the paired rows, averaged over configurations.

    The resolved fraction is pooled within seed (resolved neurons / originally polysemantic neurons over the
    seed's configurations), so a network with no polysemantic neuron adds nothing rather than a NaN.
    """
    if metric == "resolved_fraction":
        grouped = pairs.groupby("seed")
        resolved = grouped[f"resolved_{side}"].sum()
        total = grouped["polysemantic_before"].sum()
        return (resolved / total.where(total > 0)).astype(float)
    return pairs.groupby("seed")[f"{metric}_{side}"].mean()


def _paired_rows(frame: pd.DataFrame, epsilon: float, epochs: int) -> pd.DataFrame:
    """Rows of split arm (ε, E) joined with the baseline at E on (config, seed): suffixes _split, _baseline."""
    split = frame[
        (frame["arm"] == "split")
        & np.isclose(frame["epsilon"].astype(float), epsilon)
        & (frame["epochs"] == epochs)
    ]
    baseline = frame[(frame["arm"] == "baseline") & (frame["epochs"] == epochs)]
    columns = [
        *PAIR_KEYS,
        *COMPARED_METRICS,
        "resolved",
        "polysemantic_before",
        "polysemantic_fraction_before",
        "val_mse_before",
    ]
    columns = list(dict.fromkeys(column for column in columns if column in frame))
    merged = split[columns].merge(
        baseline[[*PAIR_KEYS, *[c for c in columns if c not in PAIR_KEYS]]],
        on=list(PAIR_KEYS),
        suffixes=("_split", "_baseline"),
    )
    # "Before" is the same stored network on both sides; keep one copy under the plain name.
    for name in ("polysemantic_before", "polysemantic_fraction_before", "val_mse_before"):
        if f"{name}_split" in merged:
            merged[name] = merged[f"{name}_split"]
    return merged


def paired_difference(
    split: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """Mean of split − baseline over aligned replicates (seeds) with its t-interval, and the paired t-test.

    `split`, `baseline`: [seed], aligned; pairs with a NaN on either side are dropped. Returns difference,
    ci_low, ci_high (x̄_d ± t_{(1+confidence)/2, n−1}·s_d/√n), t, p (`scipy.stats.ttest_rel`), n. With
    fewer than 2 pairs, or differences constant, the interval and test are NaN (the difference stands).
    """
    a = np.asarray(split, dtype=float)
    b = np.asarray(baseline, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    described = stats.describe(a - b, confidence=confidence)
    result = {
        "difference": described["mean"],
        "ci_low": described["ci_low"],
        "ci_high": described["ci_high"],
        "t": math.nan,
        "p": math.nan,
        "n": float(a.size),
    }
    if a.size >= 2 and np.ptp(a - b) > 0:
        test = scipy.stats.ttest_rel(a, b)
        result.update(t=float(test.statistic), p=float(test.pvalue))
    elif a.size >= 2:
        result.update(ci_low=result["difference"], ci_high=result["difference"])
    return result


def _comparison(pairs: pd.DataFrame, metric: str) -> dict[str, float]:
    split = _seed_values(pairs, metric, "split")
    baseline = _seed_values(pairs, metric, "baseline")
    aligned = pd.concat([split.rename("split"), baseline.rename("baseline")], axis=1)
    tested = paired_difference(aligned["split"], aligned["baseline"])
    before_name = BEFORE_OF[metric]
    before = pairs.groupby("seed")[before_name].mean().mean() if before_name else math.nan
    return {
        "before": float(before),
        "baseline": float(aligned["baseline"].mean()),
        "split": float(aligned["split"].mean()),
        **{name: tested[name] for name in ("difference", "ci_low", "ci_high", "t", "p")},
        "seeds": tested["n"],
        "networks": float(len(pairs)),
    }


def split_arms(frame: pd.DataFrame) -> list[tuple[float, int]]:
    """The (ε, E) split arms present, sorted by E then ε."""
    split = frame[frame["arm"] == "split"]
    return sorted(
        {(float(e), int(n)) for e, n in zip(split["epsilon"], split["epochs"], strict=True)},
        key=lambda x: (x[1], x[0]),
    )


def comparison_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per split arm (ε, E) and compared metric: the mean before splitting, the baseline's and the
    split arm's mean after fine-tuning, their paired difference with its CI and test (module docstring)."""
    _check(frame)
    rows = []
    for epsilon, epochs in split_arms(frame):
        pairs = _paired_rows(frame, epsilon, epochs)
        if pairs.empty:
            continue
        for metric in COMPARED_METRICS:
            rows.append(
                {"epsilon": epsilon, "epochs": epochs, "metric": metric, **_comparison(pairs, metric)}
            )
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c != "p_holm"])
    table.insert(table.columns.get_loc("p") + 1, "p_holm", math.nan)
    for _metric, rows_of_metric in table.groupby("metric").groups.items():
        table.loc[rows_of_metric, "p_holm"] = stats.adjust_pvalues(
            table.loc[rows_of_metric, "p"].to_numpy(), "holm"
        )
    return table.reset_index(drop=True)


def per_configuration_table(
    frame: pd.DataFrame, metrics: Sequence[str] = ("polysemantic_after", "val_mse_after")
) -> pd.DataFrame:
    """The same comparison within each configuration, paired over its seeds (no averaging across
    configurations): one row per (configuration, ε, E, metric)."""
    _check(frame)
    rows = []
    for epsilon, epochs in split_arms(frame):
        pairs = _paired_rows(frame, epsilon, epochs)
        for config, config_pairs in pairs.groupby("config", sort=False):
            for metric in metrics:
                rows.append(
                    {
                        "config": config,
                        "epsilon": epsilon,
                        "epochs": epochs,
                        "metric": metric,
                        **_comparison(config_pairs, metric),
                    }
                )
    return pd.DataFrame(rows)


def _format_interval(row) -> str:
    if not math.isfinite(row.ci_low):
        return f"{row.difference:+.3g}"
    return f"{row.difference:+.3g} [{row.ci_low:+.3g}, {row.ci_high:+.3g}]"


def readings(frame: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Sentences that answer the study's question from `table` (and the records in `frame`)."""
    lines: list[str] = []
    networks = frame.drop_duplicates(list(PAIR_KEYS))
    configs, seeds = networks["config"].nunique(), networks["seed"].nunique()
    width = frame["width_before"].iloc[0] if "width_before" in frame and len(frame) else math.nan
    lines.append(
        f"{len(networks)} stored networks ({configs} configurations × {seeds} seeds): before splitting "
        f"{networks['polysemantic_before'].mean():.2f} of the {width:g} last-hidden neurons are polysemantic on "
        f"average (fraction of responsive neurons {networks['polysemantic_fraction_before'].mean():.2f}); every "
        "one of them is split."
    )
    for (epsilon, epochs), rows in table.groupby(["epsilon", "epochs"], sort=False):
        by_metric = {row.metric: row for row in rows.itertuples()}
        count, loss, resolved = (
            by_metric.get(name) for name in ("polysemantic_after", "val_mse_after", "resolved_fraction")
        )
        parts = []
        if count is not None:
            parts.append(
                f"polysemantic neurons {count.split:.2f} vs {count.baseline:.2f} without splitting "
                f"(difference {_format_interval(count)}, p_holm {count.p_holm:.2g})"
            )
        if resolved is not None:
            parts.append(
                f"resolved {resolved.split:.2f} vs {resolved.baseline:.2f} ({_format_interval(resolved)})"
            )
        if loss is not None:
            parts.append(
                f"validation MSE {loss.split:.4g} vs {loss.baseline:.4g} (difference {_format_interval(loss)}, "
                f"p_holm {loss.p_holm:.2g})"
            )
        lines.append(f"ε = {epsilon:g}, {epochs} fine-tuning epochs: " + "; ".join(parts) + ".")
    fraction = table[table["metric"] == "polysemantic_fraction_after"]
    if len(fraction):
        fewer = fraction[(fraction["ci_high"] < 0)]
        more = fraction[(fraction["ci_low"] > 0)]
        verdict = (
            "no split arm lowers the polysemantic fraction below the baseline's (every 95 % CI reaches 0 or above)"
            if fewer.empty
            else "the polysemantic fraction falls below the baseline's in "
            + ", ".join(f"ε={r.epsilon:g}/{r.epochs} ep" for r in fewer.itertuples())
        )
        if len(more):
            verdict += "; it rises above it in " + ", ".join(
                f"ε={r.epsilon:g}/{r.epochs} ep" for r in more.itertuples()
            )
        lines.append("Answer: " + verdict + ".")
    lines.append(f"Method: {METHOD}.")
    return lines


def _seed_interval(values: pd.Series) -> tuple[float, float]:
    described = stats.describe(values.to_numpy())
    return described["mean"], (described["ci_high"] - described["ci_low"]) / 2 if math.isfinite(
        described["ci_low"]
    ) else 0.0


def before_after_figure(frame: pd.DataFrame):
    """Per arm and fine-tuning length: polysemantic neurons per network, resolved fraction and validation
    MSE after fine-tuning (means over seeds of the per-seed means over configurations, 95 % t-intervals),
    with the value before splitting as a dashed line."""
    from matplotlib.figure import Figure

    arms = [
        "baseline",
        *[f"ε={e:g}" for e in sorted({float(e) for e in frame.loc[frame["arm"] == "split", "epsilon"]})],
    ]
    epochs_values = sorted({int(e) for e in frame["epochs"]})
    panels = [
        ("polysemantic_after", "polysemantic_before", "polysemantic neurons per network"),
        (
            "polysemantic_fraction_after",
            "polysemantic_fraction_before",
            "polysemantic fraction (of responsive)",
        ),
        ("resolved_fraction", None, "originally polysemantic neurons resolved"),
        ("val_mse_after", "val_mse_before", "validation MSE"),
    ]
    figure = Figure(figsize=(4.2 * len(panels), 3.8))
    axes = figure.subplots(1, len(panels), squeeze=False)
    labels = frame["arm"].where(
        frame["arm"] == "baseline", "ε=" + frame["epsilon"].astype(float).map(lambda e: f"{e:g}")
    )
    frame = frame.assign(arm_label=labels)
    offsets = np.linspace(-0.15, 0.15, len(epochs_values)) if len(epochs_values) > 1 else [0.0]
    for axis, (metric, before, title) in zip(axes[0], panels, strict=True):
        for offset, epochs in zip(offsets, epochs_values, strict=True):
            means, halves, positions = [], [], []
            for position, arm in enumerate(arms):
                rows = frame[(frame["arm_label"] == arm) & (frame["epochs"] == epochs)]
                if rows.empty:
                    continue
                if metric == "resolved_fraction":
                    grouped = rows.groupby("seed")
                    per_seed = grouped["resolved"].sum() / grouped["polysemantic_before"].sum().where(
                        lambda s: s > 0
                    )
                else:
                    per_seed = rows.groupby("seed")[metric].mean()
                mean, half = _seed_interval(per_seed.dropna())
                means.append(mean)
                halves.append(half)
                positions.append(position + offset)
            axis.errorbar(positions, means, yerr=halves, fmt="o", capsize=3, label=f"+{epochs} epochs")
        if before is not None:
            value = frame.drop_duplicates(list(PAIR_KEYS))[before].mean()
            axis.axhline(value, color="grey", linestyle="--", linewidth=1, label="before splitting")
        axis.set_xticks(range(len(arms)), arms, rotation=30)
        axis.set_title(title, fontsize=10)
        if metric == "val_mse_after":
            axis.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(
        "Splitting polysemantic last-hidden neurons, then fine-tuning (95 % t-intervals over seeds)",
        fontsize=11,
    )
    figure.tight_layout()
    return figure


def per_configuration_figure(per_configuration: pd.DataFrame):
    """Difference in polysemantic neurons (split − baseline) per configuration, at the longest fine-tuning,
    one marker per ε, with 95 % t-intervals over the configuration's seeds."""
    from matplotlib.figure import Figure

    rows = per_configuration[per_configuration["metric"] == "polysemantic_after"]
    longest = rows["epochs"].max()
    rows = rows[rows["epochs"] == longest]
    configs = list(dict.fromkeys(rows["config"]))
    epsilons = sorted(set(rows["epsilon"]))
    figure = Figure(figsize=(7, 0.45 * len(configs) + 1.6))
    axis = figure.subplots()
    offsets = np.linspace(-0.25, 0.25, len(epsilons)) if len(epsilons) > 1 else [0.0]
    for offset, epsilon in zip(offsets, epsilons, strict=True):
        selected = rows[rows["epsilon"] == epsilon].set_index("config").reindex(configs)
        low = (selected["difference"] - selected["ci_low"]).fillna(0).clip(lower=0)
        high = (selected["ci_high"] - selected["difference"]).fillna(0).clip(lower=0)
        axis.errorbar(
            selected["difference"],
            np.arange(len(configs)) + offset,
            xerr=[low, high],
            fmt="o",
            capsize=2,
            label=f"ε={epsilon:g}",
        )
    axis.axvline(0, color="grey", linewidth=1)
    axis.set_yticks(range(len(configs)), configs, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(f"polysemantic neurons, split − no split (+{longest} epochs)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def splitting_analysis(frame: pd.DataFrame):
    """(table, readings, figures) of the records in `frame` (module docstring); figures keyed by file stem."""
    table = comparison_table(frame)
    per_configuration = per_configuration_table(frame)
    figures = {"splitting_before_after": before_after_figure(frame)}
    if not per_configuration.empty:
        figures["splitting_per_configuration"] = per_configuration_figure(per_configuration)
    table.attrs["per_configuration"] = per_configuration
    return table, readings(frame, table), figures
