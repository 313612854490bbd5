"""Dose–response analysis of one numeric sweep axis (λ, hidden width, …), blocked on seed.

Pure: a tidy per-seed DataFrame in, DataFrames and sentences out; no tracking store, no plotting (the figure
is `pipeline.plots.dose_response`).

Design fact every inference here respects: seed k of every configuration of a sweep shares the data set,
the initializations and the noise draws, so the levels of the axis are *paired* on seed and the runs of one
seed are not independent. Each question is therefore answered per seed first and then across seeds, where
the seeds are independent replicates (the randomized complete block logic of `pipeline.stats`):

- **trend**: per seed s, the least-squares slope b_s of the metric on x (x = log10 level for λ-like axes,
  the level itself otherwise); then a one-sample t-test of the S slopes, df = S − 1.
- **curvature**: per seed, the coefficient c_s of (x − x̄)² in the least-squares fit of the metric on
  1, (x − x̄), (x − x̄)²; the same one-sample t across seeds. c > 0 with its CI above 0 means convex
  (U-shaped when the minimum is also inside the tested range). Needs ≥ 3 levels.
- **minimum location**: the level with the lowest mean, and (when the curvature estimate is positive) the
  vertex −b/(2c) of the quadratic fitted to the level means, clipped to the tested range; their 95 %
  intervals are percentile bootstraps that resample whole seeds (every level of a drawn seed comes along).

Only seeds present at every level of a group enter the per-seed fits and the bootstrap (their number is
reported); the per-level table describes each level with all of its seeds. A pooled regression that treats
every (level, seed) run as independent is kept only as `pooled_ols_dose_pvalues`, for the simulation in
``bench/dose_response_inference.py`` that shows why it is not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
from numpy.typing import ArrayLike

from pipeline.stats import describe, one_sample_t_across_seeds

LEVEL_COLUMNS = [
    "group",
    "level",
    "x",
    "seeds",
    "mean",
    "std",
    "sem",
    "ci_low",
    "ci_high",
    "within_ci_low",
    "within_ci_high",
    "difference",
    "difference_ci_low",
    "difference_ci_high",
    "difference_p",
    "difference_seeds",
]
"""Columns of :attr:`DoseResponse.levels` after the group columns: one row per (group, level). ``seeds``,
``mean`` … ``ci_high`` describe the level's own per-seed values (t-interval); ``within_ci_low/high`` is the
seed-blocked interval the figures draw (Cousineau–Morey: each complete seed's mean over the levels removed,
the grand mean added back, the t-interval widened by √(J/(J−1)) for J levels), which shows the differences
between levels the paired tests see rather than the offset a seed shares across them; ``difference`` is the paired
mean difference from the group's lowest level over the ``difference_seeds`` seeds that ran both, with its
paired t-interval and p-value (0 and NaN at the lowest level itself)."""

TEST_COLUMNS = [
    "group",
    "levels_left_out",
    "axis",
    "metric",
    "log_scale",
    "levels",
    "range_low",
    "range_high",
    "seeds",
    "seeds_total",
    "trend_estimate",
    "trend_ci_low",
    "trend_ci_high",
    "trend_se",
    "trend_t",
    "trend_df",
    "trend_p",
    "trend_reason",
    "curvature_estimate",
    "curvature_ci_low",
    "curvature_ci_high",
    "curvature_se",
    "curvature_t",
    "curvature_df",
    "curvature_p",
    "curvature_reason",
    "minimum_level",
    "minimum_ci_low",
    "minimum_ci_high",
    "minimum_interior",
    "minimum_interior_fraction",
    "vertex_level",
    "vertex_ci_low",
    "vertex_ci_high",
    "is_u_shaped",
    "reading",
]
"""Columns of :attr:`DoseResponse.tests` after the group columns: one row per group.

