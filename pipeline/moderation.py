"""Do the training factors' effects persist across the levels of another setting (e.g. SAE architecture)?

Pure: a tidy per-seed DataFrame in, a DataFrame and sentences out.

The question of the SAE × training study (issue 12): the 2⁴ factorial of training factors is decomposed by
several SAE architectures (`decompose`), and for each metric and main effect we ask (a) how large the
effect is under each architecture and (b) whether it differs from its size under the reference
architecture. Both are blocked on seed, because seed s of every cell *and every architecture* shares the
data, the network initialization and noise (the architectures even share the very same trained
networks), so nothing pooled across seeds is independent:

- per seed s and level L, the main-effect contrast c_{s,L} = contrast · y_{s,L} / 2^(k−1) over the 2^k
  cells (`pipeline.stats.effect_contrasts`);
- the effect at L: one-sample t of the S values c_{s,L} (df = S − 1);
- the difference from the reference level R: one-sample t of d_s = c_{s,L} − c_{s,R} (df = S − 1), Holm
  across the (levels − 1) × main effects of a metric.

Only seeds that ran all 2^k cells at every level enter (their number is reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.stats import adjust_pvalues, effect_contrasts, effect_label, one_sample_t_across_seeds

MODERATION_COLUMNS = [
    "metric",
    "effect",
    "contrast",
    "moderator",
    "level",
    "reference",
    "seeds",
    "estimate",
    "ci_low",
    "ci_high",
    "p",
    "difference",
    "difference_ci_low",
    "difference_ci_high",
    "difference_p",
    "difference_p_holm",
]


def _cell_table(rows: pd.DataFrame, factors: dict[str, tuple[Any, Any]], metric: str) -> pd.DataFrame:
    """`[seed, cell]` values of one metric at one level, cells in standard order (first factor slowest)."""
    names = list(factors)
    weights = 2 ** np.arange(len(names) - 1, -1, -1)
    codes = np.column_stack([(rows[name] == factors[name][1]).to_numpy() for name in names]).astype(int)
    long = pd.DataFrame(
        {
            "seed": rows["seed"].to_numpy(),
            "cell": codes @ weights,
            "y": pd.to_numeric(rows[metric]).to_numpy(),
        }
    ).dropna()
    if long.duplicated(subset=["seed", "cell"]).any():
        raise ValueError(f"{metric}: more than one run for one cell and seed at one level")
    return long.pivot(index="seed", columns="cell", values="y").reindex(columns=range(2 ** len(names)))


def complete_levels(finished: pd.DataFrame, moderator: str, factors: dict[str, tuple[Any, Any]]) -> list:
    """Levels of `moderator` at which every 2^k cell of the factors has at least 2 finished seeds."""
    levels = []
    for level, rows in finished.groupby(moderator, sort=False):
        counts = rows.groupby(list(factors)).size()
        if len(counts) == 2 ** len(factors) and int(counts.min()) >= 2:
            levels.append(level)
    return levels


def factor_effects_by_level(
    finished: pd.DataFrame,
    moderator: str,
    metrics: Sequence[str],
    factors: dict[str, tuple[Any, Any]],
    reference: Any = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Every main effect of `factors` at every complete level of `moderator`, and its difference from
    the `reference` level (default: the first complete level), blocked on seed. Columns
    :data:`MODERATION_COLUMNS`; the reference level's rows have NaN differences."""
    levels = complete_levels(finished, moderator, factors)
    if len(levels) < 2:
        raise ValueError(f"{moderator}: fewer than 2 levels hold a complete factorial")
    reference = levels[0] if reference is None else reference
    if reference not in levels:
        raise ValueError(f"{moderator}: the reference level {reference!r} has no complete factorial")
    levels = [reference, *[level for level in levels if level != reference]]
    k = len(factors)
    main = effect_contrasts(k)[:k]  # [main effect, cell]: main effects come first, in factor order
    rows = []
    for metric in metrics:
        tables = {
            level: _cell_table(finished[finished[moderator] == level], factors, metric) for level in levels
        }
        complete = [set(table.dropna().index) for table in tables.values()]
        seeds = sorted(set.intersection(*complete))
        per_seed = {
            level: table.loc[seeds].to_numpy() @ main.T / 2 ** (k - 1) for level, table in tables.items()
        }  # [seed, effect]
        scale = max(float(np.nanmax(np.abs(table.to_numpy()))) for table in tables.values()) if seeds else 1.0
        metric_rows = []
        for level in levels:
            effect = one_sample_t_across_seeds(per_seed[level].T, scale, confidence)
            difference = (
                one_sample_t_across_seeds((per_seed[level] - per_seed[reference]).T, scale, confidence)
                if level != reference
                else None
            )
            for index, name in enumerate(factors):
                metric_rows.append(
                    {
                        "metric": metric,
                        "effect": name,
                        "contrast": effect_label(name, factors),
                        "moderator": moderator,
                        "level": level,
                        "reference": reference,
                        "seeds": len(seeds),
                        "estimate": float(effect["estimate"][index]) if seeds else math.nan,
                        "ci_low": float(effect["ci_low"][index]) if seeds else math.nan,
                        "ci_high": float(effect["ci_high"][index]) if seeds else math.nan,
                        "p": float(effect["p"][index]) if seeds else math.nan,
                        "difference": math.nan
                        if difference is None
                        else float(difference["estimate"][index]),
                        "difference_ci_low": math.nan
                        if difference is None
                        else float(difference["ci_low"][index]),
                        "difference_ci_high": math.nan
                        if difference is None
                        else float(difference["ci_high"][index]),
                        "difference_p": math.nan if difference is None else float(difference["p"][index]),
                    }
                )
        frame = pd.DataFrame(metric_rows)
        tested = frame["difference_p"].notna()
        frame["difference_p_holm"] = math.nan
        if tested.any():
            frame.loc[tested, "difference_p_holm"] = adjust_pvalues(frame.loc[tested, "difference_p"], "holm")
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)[MODERATION_COLUMNS]


