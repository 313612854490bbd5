"""Statistics for comparing configurations across seeds.

Pure functions: arrays or tidy DataFrames in, dicts or DataFrames out. Nothing here prints, plots or talks
to a tracking store, so the analysis of a study can be re-run from its stored per-seed values alone.

Conventions shared by every function:

- A *sample* is the per-seed values of one metric for one configuration: ``values: [seed]``.
- NaN marks a failed metric and is dropped before anything is computed (per sample, or per pair when
  paired). Counts ``n`` are always counts of the values actually used.
- Thin data never raises: where a statistic is undefined (too few values, zero variance) it is NaN.
- Two-sided tests throughout.

Methods (docs/science.md §4). The design shares random numbers: seed k of every configuration sees the same
data, SAE initialization, network initialization (per init level) and noise draws (per noise kind), so
every inference here treats the seed as the unit of replication:

- Comparisons of two configurations are paired on seed whenever they share seeds (``scipy.stats.ttest_rel``,
  d_z and its Hedges correction, bootstrap of the per-seed differences, i.e. whole seeds resampled);
  Welch's t-test (Cohen's d with pooled SD, Hedges' g) only when they share none, or on request.
- 2^k factorial effects: per-seed contrasts tested across seeds (df = seeds − 1), Holm across the
  2^k − 1 effects; the pooled ±1-coded OLS/ANOVA stays only as a labelled secondary column.
- Holm (family-wise error) and Benjamini–Hochberg (false discovery rate) adjusted p-values.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

# scipy.stats and statsmodels are imported by the functions that use them: a sweep records its summaries
# through `describe` alone, and importing both cost its process 0.6 s of a core it shares with training.

COMPARISON_COLUMNS = [
    "metric",
    "config_a",
    "config_b",
    "test",
    "n_a",
    "n_b",
    "mean_a",
    "mean_b",
    "diff",
    "ci_low",
    "ci_high",
    "t",
    "df",
    "p",
    "p_holm",
    "p_bh",
    "effect_size",
    "d",
    "g",
]
"""Columns of :func:`compare_to_baseline`, in order. ``test`` is "paired t" or "Welch t"; ``effect_size``
names what ``d`` and ``g`` hold: "d_z" (mean difference over the SD of the per-seed differences) and its
Hedges correction when paired, "Cohen's d" (pooled SD) and Hedges' g when not."""

PAIRED_TEST, WELCH_TEST = "paired t", "Welch t"
EFFECT_SIZE_NAMES = {PAIRED_TEST: "d_z", WELCH_TEST: "Cohen's d"}

FACTORIAL_COLUMNS = [
    "metric",
    "effect",
    "contrast",
    "estimate",
    "ci_low",
    "ci_high",
    "se",
    "t",
    "df",
    "p",
    "p_holm",
    "seeds",
    "p_pooled_ols",
    "p_pooled_ols_holm",
]
"""Columns of :func:`factorial_effects`, in order."""

ADJUST_METHODS = ("holm", "fdr_bh")

# Residual sum of squares at or below this fraction of the total sum of squares is floating-point
# round-off of an exact fit, not an error estimate: F and p are then reported as NaN rather than as the
# ratio of two rounding errors. Noise with a relative SD above ~1e-10 is comfortably above it.
_EXACT_FIT_RELATIVE_SSR = 1e-20
# The same guard for the seed-blocked test: a standard error below this fraction of the data's magnitude
# is the rounding of identical per-seed contrasts (noise-free data), not seed-to-seed variation.
_EXACT_FIT_RELATIVE_SE = 1e-10


# --------------------------------------------------------------------------------------------------
# Single samples
# --------------------------------------------------------------------------------------------------


def _finite_sample(values: ArrayLike, name: str = "values") -> np.ndarray:
    """1-D float array with NaNs (failed metrics) removed; infinities are rejected, not dropped."""
    array = np.asarray(values, dtype=float).ravel()
    if np.isinf(array).any():
        raise ValueError(f"{name} contains infinite values; a metric should be finite or NaN (failed)")
    return array[~np.isnan(array)]


def describe(
    values: ArrayLike, confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> dict[str, float]:
    """Summary of one configuration's per-seed values.

    ``values: [seed]``; NaNs are dropped first. Returns ``n, mean, std, sem, ci_low, ci_high`` with

        std  = sqrt( Σ (x_i − x̄)² / (n − 1) )                  (sample SD, ddof = 1)
        sem  = std / sqrt(n)
        CI   = x̄ ± t_{(1+confidence)/2, n−1} · sem              (Student t-interval of the mean)

    The t-interval assumes the seed values are i.i.d. and roughly normal; with few seeds it is the
    standard choice (e.g. Wasserman, *All of Statistics*, §10.4). ``std``, ``sem`` and the CI are NaN for
    n < 2; ``mean`` is NaN for n = 0.

    ``bounds = (low, high)``, the values the metric can take (``pipeline.metrics.metric_bounds``; ±inf for an
    open side), clips the interval to that range. The symmetric t-interval of a metric near its bound
    otherwise reaches impossible values (a fraction below 0); since the true mean lies in the range,
    clipping removes only impossible values and the interval's coverage is unchanged. The mean, SD and SEM
    are not touched.
    """
    # scipy.stats.t.ppf(q, df) is this function of scipy.special (the same value), without scipy.stats.
    from scipy.special import stdtrit

    _check_confidence(confidence)
    low, high = _check_bounds(bounds)
    sample = _finite_sample(values)
    n = sample.size
    mean = float(sample.mean()) if n > 0 else math.nan
    if n < 2:
        return {
            "n": n,
            "mean": mean,
            "std": math.nan,
            "sem": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
        }
    std = float(sample.std(ddof=1))
    sem = std / math.sqrt(n)
    half_width = float(stdtrit(n - 1, (1 + confidence) / 2)) * sem
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "sem": sem,
        "ci_low": min(max(mean - half_width, low), high),
        "ci_high": max(min(mean + half_width, high), low),
    }