``levels_left_out`` lists the levels left out of the tests because fewer than half the group's seeds have
a value there. ``levels`` is the number of tested levels, from ``range_low`` to ``range_high`` (axis units). ``seeds`` is
the number of seeds present at every level (those the fits and bootstrap use), ``seeds_total``
the number seen at any level. ``trend_*`` is the slope of the metric per unit of x (per decade when
``log_scale``), ``curvature_*`` the coefficient of (x − x̄)²; ``*_reason`` says why a test is NaN ("" when it
ran). ``minimum_level`` is the tested level with the lowest mean over those seeds and ``minimum_ci_*`` its
bootstrap interval (tested levels); ``minimum_interior`` whether it lies strictly inside the tested range and
the fitted quadratic's minimum does too; ``minimum_interior_fraction`` the share of bootstrap resamples whose
lowest level is interior. ``vertex_*`` is the vertex of the quadratic fit to the level means (NaN unless the
curvature estimate is positive) with its bootstrap interval, in axis units. ``is_u_shaped`` = curvature CI
above 0 and ``minimum_interior``; ``reading`` is one sentence."""

# Auto log scale: an axis spanning at least a decade of positive values (λ = 1e-5 … 1e-2) is read per
# decade; one spanning less (widths 6 … 12) is read in its own units.
_LOG_SCALE_MINIMUM_RATIO = 10.0


@dataclass(frozen=True)
class DoseResponse:
    """The dose–response analysis of one metric along one axis; see :func:`dose_response`.

    ``levels``: columns ``group_columns`` + :data:`LEVEL_COLUMNS`, one row per (group, tested level), in
    group order then level order. ``tests``: columns ``group_columns`` + :data:`TEST_COLUMNS`, one row per
    group. ``log_scale`` says whether x = log10(level) (then slopes are per decade).
    """

    axis: str
    axis_label: str
    metric: str
    group_columns: tuple[str, ...]
    log_scale: bool
    confidence: float
    n_resamples: int
    levels: pd.DataFrame
    tests: pd.DataFrame

    @property
    def readings(self) -> list[str]:
        """One sentence per group, in group order."""
        return self.tests["reading"].tolist()


# --------------------------------------------------------------------------------------------------
# Vectorized core: arrays [..., seed, level] in, so simulations and the public function share one code path
# --------------------------------------------------------------------------------------------------


def _centered(x: ArrayLike) -> np.ndarray:
    array = np.asarray(x, dtype=float).ravel()
    return array - array.mean()


def slope_weights(x: ArrayLike) -> np.ndarray:
    """Weights ``w: [level]`` with per-seed least-squares slope b_s = y_s · w.

    b = Σ (x_l − x̄)(y_l − ȳ) / Σ (x_l − x̄)²  and  Σ (x_l − x̄) ȳ = 0,  so  w_l = (x_l − x̄) / Σ (x − x̄)².
    """
    centered = _centered(x)
    return centered / (centered**2).sum()


def quadratic_weights(x: ArrayLike) -> np.ndarray:
    """Rows ``[3, level]`` mapping y to the least-squares coefficients of 1, (x − x̄), (x − x̄)².

    The pseudo-inverse of the design [1, x − x̄, (x − x̄)²]: coefficients = weights @ y. The coefficient of
    the square is the same as without centring (the span of the design does not change); centring only keeps
    the design well conditioned for x = log10 λ around −4.
    """
    centered = _centered(x)
    design = np.stack([np.ones_like(centered), centered, centered**2], axis=1)
    return np.linalg.pinv(design)


def _one_sample_t(per_seed: np.ndarray, rounding: np.ndarray, confidence: float) -> dict[str, np.ndarray]:
    """`pipeline.stats.one_sample_t_across_seeds`: the same seed-blocked test as the factorial effects."""
    return one_sample_t_across_seeds(per_seed, rounding, confidence)


def seed_blocked_dose_tests(
    values: ArrayLike, x: ArrayLike, confidence: float = 0.95
) -> dict[str, dict[str, np.ndarray]]:
    """Trend and curvature of ``values: [..., seed, level]`` along ``x: [level]``, tested across seeds.

    Per seed s: slope b_s = y_s · :func:`slope_weights` (needs ≥ 2 levels) and quadratic coefficient
    c_s = y_s · :func:`quadratic_weights`[2] (needs ≥ 3 levels). Then for each, over the S seeds,

        estimate = mean_s, se = sd_s / √S, t = estimate / se, df = S − 1, CI = estimate ± t_{df}·se,

    a one-sample t-test of 0. Valid whatever the within-seed correlation across levels, because the S
    per-seed values are independent (different seeds share nothing). Leading dimensions are independent
    problems (simulations). Returns ``{"trend": {...}, "curvature": {...}}``, each with arrays ``estimate,
    se, t, p, ci_low, ci_high`` of shape ``[...]``, ``df`` (scalar) and ``per_seed`` ``[..., seed]``; a test
    the levels cannot support is all NaN.
    """
    array = np.asarray(values, dtype=float)
    x_array = np.asarray(x, dtype=float).ravel()
    if array.ndim < 2 or array.shape[-1] != x_array.size:
        raise ValueError(f"values must be [..., seed, level] with {x_array.size} levels; got {array.shape}")
    levels = x_array.size
    # The largest rounding error of a weighted sum Σ w_l y_l is about eps·max|y|·Σ|w|.
    magnitude = np.abs(array).max(axis=(-2, -1)) if array.size else np.zeros(array.shape[:-2])
    results = {}
    for name, minimum_levels in (("trend", 2), ("curvature", 3)):
        if levels < minimum_levels or np.ptp(x_array) == 0:
            nan = np.full(array.shape[:-1], np.nan)
            test = _one_sample_t(nan, np.ones(array.shape[:-2]), confidence)
            test["per_seed"] = nan
        else:
            weights = slope_weights(x_array) if name == "trend" else quadratic_weights(x_array)[2]
            per_seed = array @ weights
            test = _one_sample_t(per_seed, magnitude * np.abs(weights).sum(), confidence)
            test["per_seed"] = per_seed
        results[name] = test
    return results


def quadratic_minimum(means: ArrayLike, x: ArrayLike) -> np.ndarray:
    """Where the least-squares quadratic through ``means: [..., level]`` is lowest on [min x, max x].

    With the fit a + b·u + c·u², u = x − x̄: the vertex −b/(2c) clipped to the range when c > 0, else
    whichever end of the range the fit is lower at (a concave or straight fit is lowest at an end). Defined
    for every resample of a bootstrap, which the bare vertex is not. Returns x (not the level), ``[...]``.
    """
    x_array = np.asarray(x, dtype=float).ravel()
    centre = x_array.mean()
    low, high = x_array.min() - centre, x_array.max() - centre
    coefficients = np.asarray(means, dtype=float) @ quadratic_weights(x_array).T  # [..., 3]
    a, b, c = coefficients[..., 0], coefficients[..., 1], coefficients[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.clip(-b / (2 * c), low, high)
    lower_end = np.where(a + b * low + c * low**2 <= a + b * high + c * high**2, low, high)
    return np.where(c > 0, vertex, lower_end) + centre


def pooled_ols_dose_pvalues(values: ArrayLike, x: ArrayLike) -> dict[str, np.ndarray]:
    """For comparison only: trend and curvature p-values of an OLS that pools every run as independent.

    ``values: [..., seed, level]``, one run per (seed, level), N = S·L. Trend: y ~ 1 + x (df = N − 2);
    curvature: y ~ 1 + u + u², u = x − x̄ (df = N − 3). In a balanced design the coefficients are those of
    the fit to the level means, with Var(β) = σ̂² (X_Lᵀ X_L)⁻¹ / S and σ̂² the pooled residual mean square.
    It ignores that a seed's levels share random numbers, which is why the report does not use it.
    """
    array = np.asarray(values, dtype=float)
    x_array = np.asarray(x, dtype=float).ravel()
    seeds, levels = array.shape[-2], array.shape[-1]
    centered = _centered(x_array)
    designs = {
        "trend": np.stack([np.ones_like(centered), centered], axis=1),
        "curvature": np.stack([np.ones_like(centered), centered, centered**2], axis=1),
    }
    means = array.mean(axis=-2)  # [..., level]
    result = {}
    for name, design in designs.items():
        coefficients = means @ np.linalg.pinv(design).T  # [..., parameter]
        fitted = coefficients @ design.T  # [..., level]
        residual_df = seeds * levels - design.shape[1]
        residual_ms = ((array - fitted[..., None, :]) ** 2).sum(axis=(-2, -1)) / residual_df
        variance = residual_ms * np.linalg.inv(design.T @ design)[-1, -1] / seeds
        t = coefficients[..., -1] / np.sqrt(variance)
        result[name] = 2 * scipy.stats.t.sf(np.abs(t), residual_df)
    return result


def simulate_seed_shared_dose(
    simulations: int,
    seeds: int,
    x: ArrayLike,
    *,
    seed_sd: float = 1.0,
    seed_slope_sd: float = 0.0,
    seed_curvature_sd: float = 0.0,
    seed_by_level_sd: float = 0.5,
    level_correlation: float = 0.7,
    residual_sd: float = 0.5,
    slope: float = 0.0,
    curvature: float = 0.0,
    random_state: int | None = 0,
) -> np.ndarray:
    """Dose–response data ``[simulation, seed, level]`` whose levels share random numbers within a seed.

    With u_l = x_l − x̄:

        y[s, l] = a_s + β_s·u_l + γ_s·u_l² + v_{s, l} + slope·u_l + curvature·u_l² + ε_{s, l}

    - a_s ~ N(0, seed_sd²): what every level of a seed shares (data set, initialization, noise draws);
    - β_s ~ N(0, seed_slope_sd²), γ_s ~ N(0, seed_curvature_sd²): a seed's own dose response (a data set
      whose features interfere more may be more sensitive to λ), zero on average;
    - v_s ~ N(0, Σ), Σ_{lm} = seed_by_level_sd²·level_correlation^|l − m|: a seed-specific wiggle along the
      axis, smooth across neighbouring levels (a seed whose data make λ = 1e-4 unusual make 3e-4 unusual too);
    - ε ~ N(0, residual_sd²) independent.

    ``slope`` and ``curvature`` are the true mean response; both 0 is the null of no dose effect.
    """
    rng = np.random.default_rng(random_state)
    x_array = np.asarray(x, dtype=float).ravel()
    levels = x_array.size
    index = np.arange(levels)
    covariance = seed_by_level_sd**2 * level_correlation ** np.abs(index[:, None] - index[None, :])
    shape = (simulations, seeds)
    centered = _centered(x_array)
    offset = rng.normal(0.0, seed_sd, shape)[..., None]
    own_slope = rng.normal(0.0, seed_slope_sd, shape)[..., None]
    own_curvature = rng.normal(0.0, seed_curvature_sd, shape)[..., None]
    wiggle = rng.standard_normal((*shape, levels)) @ np.linalg.cholesky(covariance).T
    values = offset + own_slope * centered + own_curvature * centered**2 + wiggle
    values = values + rng.normal(0.0, residual_sd, (*shape, levels))
    return values + slope * centered + curvature * centered**2


# --------------------------------------------------------------------------------------------------
# Choosing axes
# --------------------------------------------------------------------------------------------------


def numeric_axes(frame: pd.DataFrame, candidate_columns: Sequence[str], minimum_levels: int = 2) -> list[str]:
    """The candidate columns that can be a dose axis: every non-missing value parses as a number and there
    are at least ``minimum_levels`` distinct numbers (2 for a trend; pass 3 to also allow a curvature test).

    ``frame`` holds per-seed settings, typically as stored params (strings such as "1e-4"); booleans are not
    doses and are left out. Columns absent from ``frame`` are skipped. Returns names in candidate order.
    """
    axes = []
    for column in candidate_columns:
        if column not in frame.columns or pd.api.types.is_bool_dtype(frame[column]):
            continue
        present = frame[column].dropna()
        numbers = pd.to_numeric(present, errors="coerce")
        if len(present) == 0 or numbers.isna().any() or not np.isfinite(numbers.to_numpy(dtype=float)).all():
            continue
        if numbers.nunique() >= minimum_levels:
            axes.append(column)
    return axes


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------


def _numeric_axis(frame: pd.DataFrame, axis: str) -> pd.Series:
    numbers = pd.to_numeric(frame[axis], errors="coerce")
    unparsed = frame.loc[numbers.isna(), axis]
    if len(unparsed):
        shown = sorted({str(value) for value in unparsed})[:5]
        raise ValueError(
            f"dose_response: axis {axis!r} must be numeric in every row; {len(unparsed)} row(s) hold "
            f"{shown} (drop the runs without a value first)"
        )
    numbers = numbers.astype(float)
    if not np.isfinite(numbers).all():
        raise ValueError(f"dose_response: axis {axis!r} contains infinite values")
    return numbers


def _choose_log_scale(levels: np.ndarray, log_scale: bool | None, axis: str) -> bool:
    positive = levels.size > 0 and bool((levels > 0).all())
    if log_scale is None:
        return positive and levels.max() / levels.min() >= _LOG_SCALE_MINIMUM_RATIO
    if log_scale and not positive:
        raise ValueError(
            f"dose_response: log_scale=True needs every level of {axis!r} > 0; got {sorted(set(levels))}"
        )
    return bool(log_scale)


def group_label(columns: Sequence[str], values: tuple) -> str:
    if not columns:
        return "all"
    # "network.reg" reads as "reg" unless two group columns would then share a name.
    short = [column.rsplit(".", 1)[-1] for column in columns]
    names = short if len(set(short)) == len(short) else list(columns)
    return ", ".join(f"{name}={value}" for name, value in zip(names, values, strict=True))


def _check_duplicates(rows: pd.DataFrame, axis: str, seed_column: str, label: str) -> None:
    repeated = rows[rows.duplicated(subset=["level", seed_column], keep=False)]
    if len(repeated):
        pairs = sorted(
            {
                (float(level), seed)
                for level, seed in zip(repeated["level"], repeated[seed_column], strict=True)
            }
        )
        shown = "; ".join(f"{axis} = {level:g}, seed {seed}" for level, seed in pairs[:5])
        raise ValueError(
            f"dose_response: more than one run for one level and seed in group {label!r} ({shown}); "
            "each seed must run each level once"
        )


def dose_response(
    frame: pd.DataFrame,
    axis: str,
    metric: str,
    *,
    group_columns: Sequence[str] = (),
    log_scale: bool | None = None,
    n_resamples: int = 2000,
    random_state: int = 0,
    seed_column: str = "seed",
    confidence: float = 0.95,
    axis_label: str | None = None,
) -> DoseResponse:
    """How ``metric`` responds to the numeric ``axis``, per group, blocked on seed.

    ``frame``: one row per (configuration, seed), with ``seed_column``, ``axis`` (numbers, or strings that
    parse as numbers, e.g. stored params) and ``metric``, plus any ``group_columns`` (e.g. ``network.reg``):
    one independent analysis per combination of their values. NaN metric values (failed runs) are dropped;
    infinite ones, a non-numeric axis value, or a seed appearing twice at one level of a group raise
    ValueError.

    ``log_scale``: x = log10(level) when True, the level when False; None (auto) takes log10 when every
    level is > 0 and max/min ≥ 10 (λ = 1e-5 … 1e-2), the raw axis otherwise (widths 6 … 12). Decided once
    for all groups so their slopes share units. ``axis_label`` names the axis in sentences (default: the
    last dotted part of ``axis``, "lambda_reg" for ``network.lambda_reg``).

    Returns a :class:`DoseResponse`; the methods are in the module docstring. The bootstrap draws
    ``n_resamples`` resamples of the complete seeds from ``numpy.random.default_rng(random_state)``, fresh
    for every group, so a group's result does not depend on which other groups are present.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    group_columns = tuple(group_columns)
    if axis in group_columns or seed_column in group_columns:
        raise ValueError("dose_response: the axis and the seed column cannot also be group columns")
    missing = [
        column for column in (seed_column, axis, metric, *group_columns) if column not in frame.columns
    ]
    if missing:
        raise ValueError(f"dose_response: missing column(s) {missing}; available: {list(frame.columns)}")
    metric_values = pd.to_numeric(frame[metric], errors="raise").astype(float)
    if np.isinf(metric_values).any():
        raise ValueError(f"dose_response: metric {metric!r} contains infinite values")

    data = pd.DataFrame({seed_column: frame[seed_column], "level": _numeric_axis(frame, axis)})
    data["y"] = metric_values
    for column in group_columns:
        data[column] = frame[column]
    use_log = _choose_log_scale(data.loc[data["y"].notna(), "level"].unique(), log_scale, axis)
    label = axis_label if axis_label is not None else axis.rsplit(".", 1)[-1]

    level_rows, test_rows = [], []
    grouped = data.groupby(list(group_columns), sort=True, dropna=False) if group_columns else [((), data)]
    for key, rows in grouped:
        values = key if isinstance(key, tuple) else (key,)
        group = dict(zip(group_columns, values, strict=True))
        label_of_group = group_label(group_columns, values)
        # A duplicate is a bookkeeping error whatever its metric value, so it is checked before NaNs go.
        _check_duplicates(rows, axis, seed_column, label_of_group)
        table = (
            rows.dropna(subset=["y"]).pivot(index=seed_column, columns="level", values="y").sort_index(axis=1)
        )
        tested = table.columns.to_numpy(dtype=float)
        x = np.log10(tested) if use_log else tested
        # A level where the metric is undefined for most seeds (e.g. SAE metrics of networks that strong
        # regularization collapsed) would leave almost no seed complete across levels: it is left out of the
        # tests and the seed-blocked intervals (still described in the levels table), and the reading says so.
        defined = table.notna().sum()
        sparse = defined[defined < len(table) / 2].index
        level_rows.extend(
            {**group, "group": label_of_group, **row}
            for row in _level_rows(table, tested, x, confidence, sparse)
        )
        fitted = table.drop(columns=sparse)
        fitted_levels = fitted.columns.to_numpy(dtype=float)
        fitted_x = np.log10(fitted_levels) if use_log else fitted_levels
        test_rows.append(
            {
                **group,
                "group": label_of_group,
                **_group_tests(
                    fitted, fitted_levels, fitted_x, use_log, confidence, n_resamples, random_state
                ),
                "levels_left_out": ", ".join(format_level(float(level), use_log) for level in sparse),
            }
        )

    levels = pd.DataFrame(level_rows, columns=[*group_columns, *LEVEL_COLUMNS])
    tests = pd.DataFrame(test_rows, columns=[*group_columns, *TEST_COLUMNS])
    tests["axis"], tests["metric"], tests["log_scale"] = axis, metric, use_log
    tests["reading"] = [_reading(row, metric, label, use_log, confidence) for _, row in tests.iterrows()]
    return DoseResponse(
        axis=axis,
        axis_label=label,
        metric=metric,
        group_columns=group_columns,
        log_scale=use_log,
        confidence=confidence,
        n_resamples=n_resamples,
        levels=levels,
        tests=tests,
    )