def _clear(low: float, high: float) -> bool:
    return bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))


def moderation_readings(table: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """One sentence per metric: which effects are clear at the reference level, whether each keeps its
    sign and stays clear at every other level, and which differ clearly in size (Holm)."""
    readings = []
    for metric, rows in table.groupby("metric", sort=False):
        reference = rows["reference"].iloc[0]
        moderator = rows["moderator"].iloc[0]
        seeds = int(rows["seeds"].iloc[0])
        at_reference = rows[rows["level"] == reference]
        others = rows[rows["level"] != reference]
        parts = []
        for effect_row in at_reference.itertuples():
            same = others[others["effect"] == effect_row.effect]
            shown = f"{effect_row.contrast} {effect_row.estimate:+.3g} [{effect_row.ci_low:.3g}, {effect_row.ci_high:.3g}]"
            if not _clear(effect_row.ci_low, effect_row.ci_high):
                clear_elsewhere = [str(r.level) for r in same.itertuples() if _clear(r.ci_low, r.ci_high)]
                if clear_elsewhere:
                    parts.append(
                        f"{shown} is not clear under {reference} but is under {', '.join(clear_elsewhere)}"
                    )
                continue
            sign = np.sign(effect_row.estimate)
            kept = [
                str(r.level)
                for r in same.itertuples()
                if _clear(r.ci_low, r.ci_high) and np.sign(r.estimate) == sign
            ]
            lost = [str(r.level) for r in same.itertuples() if str(r.level) not in kept]
            differs = [
                f"{r.level} ({r.difference:+.3g} [{r.difference_ci_low:.3g}, {r.difference_ci_high:.3g}], "
                f"p_holm={r.difference_p_holm:.2g})"
                for r in same.itertuples()
                if np.isfinite(r.difference_p_holm) and r.difference_p_holm < alpha
            ]
            text = f"{shown} under {reference}"
            other = moderator.rpartition(".")[2]
            if not lost:
                text += f" persists (same sign, CI clear of 0) under every other {other}"
            elif not kept:
                text += f" persists under no other {other} ({', '.join(lost)})"
            else:
                text += f" persists under {', '.join(kept)} but not under {', '.join(lost)}"
            if differs:
                text += f"; its size differs clearly under {'; '.join(differs)}"
            parts.append(text)
        if parts:
            readings.append(f"{metric} ({seeds} seeds): " + "; ".join(parts) + ".")
        else:
            readings.append(
                f"{metric} ({seeds} seeds): no training factor has a clear effect under any level."
            )
    return readings
