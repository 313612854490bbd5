"""Does a two-level setting change the seed variance of a metric? Paired on seed (the clipping study).

Pure: a tidy per-seed DataFrame in, a DataFrame out; no tracking store, no plotting.

The question of the gradient-clipping study (issue 12): does clipping (e.g. `sae.grad_clip` 0 vs 1)
reduce the spread of a metric such as `sae_fvu` over seeds? Seed k of both levels shares the data set,
the initializations and the noise draws, so the two levels' values are *paired* on seed and, typically,
strongly correlated. Levene's test (and the F test) assume two independent samples: with positively
correlated pairs the two sample variances move together, the test's null distribution is wrong, and it
loses most of its power. The test for equal variances of paired samples is Pitman's (1939) and Morgan's
(1939): for pairs (x, y),

    cov(x + y, x − y) = var x − var y,

so var x = var y exactly when the sums and differences are uncorrelated; with r = corr(x + y, x − y)
over n pairs, t = r·√(n − 2)/√(1 − r²) has Student's t distribution with n − 2 degrees of freedom under
the null when the pairs are bivariate normal (the usual test of a correlation).

The variance ratio F = s_x²/s_y² gets the interval that inverts this test: with r_xy the correlation of
the pairs, k the two-sided t quantile on n − 2 degrees of freedom and K = 1 + 2k²(1 − r_xy²)/(n − 2),

    F·(K − √(K² − 1))  ≤  σ_x²/σ_y²  ≤  F·(K + √(K² − 1)).

(Testing σ_x²/σ_y² = φ is testing equal variances of x and √φ·y, which leaves r_xy unchanged and divides F
by φ; since r(x + y, x − y)² = (F − 1)²/((F + 1)² − 4r_xy²F), the test accepts exactly when F/φ lies between
the roots of u² − 2Ku + 1 = 0, whose product is 1.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
from numpy.typing import ArrayLike

from pipeline.stats import one_sample_t_across_seeds

PAIRED_VARIANCE_COLUMNS = [
    "setting",
    "reference_level",
    "level",
    "metric",
    "pairs",
    "reference_mean",
    "mean",
    "mean_difference",
    "mean_ci_low",
    "mean_ci_high",
    "mean_p",
    "reference_variance",
    "variance",
    "variance_ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "pair_correlation",
    "sum_difference_correlation",
    "t",
    "df",
    "p",
]
"""Columns of `paired_variance_comparison` after the group columns: one row per group. ``variance_ratio``
= variance / reference_variance (at ``level`` over at ``reference_level``, seed variances with ddof 1),
below 1 when ``level`` narrows the spread; ``mean_difference`` = mean(level − reference) over the pairs with
its paired t-interval and p (`pipeline.stats.one_sample_t_across_seeds`); ``ratio_ci_low/high`` its interval; ``pair_correlation`` the
correlation of the paired values; ``sum_difference_correlation``, ``t``, ``df``, ``p`` the Pitman–Morgan
test (two-sided) of equal variances."""


def pitman_morgan(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> dict[str, float]:
    """The Pitman–Morgan test of var x = var y for paired samples, and the ratio var x / var y with its
    interval (see the module docstring). x, y: `[pair]`, finite, at least 3 pairs.

    Returns pairs, variance_x, variance_y, variance_ratio, ratio_ci_low, ratio_ci_high,
    pair_correlation (r_xy), sum_difference_correlation (r), t, df and the two-sided p. Quantities that
    a degenerate sample leaves undefined (a constant x and y: no variance to compare) are NaN; one
    constant sample against a varying one gives |r| = 1, t = ±inf and p = 0.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pitman_morgan needs two paired 1-d samples; got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("pitman_morgan needs finite values; drop incomplete pairs first")
    pairs = x.size
    if pairs < 3:
        raise ValueError(f"pitman_morgan needs at least 3 pairs (n − 2 degrees of freedom); got {pairs}")
    df = pairs - 2
    variance_x, variance_y = float(np.var(x, ddof=1)), float(np.var(y, ddof=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.divide(variance_x, variance_y))
        sums, differences = x + y, x - y
        r = _correlation(sums, differences)
        r_xy = _correlation(x, y)
        if math.isnan(r):
            t = p = math.nan
        else:
            t = r * math.sqrt(df) / math.sqrt(1 - r * r) if abs(r) < 1 else math.copysign(math.inf, r)
            p = float(2 * scipy.stats.t.sf(abs(t), df))
        quantile = float(scipy.stats.t.ppf(0.5 + confidence / 2, df))
        bound = 1 + 2 * quantile**2 * (1 - r_xy**2) / df  # K of the module docstring
        spread = math.sqrt(bound * bound - 1) if bound >= 1 else math.nan
        low, high = ratio * (bound - spread), ratio * (bound + spread)
    return {
        "pairs": pairs,
        "variance_x": variance_x,
        "variance_y": variance_y,
        "variance_ratio": ratio,
        "ratio_ci_low": low,
        "ratio_ci_high": high,
        "pair_correlation": r_xy,
        "sum_difference_correlation": r,
        "t": t,
        "df": df,
        "p": p,
    }


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; NaN when either sample is constant (a rounding-level spread counts as constant)."""
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float(a @ a) * float(b @ b))
    if scale == 0 or not math.isfinite(scale):
        return math.nan
    return float(np.clip((a @ b) / scale, -1.0, 1.0))


def paired_variance_comparison(
    frame: pd.DataFrame,
    setting: str,
    metric: str,
    *,
    group_columns: Sequence[str] = (),
    levels: tuple | None = None,
    seed_column: str = "seed",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per group (configuration), the seed variance of ``metric`` at two levels of ``setting``, compared
    paired on seed by the Pitman–Morgan test, with the variance ratio and its interval.

    ``frame``: one row per (configuration, seed), with ``seed_column``, ``setting`` (two levels, e.g.
    ``sae.grad_clip`` 0 and 1), ``metric`` and the ``group_columns`` that identify a configuration apart
    from ``setting`` (e.g. the four factors, or ``config``). ``levels``: (reference, level), the ratio
    being level over reference; default the two values of ``setting`` in sorted order (0 then 1: clipped
    over unclipped). Only seeds with a finite metric at both levels enter a group's comparison (its
    ``pairs``); a group with fewer than 3 gets NaN. A seed appearing twice at one level of a group, or a
    setting with other than two levels, raises ValueError.

    Returns one row per group: the group columns, then `PAIRED_VARIANCE_COLUMNS`.
    """
    group_columns = tuple(group_columns)
    if setting in group_columns or seed_column in group_columns:
        raise ValueError(
            "paired_variance_comparison: the setting and the seed column cannot be group columns"
        )
    missing = [c for c in (seed_column, setting, metric, *group_columns) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"paired_variance_comparison: missing column(s) {missing}; available: {list(frame.columns)}"
        )
    if levels is None:
        found = sorted(frame[setting].dropna().unique())
        if len(found) != 2:
            raise ValueError(
                f"paired_variance_comparison: {setting} must take exactly two levels; got {found}"
            )
        levels = (found[0], found[1])
    reference, level = levels
    values = pd.to_numeric(frame[metric], errors="raise").astype(float)
    data = frame[[seed_column, setting, *group_columns]].assign(_value=values)
    data = data[data[setting].isin([reference, level])]
    rows = []
    grouped = data.groupby(list(group_columns), sort=True, dropna=False) if group_columns else [((), data)]
    for key, group in grouped:
        group_values = key if isinstance(key, tuple) else (key,)
        duplicated = group.duplicated([seed_column, setting])
        if duplicated.any():
            seed = group.loc[duplicated, seed_column].iloc[0]
            raise ValueError(
                f"paired_variance_comparison: seed {seed!r} appears twice at one level of {setting} in group "
                f"{dict(zip(group_columns, group_values, strict=True))}"
            )
        table = group.pivot(index=seed_column, columns=setting, values="_value")
        table = table.reindex(columns=[reference, level])
        complete = table[np.isfinite(table).all(axis=1)]
        row = {
            **dict(zip(group_columns, group_values, strict=True)),
            "setting": setting,
            "reference_level": reference,
            "level": level,
            "metric": metric,
            "pairs": len(complete),
            "reference_mean": float(complete[reference].mean()) if len(complete) else math.nan,
            "mean": float(complete[level].mean()) if len(complete) else math.nan,
        }
        if len(complete):
            paired = complete.to_numpy(dtype=float)
            mean_test = one_sample_t_across_seeds(
                paired[:, 1] - paired[:, 0], np.asarray(2 * np.abs(paired).max()), confidence
            )
            row.update(
                mean_difference=float(mean_test["estimate"]),
                mean_ci_low=float(mean_test["ci_low"]),
                mean_ci_high=float(mean_test["ci_high"]),
                mean_p=float(mean_test["p"]),
            )
        if len(complete) >= 3:
            test = pitman_morgan(complete[level].to_numpy(), complete[reference].to_numpy(), confidence)
            row.update(
                {
                    "reference_variance": test["variance_y"],
                    "variance": test["variance_x"],
                    **{name: test[name] for name in PAIRED_VARIANCE_COLUMNS if name in test},
                }
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=[*group_columns, *PAIRED_VARIANCE_COLUMNS])