def _check_bounds(bounds: tuple[float, float] | None) -> tuple[float, float]:
    """(low, high) of a metric's range; (−inf, inf) when none is given."""
    if bounds is None:
        return -math.inf, math.inf
    low, high = (float(bound) for bound in bounds)
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ValueError(f"bounds must be (low, high) with low <= high; got {bounds!r}")
    return low, high


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


# --------------------------------------------------------------------------------------------------
# Effect sizes
# --------------------------------------------------------------------------------------------------


def _complete_pairs(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Aligned arrays with every pair that has a NaN on either side removed."""
    a_array = np.asarray(a, dtype=float).ravel()
    b_array = np.asarray(b, dtype=float).ravel()
    if a_array.shape != b_array.shape:
        raise ValueError(
            f"paired comparison needs equal-length samples aligned by seed, got {a_array.size} and {b_array.size}"
        )
    if np.isinf(a_array).any() or np.isinf(b_array).any():
        raise ValueError("paired samples contain infinite values; a metric should be finite or NaN (failed)")
    keep = ~(np.isnan(a_array) | np.isnan(b_array))
    return a_array[keep], b_array[keep]


def _standardised(difference: float, sd: float) -> float:
    """difference / sd, NaN when sd = 0.

    Zero spread (every seed gave the same value, typical of a metric pinned at a bound) leaves nothing
    to standardise by; ±inf would be the limit, but it would swamp any average or plot of effect sizes,
    and the raw difference and its CI still say what happened.
    """
    return difference / sd if sd > 0 else math.nan


def hedges_correction(df: float) -> float:
    """Hedges' small-sample bias correction J = 1 − 3 / (4·df − 1).

    df is the degrees of freedom of the SD that standardises d: n₁ + n₂ − 2 for the pooled SD, which gives
    the familiar J = 1 − 3/(4(n₁+n₂) − 9); n − 1 for the SD of n paired differences. The approximation to
    the exact Γ-function form is from Hedges (1981), *J. Educ. Stat.* 6(2), eq. 6e; Hedges & Olkin (1985),
    *Statistical Methods for Meta-Analysis*, ch. 5. NaN for df < 1.
    """
    if df < 1:
        return math.nan
    return 1.0 - 3.0 / (4.0 * df - 1.0)


def cohen_d(a: ArrayLike, b: ArrayLike, *, paired: bool = False) -> float:
    """Standardised mean difference of ``a`` minus ``b``.

    Unpaired (Cohen 1988, *Statistical Power Analysis*, §2.2; pooled SD as in docs/science.md §4):

        d = (x̄_a − x̄_b) / s_p,   s_p² = ((n_a − 1)s_a² + (n_b − 1)s_b²) / (n_a + n_b − 2)

    Paired (``a`` and ``b`` aligned by seed): d_z = mean(a − b) / sd(a − b) (Cohen 1988, §2.3.5). d_z is
    the effect size the paired t-test tests (t = d_z·√n), so it is the one reported beside that test; note
    it is not on the same scale as the unpaired d (it grows with the correlation between the pairs).

    NaNs are dropped (pairs with a NaN on either side when paired). NaN where the SD has no degrees of
    freedom (fewer than 2 values in all, or fewer than 2 pairs) or is zero.
    """
    if paired:
        a_pairs, b_pairs = _complete_pairs(a, b)
        differences = a_pairs - b_pairs
        if differences.size < 2:
            return math.nan
        return _standardised(float(differences.mean()), float(differences.std(ddof=1)))
    a_sample = _finite_sample(a, "a")
    b_sample = _finite_sample(b, "b")
    n_a, n_b = a_sample.size, b_sample.size
    pooled_df = n_a + n_b - 2
    if n_a == 0 or n_b == 0 or pooled_df < 1:
        return math.nan
    # Sums of squared deviations rather than (n − 1)·s², so a group of one contributes 0, not NaN.
    sum_squares = ((a_sample - a_sample.mean()) ** 2).sum() + ((b_sample - b_sample.mean()) ** 2).sum()
    pooled_sd = math.sqrt(sum_squares / pooled_df)
    return _standardised(float(a_sample.mean() - b_sample.mean()), pooled_sd)


def hedges_g(a: ArrayLike, b: ArrayLike, *, paired: bool = False) -> float:
    """Hedges' g = J·d, the small-sample bias-corrected :func:`cohen_d`.

    Unpaired: J = 1 − 3/(4(n_a + n_b) − 9), i.e. :func:`hedges_correction` with df = n_a + n_b − 2.
    Paired: g = J·d_z with J = 1 − 3/(4(n − 1) − 1) for n pairs — the same correction applied to the
    df of the SD of the differences (one common choice; Lakens 2013, *Front. Psychol.* 4:863, eq. 4
    and its discussion of d_z).
    """
    if paired:
        a_pairs, _ = _complete_pairs(a, b)
        df = a_pairs.size - 1
    else:
        df = _finite_sample(a, "a").size + _finite_sample(b, "b").size - 2
    d = cohen_d(a, b, paired=paired)
    return hedges_correction(df) * d if not math.isnan(d) else math.nan


# --------------------------------------------------------------------------------------------------
# Two-sample comparison
# --------------------------------------------------------------------------------------------------


def _difference_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _bootstrap_interval(
    data: tuple[np.ndarray, ...],
    statistic: Any,
    *,
    n_resamples: int,
    confidence: float,
    random_state: int | None,
) -> tuple[float, float]:
    """BCa interval, or the percentile interval when BCa is undefined.

    BCa (Efron 1987, *JASA* 82:171) corrects the percentile interval for bias and skew and is scipy's
    default. Its acceleration is a ratio of jackknife moments that is 0/0 for degenerate data (e.g.
    all values equal), where scipy returns NaN with a DegenerateDataWarning; the percentile interval is
    still defined there, so we fall back to it. A fresh generator from the same seed makes the fallback
    resample exactly as the BCa attempt did.
    """
    import scipy.stats

    intervals: dict[str, tuple[float, float]] = {}
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
            # The BCa acceleration of degenerate data divides 0 by 0 before scipy flags it.
            with np.errstate(invalid="ignore", divide="ignore"):
                result = scipy.stats.bootstrap(
                    data,
                    statistic,
                    n_resamples=n_resamples,
                    confidence_level=confidence,
                    method=method,
                    vectorized=True,
                    rng=np.random.default_rng(random_state),
                )
        interval = (float(result.confidence_interval.low), float(result.confidence_interval.high))
        intervals[method] = interval
        if not (math.isnan(interval[0]) or math.isnan(interval[1])):
            return interval
    return intervals["percentile"]


def compare(
    a: ArrayLike,
    b: ArrayLike,
    *,
    paired: bool = False,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    random_state: int | None = 0,
) -> dict[str, float]:
    """Compare the per-seed values of configuration ``a`` with those of ``b`` (``a`` minus ``b``).

    ``a: [seed]``, ``b: [seed]``. Returns ``n_a, n_b, mean_a, mean_b, diff, ci_low, ci_high, t, df, p,
    cohen_d, hedges_g`` where

    - ``diff = mean_a − mean_b``;
    - ``ci_low, ci_high``: bootstrap ``confidence`` interval of ``diff`` (``scipy.stats.bootstrap``, BCa,
      percentile if BCa is undefined). Unpaired: the two samples are resampled independently and the
      statistic is mean(a*) − mean(b*). Paired: the n differences a_i − b_i are resampled as one sample
      and the statistic is their mean. ``random_state`` seeds ``np.random.default_rng``;
    - ``t, df, p``: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``), t = diff / √(s_a²/n_a +
      s_b²/n_b) with the Welch–Satterthwaite df = (v_a + v_b)² / (v_a²/(n_a−1) + v_b²/(n_b−1)),
      v = s²/n (Welch 1947, *Biometrika* 34:28). Paired: ``scipy.stats.ttest_rel``, df = n − 1;
    - ``test``: "paired t" or "Welch t"; ``effect_size``: "d_z" or "Cohen's d", the name of ``d``;
    - ``d, g``: :func:`cohen_d` and :func:`hedges_g` (d_z and its correction when paired).

    NaNs are dropped (whole pairs when paired; then ``n_a = n_b`` = the number of complete pairs). With
    fewer than 2 values on either side (or fewer than 2 pairs) nothing but the counts, means and ``diff``
    can be computed: every other entry is NaN and no exception is raised. When the standard error is zero
    (both samples constant; constant differences when paired) the CI is the degenerate [diff, diff] and
    ``t, df, p, d, g`` are NaN.

    Raises ValueError when ``paired`` and the samples differ in length (they must be aligned by seed).
    """
    import scipy.stats

    _check_confidence(confidence)
    if paired:
        a_sample, b_sample = _complete_pairs(a, b)
    else:
        a_sample, b_sample = _finite_sample(a, "a"), _finite_sample(b, "b")
    n_a, n_b = a_sample.size, b_sample.size
    mean_a = float(a_sample.mean()) if n_a else math.nan
    mean_b = float(b_sample.mean()) if n_b else math.nan
    test_name = PAIRED_TEST if paired else WELCH_TEST
    result: dict[str, float | str] = {
        "test": test_name,
        "n_a": n_a,
        "n_b": n_b,
        "mean_a": mean_a,
        "mean_b": mean_b,
        "diff": mean_a - mean_b,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "t": math.nan,
        "df": math.nan,
        "p": math.nan,
        "effect_size": EFFECT_SIZE_NAMES[test_name],
        "d": math.nan,
        "g": math.nan,
    }
    if n_a < 2 or n_b < 2:
        return result

    if paired:
        bootstrap_data: tuple[np.ndarray, ...] = (a_sample - b_sample,)
        statistic: Any = np.mean
        constant = [_is_constant(a_sample - b_sample)]
    else:
        bootstrap_data, statistic = (a_sample, b_sample), _difference_of_means
        constant = [_is_constant(a_sample), _is_constant(b_sample)]
    ci_low, ci_high = _bootstrap_interval(
        bootstrap_data, statistic, n_resamples=n_resamples, confidence=confidence, random_state=random_state
    )
    result.update(ci_low=ci_low, ci_high=ci_high)
    if all(constant):
        # Zero standard error: the t statistic is diff/0 and the Welch df 0/0. There is no variance
        # to test against, so t, df, p and the effect sizes stay NaN; diff and its (degenerate) CI stand.
        return result

    with warnings.catch_warnings():
        if any(constant):
            # scipy warns of "precision loss" whenever a sample is exactly constant (its variance is
            # computed as a tiny non-zero number). The Welch result is still right, so the warning is
            # noise for metrics pinned at a bound (e.g. no dead latents in any seed).
            warnings.filterwarnings("ignore", message="Precision loss", category=RuntimeWarning)
        if paired:
            test = scipy.stats.ttest_rel(a_sample, b_sample)
            df = float(n_a - 1)
        else:
            test = scipy.stats.ttest_ind(a_sample, b_sample, equal_var=False)
            df = float(test.df)
    result.update(
        t=float(test.statistic),
        df=df,
        p=float(test.pvalue),
        d=cohen_d(a_sample, b_sample, paired=paired),
        g=hedges_g(a_sample, b_sample, paired=paired),
    )
    return result


def _is_constant(sample: np.ndarray) -> bool:
    return bool(sample.size > 0 and np.ptp(sample) == 0)


# --------------------------------------------------------------------------------------------------
# Multiple testing
# --------------------------------------------------------------------------------------------------


def adjust_pvalues(p: ArrayLike, method: str) -> np.ndarray:
    """Multiple-testing adjusted p-values, NaN-aware.

    ``method``:

    - ``"holm"``: Holm (1979), *Scand. J. Stat.* 6:65. Controls the family-wise error rate. With the
      m p-values sorted ascending, p̃_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)).
    - ``"fdr_bh"``: Benjamini & Hochberg (1995), *JRSS B* 57:289. Controls the false discovery rate.
      p̃_(i) = min_{j ≥ i} min(1, m·p_(j) / j).

    Computed with ``statsmodels.stats.multitest.multipletests``. NaN entries (tests that could not be
    run) stay NaN and are not members of the family: m counts the finite p-values only. The output has
    the shape of the input.
    """
    from statsmodels.stats.multitest import multipletests

    if method not in ADJUST_METHODS:
        raise ValueError(f"method must be one of {ADJUST_METHODS}, got {method!r}")
    p_array = np.asarray(p, dtype=float)
    adjusted = np.full(p_array.shape, np.nan)
    present = ~np.isnan(p_array)
    if present.any():
        finite = p_array[present]
        if (finite < 0).any() or (finite > 1).any():
            raise ValueError("p-values must lie in [0, 1] (or be NaN)")
        with _without_forced_collection():
            adjusted[present] = multipletests(finite, method=method)[1]
    return adjusted


@contextlib.contextmanager
def _without_forced_collection():
    """statsmodels' Holm branch ends with an explicit gc.collect() on every call (it imports gc inside
    multipletests): 60 ms in a report's process, 0.3 s late in the test suite, and a report adjusts dozens
    of families. The p-values do not depend on it, so gc.collect is a no-op while multipletests runs;
    automatic collection is untouched."""
    import gc

    original = gc.collect
    gc.collect = lambda *_arguments: 0
    try:
        yield
    finally:
        gc.collect = original


# --------------------------------------------------------------------------------------------------
# Many configurations against one baseline
# --------------------------------------------------------------------------------------------------


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; available: {list(frame.columns)}")


def _paired_by_seed(
    config_rows: pd.DataFrame, baseline_rows: pd.DataFrame, metric: str, seed_column: str
) -> tuple[np.ndarray, np.ndarray]:
    """Metric values of the seeds both configurations ran (inner join), in seed order."""
    sides = []
    for rows in (config_rows, baseline_rows):
        values = rows[[seed_column, metric]].dropna(subset=[metric])
        duplicated = values[seed_column][values[seed_column].duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"paired comparison of {metric!r}: seed(s) {duplicated} appear more than once")
        sides.append(values.set_index(seed_column)[metric])
    joined = pd.concat(sides, axis=1, join="inner", keys=["a", "b"]).sort_index()
    return joined["a"].to_numpy(dtype=float), joined["b"].to_numpy(dtype=float)


def compare_to_baseline(
    per_seed: pd.DataFrame,
    *,
    config_column: str,
    metrics: list[str],
    baseline: str,
    paired: bool | None = None,
    seed_column: str = "seed",
    n_resamples: int = 9999,
    random_state: int | None = 0,
) -> pd.DataFrame:
    """Compare every configuration with ``baseline``, on every metric, with adjusted p-values.

    ``per_seed`` is tidy: one row per (configuration, seed) run, a ``config_column`` label, a
    ``seed_column`` and one column per metric. For each metric (in the given order) and each
    configuration other than the baseline (in order of first appearance), :func:`compare` (config minus
    baseline) gives one row with the columns :data:`COMPARISON_COLUMNS`:
    ``metric, config_a, config_b, n_a, n_b, mean_a, mean_b, diff, ci_low, ci_high, t, df, p, p_holm,
    p_bh, cohen_d, hedges_g`` with ``config_a`` the compared configuration and ``config_b`` the baseline.

    Pairing (``paired``): ``None`` (the default) pairs a configuration with the baseline whenever they share
    at least two seeds, because seed k of every configuration shares its data and initializations, so the
    per-seed values are correlated and an unpaired test misstates the error (either way); configurations
    with fewer shared seeds get Welch's test. ``True`` insists on pairing, ``False`` asks for Welch
    throughout. Paired samples are aligned on ``seed_column`` (inner join: only seeds both ran; each seed
    at most once per configuration) and n is the number of pairs; the ``test`` column says which test
    each row used. NaN metric values (failed metrics) are dropped per metric.

    The multiple-testing family is every row of the returned table (all metrics × configurations):
    ``p_holm`` (family-wise error) and ``p_bh`` (false discovery rate) are :func:`adjust_pvalues` over
    the whole ``p`` column, rows with NaN ``p`` excluded. Filter the input, not the output, if a smaller
    family is wanted.

    Raises ValueError if a column is missing or ``baseline`` is not among the configurations.
    """
    required = [config_column, *metrics] + ([seed_column] if paired is not False else [])
    _require_columns(per_seed, required, "compare_to_baseline")
    configs = list(pd.unique(per_seed[config_column].dropna()))
    if baseline not in configs:
        raise ValueError(
            f"baseline {baseline!r} not found in column {config_column!r}; available configs: {configs}"
        )
    baseline_rows = per_seed[per_seed[config_column] == baseline]
    rows = []
    for metric in metrics:
        for config in configs:
            if config == baseline:
                continue
            config_rows = per_seed[per_seed[config_column] == config]
            pair = paired
            if paired is not False:
                a, b = _paired_by_seed(config_rows, baseline_rows, metric, seed_column)
                pair = paired or len(a) >= 2
            if not pair:
                a = config_rows[metric].to_numpy(dtype=float)
                b = baseline_rows[metric].to_numpy(dtype=float)
            comparison = compare(a, b, paired=pair, n_resamples=n_resamples, random_state=random_state)
            rows.append({"metric": metric, "config_a": config, "config_b": baseline, **comparison})
    table = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c not in ("p_holm", "p_bh")])
    table["p_holm"] = adjust_pvalues(table["p"].to_numpy(dtype=float), "holm")
    table["p_bh"] = adjust_pvalues(table["p"].to_numpy(dtype=float), "fdr_bh")
    table = table[COMPARISON_COLUMNS]
    return table.astype({"n_a": int, "n_b": int}) if len(table) else table


# --------------------------------------------------------------------------------------------------
# 2^k factorial designs
# --------------------------------------------------------------------------------------------------


def factorial_effect_names(factor_names: Sequence[str]) -> list[str]:
    """All 2^k − 1 effects: main effects, then two-way, three-way, ... interactions, each in factor order.

    ``["init", "noise", "reg"]`` → ``init, noise, reg, init:noise, init:reg, noise:reg, init:noise:reg``.
    """
    return [":".join(combo) for combo in _effect_combinations(len(factor_names), factor_names)]


def _effect_combinations(k: int, names: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [combo for order in range(1, k + 1) for combo in itertools.combinations(names, order)]


def _check_factors(per_seed: pd.DataFrame, factors: dict[str, tuple[Any, Any]]) -> None:
    if not factors:
        raise ValueError("factors must name at least one factor column")
    _require_columns(per_seed, list(factors), "factorial design")
    for column, levels in factors.items():
        if len(levels) != 2 or levels[0] == levels[1]:
            raise ValueError(f"factor {column!r} needs two distinct (low, high) levels, got {levels!r}")
        unexpected = sorted({str(v) for v in per_seed[column] if v not in levels})
        if unexpected:
            raise ValueError(
                f"factor {column!r} has value(s) {unexpected} outside its levels {tuple(levels)}; "
                "filter the runs to the factorial before analysing it"
            )


def _codes(per_seed: pd.DataFrame, factors: dict[str, tuple[Any, Any]]) -> pd.DataFrame:
    """±1 codes (low = −1, high = +1), one column per factor, same index as ``per_seed``."""
    return pd.DataFrame(
        {column: np.where(per_seed[column] == high, 1.0, -1.0) for column, (_, high) in factors.items()},
        index=per_seed.index,
    )


def _missing_cells(codes: pd.DataFrame, factors: dict[str, tuple[Any, Any]]) -> list[str]:
    present = set(map(tuple, codes.to_numpy()))
    missing = []
    for cell in itertools.product((-1.0, 1.0), repeat=len(factors)):
        if cell not in present:
            labels = [
                f"{column}={levels[0] if code < 0 else levels[1]}"
                for (column, levels), code in zip(factors.items(), cell, strict=True)
            ]
            missing.append(", ".join(labels))
    return missing


def effect_contrasts(k: int) -> np.ndarray:
    """The ±1 contrast of every effect of a 2^k design over its cells: ``[effect, cell]``.

    Cells are in standard order (first factor varying slowest, low = −1 before high = +1, as
    ``itertools.product((-1, 1), repeat=k)``); effects in the order of :func:`factorial_effect_names`.
    The contrast of an effect is the product of the codes of the factors it involves (Montgomery,
    *Design and Analysis of Experiments*, §6.2), so the estimate of that effect from cell values ``y`` is
    ``contrast · y / 2^(k−1)``: the mean over the cells where the contrast is +1 minus the mean where it is −1.
    """
    cells = np.array(list(itertools.product((-1.0, 1.0), repeat=k)))
    return np.stack([np.prod(cells[:, list(combo)], axis=1) for combo in _effect_combinations(k, range(k))])


def seed_blocked_effects(values: ArrayLike, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Every factorial effect tested against its own seed-to-seed variation.

    ``values: [..., seed, cell]`` holds one complete replicate of the 2^k cells per seed (cells in the
    order of :func:`effect_contrasts`); leading dimensions are independent problems (e.g. simulations).
    For seed s the effect's contrast is c_s = contrast · y_s / 2^(k−1); then, over the S seeds,

        estimate = mean_s c_s,   se = sd_s(c_s) / √S,   t = estimate / se,   df = S − 1,

    a two-sided one-sample t-test of mean contrast 0, and the t-interval estimate ± t_{df}·se.

    Why this test: by design seed s of every cell shares the data set, the SAE initialization, the network
    initialization (per init level) and the noise draws (per noise kind), so the cells of one seed are
    correlated in ways no pooled residual describes. Whatever that within-seed structure is, the S per-seed
    contrasts are independent and identically distributed, because different seeds share nothing; this is
    the randomized complete block analysis with seed as the block and the effect × seed interaction as
    error (Montgomery §4.2; the "paired" logic of Student's t, one contrast at a time). A pooled OLS
    instead treats the 2^k·S runs as independent and is wrong in both directions (see
    ``bench/factorial_inference.py`` for the simulated false-positive rates).

    Returns arrays ``estimate, se, t, p, ci_low, ci_high`` of shape ``[..., effect]`` and ``df`` (scalar
    S − 1). Where there is no seed-to-seed variation (S < 2, or contrasts equal to rounding), t, p and
    the interval are NaN; the estimate stands.
    """
    _check_confidence(confidence)
    array = np.asarray(values, dtype=float)
    if array.ndim < 2:
        raise ValueError(f"values must be [..., seed, cell]; got shape {array.shape}")
    cells = array.shape[-1]
    k = int(round(math.log2(cells))) if cells > 0 else 0
    if cells < 2 or 2**k != cells:
        raise ValueError(f"the last dimension must hold 2^k cells; got {cells}")
    contrasts = effect_contrasts(k)  # [effect, cell]
    per_seed = array @ contrasts.T / 2 ** (k - 1)  # [..., seed, effect]
    # Contrasts that agree to rounding (noise-free data) leave no error to test against.
    scale = np.abs(array).max(axis=(-2, -1))[..., None]
    return one_sample_t_across_seeds(np.moveaxis(per_seed, -2, -1), scale, confidence)