def _level_rows(
    table: pd.DataFrame, tested: np.ndarray, x: np.ndarray, confidence: float, sparse: Sequence = ()
) -> list[dict]:
    """Per-level summaries of ``table: [seed, level]`` (NaN where a seed did not run a level). The
    seed-blocked interval uses the seeds complete over the levels not in ``sparse`` (those the tests fit);
    a sparse level gets none."""
    rows = []
    lowest = table.iloc[:, 0] if table.shape[1] else None
    fitted = table.drop(columns=list(sparse))
    complete = fitted.dropna().to_numpy(dtype=float)  # [seed, level], seeds present at every fitted level
    levels_count = complete.shape[1]
    within_half = pd.Series(math.nan, index=table.columns)
    if len(complete) >= 2 and levels_count >= 2:
        normalized = complete - complete.mean(axis=1, keepdims=True) + complete.mean()
        correction = math.sqrt(levels_count / (levels_count - 1))
        within_half[fitted.columns] = (
            scipy.stats.t.ppf(0.5 + confidence / 2, len(complete) - 1)
            * normalized.std(axis=0, ddof=1)
            / math.sqrt(len(complete))
            * correction
        )
    within_half = within_half.to_numpy()
    for index, level in enumerate(tested):
        column = table.iloc[:, index]
        summary = describe(column.to_numpy())
        paired = pd.concat([column, lowest], axis=1).dropna().to_numpy()
        if index == 0:
            difference = {"estimate": 0.0, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
        else:
            differences = paired[:, 0] - paired[:, 1]
            magnitude = np.abs(paired).max() if paired.size else 0.0
            test = _one_sample_t(differences, np.asarray(2 * magnitude), confidence)
            difference = {name: float(test[name]) for name in ("estimate", "ci_low", "ci_high", "p")}
        rows.append(
            {
                "level": float(level),
                "x": float(x[index]),
                "seeds": summary["n"],
                "mean": summary["mean"],
                "std": summary["std"],
                "sem": summary["sem"],
                "ci_low": summary["ci_low"],
                "ci_high": summary["ci_high"],
                "within_ci_low": summary["mean"] - within_half[index],
                "within_ci_high": summary["mean"] + within_half[index],
                "difference": difference["estimate"],
                "difference_ci_low": difference["ci_low"],
                "difference_ci_high": difference["ci_high"],
                "difference_p": difference["p"],
                "difference_seeds": len(paired),
            }
        )
    return rows


def _group_tests(
    table: pd.DataFrame,
    tested: np.ndarray,
    x: np.ndarray,
    log_scale: bool,
    confidence: float,
    n_resamples: int,
    random_state: int,
) -> dict:
    """Trend, curvature and minimum location of one group's ``table: [seed, level]``."""
    complete = table.dropna().to_numpy(dtype=float)  # [seed, level]: seeds that ran every level
    seeds, levels = complete.shape
    row: dict = {
        "levels": levels,
        "range_low": float(tested.min()) if levels else math.nan,
        "range_high": float(tested.max()) if levels else math.nan,
        "seeds": seeds,
        "seeds_total": len(table),
    }
    tests = seed_blocked_dose_tests(complete, x, confidence) if levels and seeds else None
    for name, minimum_levels in (("trend", 2), ("curvature", 3)):
        if levels < minimum_levels:
            reason = f"needs ≥ {minimum_levels} levels; {levels} tested"
        elif seeds < 2:
            reason = f"needs ≥ 2 seeds present at every level; {seeds} of {len(table)} are"
        else:
            reason = ""
        result = tests[name] if tests is not None else {}
        if not reason and not np.isfinite(result["p"]):
            reason = "no seed-to-seed variation (every seed's fit is identical)"
        for field in ("estimate", "ci_low", "ci_high", "se", "t", "p"):
            row[f"{name}_{field}"] = float(result[field]) if levels >= minimum_levels and seeds else math.nan
        row[f"{name}_df"] = float(seeds - 1) if not reason else math.nan
        row[f"{name}_reason"] = reason
    row.update(_minimum_location(complete, tested, x, log_scale, confidence, n_resamples, random_state))
    curvature_above_zero = bool(row["curvature_ci_low"] > 0)
    row["is_u_shaped"] = curvature_above_zero and row["minimum_interior"]
    return row


def _minimum_location(
    complete: np.ndarray,
    tested: np.ndarray,
    x: np.ndarray,
    log_scale: bool,
    confidence: float,
    n_resamples: int,
    random_state: int,
) -> dict:
    """Lowest level and quadratic vertex of the level means over complete seeds, with seed bootstraps."""
    seeds, levels = complete.shape
    nan = math.nan
    empty = {
        "minimum_level": nan,
        "minimum_ci_low": nan,
        "minimum_ci_high": nan,
        "minimum_interior": False,
        "minimum_interior_fraction": nan,
        "vertex_level": nan,
        "vertex_ci_low": nan,
        "vertex_ci_high": nan,
    }
    if seeds == 0 or levels == 0:
        return empty

    def to_level(x_value: np.ndarray | float) -> np.ndarray | float:
        return 10.0**x_value if log_scale else x_value

    means = complete.mean(axis=0)
    lowest = int(np.argmin(means))
    # Whole seeds are resampled, so each resample keeps the within-seed correlation across levels.
    rng = np.random.default_rng(random_state)
    draws = rng.integers(0, seeds, size=(n_resamples, seeds))
    resampled_means = complete[draws].mean(axis=1)  # [resample, level]
    resampled_lowest = np.argmin(resampled_means, axis=1)
    tail = (1 - confidence) / 2
    # The lowest level is discrete: an interval of tested levels (inverted CDF quantiles, no interpolation).
    lowest_interval = np.quantile(resampled_lowest, [tail, 1 - tail], method="inverted_cdf")
    interior = (resampled_lowest > 0) & (resampled_lowest < levels - 1)
    result = {
        **empty,
        "minimum_level": float(tested[lowest]),
        "minimum_ci_low": float(tested[int(lowest_interval[0])]),
        "minimum_ci_high": float(tested[int(lowest_interval[1])]),
        "minimum_interior": 0 < lowest < levels - 1,
        "minimum_interior_fraction": float(interior.mean()),
    }
    if levels < 3:
        return result
    curvature = float(means @ quadratic_weights(x)[2])
    vertex = float(quadratic_minimum(means, x))
    strictly_inside = x.min() < vertex < x.max()
    result["minimum_interior"] = bool(result["minimum_interior"] and strictly_inside)
    if curvature > 0:
        # Percentiles are taken in x (log10 λ) and mapped back, so the interval is the same either way.
        vertex_interval = np.quantile(quadratic_minimum(resampled_means, x), [tail, 1 - tail])
        result["vertex_level"] = float(to_level(vertex))
        result["vertex_ci_low"] = float(to_level(vertex_interval[0]))
        result["vertex_ci_high"] = float(to_level(vertex_interval[1]))
    return result


# --------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------


def format_level(value: float, log_scale: bool) -> str:
    """A level as a reader writes it: 1e-4, 3.2e-5, 0.01 on a log axis; 9.5, 12 on a linear one."""
    if not np.isfinite(value):
        return "n/a"
    if not log_scale or value <= 0:
        return f"{value:.3g}"
    exponent = math.floor(math.log10(value))
    mantissa = round(value / 10.0**exponent, 1)
    if mantissa >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    if -2 <= exponent <= 2:
        return f"{value:.2g}"
    text = f"{mantissa:.1f}".rstrip("0").rstrip(".")
    return f"{text}e{exponent}"


def _number(value: float, signed: bool = False) -> str:
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def _p_value(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _interval(row: pd.Series, name: str, unit: str = "") -> str:
    """Estimate, its unit, CI and p: "+0.012 per decade of λ [0.004, 0.020], p = 0.006"."""
    unit = f" {unit}" if unit else ""
    return (
        f"{_number(row[f'{name}_estimate'], signed=True)}{unit} "
        f"[{_number(row[f'{name}_ci_low'])}, {_number(row[f'{name}_ci_high'])}], {_p_value(row[f'{name}_p'])}"
    )


def _percent(confidence: float) -> str:
    return f"{confidence * 100:.3g} %"


def _reading(row: pd.Series, metric: str, axis_label: str, log_scale: bool, confidence: float) -> str:
    """One sentence saying what the group's tests show, derived only from the row's numbers."""
    head = f"{metric} vs {axis_label}" + (f" ({row['group']})" if row["group"] != "all" else "")
    per = f"per decade of {axis_label}" if log_scale else f"per unit of {axis_label}"
    seeds = f"{row['seeds']} seeds" + (
        f" of {row['seeds_total']} (only those at every level)" if row["seeds"] < row["seeds_total"] else ""
    )
    if row.get("levels_left_out"):
        seeds += f"; {axis_label} = {row['levels_left_out']} left out (the metric is undefined for most seeds there)"
    if row["trend_reason"]:
        return f"{head}: not testable — {row['trend_reason']}."
    level_text = format_level(row["minimum_level"], log_scale)
    lowest = (
        f"lowest mean at {axis_label} = {level_text} (bootstrap {_percent(confidence)} CI "
        f"{format_level(row['minimum_ci_low'], log_scale)} … {format_level(row['minimum_ci_high'], log_scale)})"
    )
    curvature = f"curvature {_interval(row, 'curvature')}" if not row["curvature_reason"] else ""
    if row["is_u_shaped"]:
        where = lowest
        if np.isfinite(row["vertex_level"]):
            where = (
                f"minimum near {axis_label} = {format_level(row['vertex_level'], log_scale)} (bootstrap "
                f"{_percent(confidence)} CI {format_level(row['vertex_ci_low'], log_scale)} … "
                f"{format_level(row['vertex_ci_high'], log_scale)}); {lowest}"
            )
        return f"{head}: U-shaped — {curvature}; {where}; {seeds}."
    if curvature and row["curvature_ci_low"] > 0:
        if row["minimum_level"] in (row["range_low"], row["range_high"]):
            end = "lowest" if row["minimum_level"] == row["range_low"] else "highest"
            where = f"its lowest mean is at the {end} tested level"
        else:
            where = "the fitted quadratic is lowest at an end of the range"
        return (
            f"{head}: convex ({curvature}) but {where}, so not U-shaped within the tested range; "
            f"slope {_interval(row, 'trend', per)}; {lowest}; {seeds}."
        )
    if curvature and row["curvature_ci_high"] < 0:
        return f"{head}: ∩-shaped (concave) — {curvature}; slope {_interval(row, 'trend', per)}; {seeds}."
    if row["trend_ci_low"] > 0 or row["trend_ci_high"] < 0:
        direction = "increases" if row["trend_estimate"] > 0 else "decreases"
        scale = f"log {axis_label}" if log_scale else axis_label
        tail = (
            f"no clear curvature ({_p_value(row['curvature_p'])})" if curvature else row["curvature_reason"]
        )
        return f"{head}: {direction} with {scale} — slope {_interval(row, 'trend', per)}; {tail}; {seeds}."
    if not np.isfinite(row["trend_p"]):
        return f"{head}: not testable — {row['trend_reason'] or 'no seed-to-seed variation'}; {seeds}."
    tail = f"; {curvature}" if curvature else f"; curvature {row['curvature_reason']}"
    return f"{head}: no clear dose effect — slope {_interval(row, 'trend', per)}{tail}; {lowest}; {seeds}."


MATCHED_COLUMNS = [
    "axis",
    "metric",
    "level",
    "group",
    "reference",
    "seeds",
    "difference",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
]
"""Columns of :func:`matched_level_differences`: one row per (level, group other than the reference)."""


def matched_level_differences(
    frame: pd.DataFrame,
    axis: str,
    metric: str,
    group_columns: Sequence[str],
    *,
    reference: str | None = None,
    seed_column: str = "seed",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Each group against a reference group at the same level of ``axis`` (e.g. L2 against L1 at matched
    λ), paired on seed: per level, the per-seed differences group − reference over the seeds that ran
    both, a one-sample t across them (df = seeds − 1), Holm over every row of the metric.

    Groups are the combinations of ``group_columns`` (labelled as in :func:`dose_response`); ``reference``
    is a group label (default: the first group in sorted order; the report passes the baseline's group). Returns :data:`MATCHED_COLUMNS`; empty
    when fewer than two groups exist.
    """
    group_columns = tuple(group_columns)
    if not group_columns:
        return pd.DataFrame(columns=MATCHED_COLUMNS)
    data = pd.DataFrame({seed_column: frame[seed_column], "level": _numeric_axis(frame, axis)})
    data["y"] = pd.to_numeric(frame[metric], errors="raise").astype(float)
    data["group"] = [
        group_label(group_columns, tuple(values))
        for values in frame[list(group_columns)].itertuples(index=False)
    ]
    data = data.dropna(subset=["y"])
    groups = sorted(data["group"].unique())
    if len(groups) < 2:
        return pd.DataFrame(columns=MATCHED_COLUMNS)
    reference = groups[0] if reference is None else reference
    if reference not in groups:
        raise ValueError(f"matched_level_differences: no group {reference!r}; groups: {groups}")
    rows = []
    for level, at_level in data.groupby("level", sort=True):
        table = at_level.pivot_table(index=seed_column, columns="group", values="y", aggfunc="first")
        if reference not in table:
            continue
        for group in groups:
            if group == reference or group not in table:
                continue
            paired = table[[group, reference]].dropna().to_numpy()
            differences = paired[:, 0] - paired[:, 1]
            scale = np.asarray(2 * np.abs(paired).max()) if len(paired) else np.asarray(1.0)
            test = _one_sample_t(differences, scale, confidence) if len(paired) else None
            rows.append(
                {
                    "axis": axis,
                    "metric": metric,
                    "level": float(level),
                    "group": group,
                    "reference": reference,
                    "seeds": len(paired),
                    "difference": float(test["estimate"]) if test is not None else math.nan,
                    "ci_low": float(test["ci_low"]) if test is not None else math.nan,
                    "ci_high": float(test["ci_high"]) if test is not None else math.nan,
                    "p": float(test["p"]) if test is not None else math.nan,
                }
            )
    result = pd.DataFrame(rows, columns=MATCHED_COLUMNS)
    tested = result["p"].notna()
    if tested.any():
        from pipeline.stats import adjust_pvalues

        result.loc[tested, "p_holm"] = adjust_pvalues(result.loc[tested, "p"].to_numpy(), "holm")
    return result


def matched_readings(table: pd.DataFrame, axis_label: str, alpha: float = 0.05) -> list[str]:
    """One sentence per (metric, group): at which levels it differs clearly (Holm) from the reference."""
    readings = []
    for (metric, group), rows in table.groupby(["metric", "group"], sort=False):
        reference = rows["reference"].iloc[0]
        clear = rows[rows["p_holm"] < alpha]
        log_scale = bool((rows["level"] > 0).all() and rows["level"].max() / rows["level"].min() >= 10)
        if clear.empty:
            readings.append(
                f"{metric}: {group} does not differ clearly from {reference} at any matched {axis_label} "
                f"({len(rows)} levels, Holm p ≥ {alpha:g})."
            )
            continue
        parts = [
            f"{axis_label}={format_level(row.level, log_scale)}: {row.difference:+.3g} "
            f"[{row.ci_low:.3g}, {row.ci_high:.3g}]"
            for row in clear.itertuples()
        ]
        readings.append(
            f"{metric}: {group} − {reference} at matched {axis_label} is clear (Holm p < {alpha:g}) at "
            f"{len(clear)} of {len(rows)} levels: " + "; ".join(parts) + "."
        )
    return readings