def one_sample_t_across_seeds(
    per_seed: np.ndarray, rounding: ArrayLike, confidence: float = 0.95
) -> dict[str, np.ndarray]:
    """Two-sided one-sample t-test of mean 0 over the last axis of ``per_seed: [..., seed]``, with the
    t-interval: the seed-blocked test every per-seed quantity goes through (factorial contrasts here,
    dose-response slopes and curvatures in pipeline.dose_response).

    ``rounding: [...]`` is the size of the floating-point error a per-seed value can carry; where the
    standard error is not above it the values agree to rounding, and t, p and the interval are NaN (the
    estimate stands). Returns ``estimate, se, t, p, ci_low, ci_high`` of shape ``[...]`` and ``df``.
    """
    import scipy.stats

    seeds = per_seed.shape[-1]
    estimate = per_seed.mean(axis=-1)
    nan = np.full(estimate.shape, np.nan)
    if seeds < 2:
        return {"estimate": estimate, "se": nan, "t": nan, "p": nan, "ci_low": nan, "ci_high": nan, "df": 0}
    se = per_seed.std(axis=-1, ddof=1) / math.sqrt(seeds)
    informative = se > _EXACT_FIT_RELATIVE_SE * np.maximum(rounding, np.finfo(float).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(informative, estimate / se, np.nan)
    df = seeds - 1
    p = np.where(informative, 2 * scipy.stats.t.sf(np.abs(t), df), np.nan)
    half_width = np.where(informative, scipy.stats.t.ppf((1 + confidence) / 2, df) * se, np.nan)
    return {
        "estimate": estimate,
        "se": np.where(informative, se, np.nan),
        "t": t,
        "p": p,
        "ci_low": estimate - half_width,
        "ci_high": estimate + half_width,
        "df": df,
    }


def effect_label(effect: str, factors: dict[str, tuple[Any, Any]]) -> str:
    """What a positive estimate means, in words: 'orthogonal vs random', or 'init × noise interaction'."""
    names = effect.split(":")
    if len(names) == 1:
        low, high = factors[names[0]]
        return f"{high} vs {low}"
    return " × ".join(names) + " interaction"


def factorial_effects(
    per_seed: pd.DataFrame,
    *,
    factors: dict[str, tuple[Any, Any]],
    metrics: list[str],
    seed_column: str = "seed",
    confidence: float = 0.95,
    pooled_ols: bool = True,
) -> pd.DataFrame:
    """All main effects and interactions of a complete 2^k factorial, per metric, blocked on seed.

    ``per_seed`` is tidy (one row per run) with one column per factor, a ``seed_column`` and one column
    per metric. ``factors`` maps a factor column to its ``(low, high)`` levels, coded −1 / +1. Every one of
    the 2^k cells must have at least one run (ValueError naming the missing cells otherwise); NaN metric
    values are dropped per metric before that check, and each (cell, seed) may appear at most once.

    Primary test (:func:`seed_blocked_effects`): the seeds that ran every cell (complete blocks) each give
    one contrast per effect; ``estimate`` is their mean (mean(high) − mean(low) over the cells, for a main
    effect), ``ci_low``/``ci_high`` its t-interval, ``t``, ``df`` = S − 1 and ``p`` the one-sample t-test
    across seeds, ``p_holm`` Holm across the 2^k − 1 effects of the metric, ``seeds`` = S. Seeds missing a
    cell are left out of that metric (the count says so). With no complete seed the estimate comes from
    the unweighted cell means and every test is NaN.

    Secondary, for comparison only (``pooled_ols``): ``p_pooled_ols`` is the ANOVA F-test of a ±1-coded
    saturated OLS that pools all runs as independent (statsmodels, type II, df_den = N − 2^k), the
    analysis this project reported before; it ignores that cells share each seed's random numbers and is
    not valid for this design. ``p_pooled_ols_holm`` is its Holm adjustment.

    Returns the columns :data:`FACTORIAL_COLUMNS`, effects named and ordered as
    :func:`factorial_effect_names`; ``contrast`` says in words what a positive estimate means.
    """
    _check_factors(per_seed, factors)
    _require_columns(per_seed, [*metrics, seed_column], "factorial_effects")
    factor_names = list(factors)
    k = len(factor_names)
    effect_names = factorial_effect_names(factor_names)
    all_codes = _codes(per_seed, factors)
    # Cell index in standard order: first factor slowest, low (−1) before high (+1).
    weights = 2 ** np.arange(k - 1, -1, -1)
    cell_index = pd.Series(
        ((all_codes.to_numpy() > 0).astype(int) * weights).sum(axis=1), index=per_seed.index
    )

    rows = []
    for metric in metrics:
        y = per_seed[metric].astype(float)
        if np.isinf(y).any():
            raise ValueError(f"metric {metric!r} contains infinite values")
        keep = y.notna()
        missing = _missing_cells(all_codes[keep], factors)
        if missing:
            raise ValueError(
                f"factorial_effects: metric {metric!r} has no runs in {len(missing)} of {2**k} cells: "
                + "; ".join(missing)
            )
        long = pd.DataFrame({"seed": per_seed.loc[keep, seed_column], "cell": cell_index[keep], "y": y[keep]})
        repeated = long.duplicated(subset=["seed", "cell"])
        if repeated.any():
            seeds = sorted(long.loc[repeated, "seed"].unique().tolist())
            raise ValueError(
                f"factorial_effects: metric {metric!r} has more than one run for one cell and seed "
                f"(seed(s) {seeds}); each seed must run each cell once"
            )
        table = long.pivot(index="seed", columns="cell", values="y").reindex(columns=range(2**k))
        complete = table.dropna()
        result = seed_blocked_effects(complete.to_numpy(), confidence=confidence)
        estimates = result["estimate"]
        if len(complete) == 0:
            estimates = effect_contrasts(k) @ long.groupby("cell")["y"].mean().sort_index().to_numpy()
            estimates = estimates / 2 ** (k - 1)
        holm = adjust_pvalues(result["p"], "holm")
        pooled = _pooled_ols_pvalues(all_codes[keep], y[keep], factor_names) if pooled_ols else None
        pooled_holm = adjust_pvalues(pooled, "holm") if pooled is not None else None
        for index, effect in enumerate(effect_names):
            rows.append(
                {
                    "metric": metric,
                    "effect": effect,
                    "contrast": effect_label(effect, factors),
                    "estimate": float(estimates[index]),
                    "ci_low": float(result["ci_low"][index]),
                    "ci_high": float(result["ci_high"][index]),
                    "se": float(result["se"][index]),
                    "t": float(result["t"][index]),
                    "df": float(result["df"]) if len(complete) >= 2 else math.nan,
                    "p": float(result["p"][index]),
                    "p_holm": float(holm[index]),
                    "seeds": len(complete),
                    "p_pooled_ols": float(pooled[index]) if pooled is not None else math.nan,
                    "p_pooled_ols_holm": float(pooled_holm[index]) if pooled_holm is not None else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=FACTORIAL_COLUMNS)


def _pooled_ols_pvalues(codes: pd.DataFrame, y: pd.Series, factor_names: list[str]) -> np.ndarray:
    """ANOVA (type II) p-values of the saturated ±1-coded OLS that treats every run as independent.

    Kept only as a labelled secondary column: it is what a textbook 2^k analysis with replicates does,
    and it is wrong here because the replicates of different cells share random numbers. NaN where the
    fit leaves no error estimate (one run per cell, or an exact fit).
    """
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    k = len(factor_names)
    internal = {name: f"x{i}" for i, name in enumerate(factor_names)}
    terms = [":".join(internal[name] for name in combo) for combo in _effect_combinations(k, factor_names)]
    data = codes.rename(columns=internal).reset_index(drop=True)
    data["y"] = y.to_numpy(dtype=float)
    model = smf.ols("y ~ " + " + ".join(terms), data=data).fit()
    total_ss = float(((data["y"] - data["y"].mean()) ** 2).sum())
    if not (model.df_resid > 0 and model.ssr > _EXACT_FIT_RELATIVE_SSR * total_ss):
        return np.full(len(terms), np.nan)
    anova = anova_lm(model, typ=2)
    return np.array([float(anova.loc[term, "PR(>F)"]) for term in terms])


def factorial_cell_means(
    per_seed: pd.DataFrame,
    factors: dict[str, tuple[Any, Any]],
    metric: str,
    confidence: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Per-cell summary of one metric over the cells of ``factors``.

    One row per cell, all 2^k cells in standard order (first factor varying slowest, low before high),
    with the factor columns holding the level labels, then ``n, mean, std, sem, ci_low, ci_high`` from
    :func:`describe` (NaN metric values dropped). Factors of the data not named in ``factors`` are pooled
    over, so passing one or two factors gives the marginal means of main-effect and interaction plots.
    A cell without runs has n = 0 and NaN statistics; no completeness is required here. ``bounds`` is the
    metric's range, passed to :func:`describe` to clip each cell's interval.
    """
    _check_factors(per_seed, factors)
    _require_columns(per_seed, [metric], "factorial_cell_means")
    rows = []
    for cell in itertools.product(*factors.values()):
        mask = np.ones(len(per_seed), dtype=bool)
        for column, level in zip(factors, cell, strict=True):
            mask &= (per_seed[column] == level).to_numpy()
        summary = describe(
            per_seed.loc[mask, metric].to_numpy(dtype=float), confidence=confidence, bounds=bounds
        )
        rows.append({**dict(zip(factors, cell, strict=True)), **summary})
    return pd.DataFrame(rows, columns=[*factors, "n", "mean", "std", "sem", "ci_low", "ci_high"])


# --------------------------------------------------------------------------------------------------
# Simulated designs, for checking the error rates of the tests above
# --------------------------------------------------------------------------------------------------


def simulate_seed_shared_factorial(
    simulations: int,
    seeds: int,
    *,
    k: int = 4,
    seed_sd: float = 1.0,
    seed_by_first_factor_sd: float = 1.0,
    seed_by_second_factor_sd: float = 1.0,
    first_factor_level_correlation: float = -0.5,
    residual_sd: float = 1.0,
    effects: dict[int, float] | None = None,
    random_state: int | None = 0,
) -> np.ndarray:
    """Factorial data ``[simulation, seed, cell]`` with random numbers shared within a seed, as in the study.

    For seed s and cell c (standard order, see :func:`effect_contrasts`), with a(c) the level of factor 0
    (init) and b(c) the level of factor 1 (noise):

        y[s, c] = u_s + v_{s, a(c)} + w_{s, b(c)} + Σ_e effect_e·contrast_e(c)/2 + ε_{s, c}

    - u_s ~ N(0, seed_sd²): what every cell of a seed shares (the data set, the SAE initialization);
    - v_{s, level} ~ N(0, seed_by_first_factor_sd²), correlated ``first_factor_level_correlation`` between
      the two levels: the network initialization, shared by the cells of one init level (the measured
      residual correlations were positive within an init level and negative across levels);
    - w_{s, level} ~ N(0, seed_by_second_factor_sd²): the noise draws, shared per noise kind;
    - ε ~ N(0, residual_sd²) independent.

    ``effects`` maps an effect index (order of :func:`factorial_effect_names`) to its true value
    mean(high) − mean(low); absent effects are zero (the null). Every simulation is independent.
    """
    rng = np.random.default_rng(random_state)
    cells = np.array(list(itertools.product((0, 1), repeat=k)))
    shape = (simulations, seeds)
    shared = rng.normal(0.0, seed_sd, shape)[..., None]
    rho = first_factor_level_correlation
    covariance = seed_by_first_factor_sd**2 * np.array([[1.0, rho], [rho, 1.0]])
    first = rng.multivariate_normal(np.zeros(2), covariance, size=shape)  # [sim, seed, level]
    second = rng.normal(0.0, seed_by_second_factor_sd, (*shape, 2))
    values = shared + first[..., cells[:, 0]] + second[..., cells[:, 1]]
    values = values + rng.normal(0.0, residual_sd, (*shape, 2**k))
    if effects:
        contrasts = effect_contrasts(k)
        for index, size in effects.items():
            values = values + size * contrasts[index] / 2
    return values


def pooled_ols_effect_pvalues(values: ArrayLike) -> np.ndarray:
    """The pooled OLS/ANOVA p-value of every effect, vectorized: ``values: [..., seed, cell]`` → ``[..., effect]``.

    The closed form of :func:`_pooled_ols_pvalues` for a balanced design with one run per (seed, cell):
    β_e = contrast_e·ȳ_cells / 2^k, SS_e = N·β_e², residual SS = Σ (y − ȳ_cell)², df = N − 2^k, and
    F = SS_e / (SS_res/df) on (1, df) degrees of freedom. For simulations only; the report uses statsmodels.
    """
    import scipy.stats

    array = np.asarray(values, dtype=float)
    seeds, cells = array.shape[-2], array.shape[-1]
    k = int(round(math.log2(cells)))
    cell_means = array.mean(axis=-2)  # [..., cell]
    beta = cell_means @ effect_contrasts(k).T / cells
    total = seeds * cells
    residual_df = total - cells
    residual_ms = ((array - cell_means[..., None, :]) ** 2).sum(axis=(-2, -1)) / residual_df
    f_values = total * beta**2 / residual_ms[..., None]
    return scipy.stats.f.sf(f_values, 1, residual_df)
