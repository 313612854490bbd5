"""Tests of pipeline.dose_response and its figure, against closed forms, numpy.polyfit + scipy computed here,
statsmodels' OLS, and a simulated null with seed-shared random numbers."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.api as sm

from pipeline.dose_response import (
    LEVEL_COLUMNS,
    TEST_COLUMNS,
    dose_response,
    format_level,
    numeric_axes,
    pooled_ols_dose_pvalues,
    quadratic_minimum,
    seed_blocked_dose_tests,
    simulate_seed_shared_dose,
)
from pipeline.plots.dose_response import MINIMUM_LABEL_PREFIX, dose_response_figure, dose_response_figures

matplotlib.use("Agg")

LAMBDAS = np.array([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
AXIS = "network.lambda_reg"


def frame_from(values: np.ndarray, levels, *, axis: str = AXIS, metric: str = "macs", **constants):
    """Tidy frame from ``values: [seed, level]``, rows shuffled so nothing relies on their order."""
    seeds, count = values.shape
    frame = pd.DataFrame(
        {
            "seed": np.repeat(np.arange(seeds), count),
            axis: np.tile(np.asarray(levels), seeds),
            metric: values.reshape(-1),
            **constants,
        }
    )
    return frame.sample(frac=1.0, random_state=3).reset_index(drop=True)


def known_quadratic(seeds: int = 8, random_state: int = 0):
    """y_s(z) = a_s + b_s·z + c_s·z², z = log10 λ, exactly (no residual): per-seed coefficients vary."""
    rng = np.random.default_rng(random_state)
    a = rng.normal(1.0, 2.0, seeds)  # a strong seed-shared offset
    b = rng.normal(2.8, 0.3, seeds)
    c = rng.normal(0.4, 0.05, seeds)
    z = np.log10(LAMBDAS)
    values = a[:, None] + b[:, None] * z + c[:, None] * z**2
    return values, a, b, c


# --------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------


def test_a_known_quadratic_gives_its_curvature_vertex_and_the_scipy_t_tests():
    values, _, b, c = known_quadratic()
    result = dose_response(frame_from(values, LAMBDAS), AXIS, "macs", axis_label="λ")
    row = result.tests.iloc[0]
    assert result.log_scale and bool(row["log_scale"])
    assert list(result.tests.columns) == TEST_COLUMNS
    assert list(result.levels.columns) == LEVEL_COLUMNS

    # Exact data: the quadratic coefficient of the level means is the mean of the c_s, and the vertex of
    # the mean curve a + b̄z + c̄z² is −b̄ / (2c̄) in z = log10 λ.
    assert row["curvature_estimate"] == pytest.approx(c.mean(), rel=1e-9)
    true_vertex = -b.mean() / (2 * c.mean())
    assert math.log10(row["vertex_level"]) == pytest.approx(true_vertex, abs=1e-9)

    z = np.log10(LAMBDAS)
    slopes = np.array([np.polyfit(z, one, 1)[0] for one in values])
    quadratics = np.array([np.polyfit(z, one, 2)[0] for one in values])
    for name, per_seed in (("trend", slopes), ("curvature", quadratics)):
        reference = scipy.stats.ttest_1samp(per_seed, 0.0)
        interval = reference.confidence_interval(0.95)
        assert row[f"{name}_estimate"] == pytest.approx(per_seed.mean(), rel=1e-9)
        assert row[f"{name}_t"] == pytest.approx(reference.statistic, rel=1e-9)
        assert row[f"{name}_p"] == pytest.approx(reference.pvalue, rel=1e-9)
        assert row[f"{name}_df"] == len(values) - 1
        assert (row[f"{name}_ci_low"], row[f"{name}_ci_high"]) == pytest.approx(
            (interval.low, interval.high), rel=1e-9
        )
        assert row[f"{name}_reason"] == ""

    # The vertex (10^−3.5 ≈ 3.2e-4) lies between tested levels; the lowest mean is at 1e-4 or 1e-3.
    means = values.mean(axis=0)
    assert row["minimum_level"] == LAMBDAS[np.argmin(means)]
    assert bool(row["minimum_interior"]) and bool(row["is_u_shaped"])
    assert row["vertex_ci_low"] <= row["vertex_level"] <= row["vertex_ci_high"]
    assert row["reading"].startswith("macs vs λ: U-shaped — curvature +")
    assert f"minimum near λ = {format_level(row['vertex_level'], True)}" in row["reading"]


def test_the_per_level_table_is_each_levels_t_interval_and_the_paired_difference_from_the_lowest():
    values, *_ = known_quadratic()
    values = values + np.random.default_rng(5).normal(0, 0.2, values.shape)
    levels = dose_response(frame_from(values, LAMBDAS), AXIS, "macs").levels
    assert levels["level"].tolist() == LAMBDAS.tolist()
    assert levels["x"].to_numpy() == pytest.approx(np.log10(LAMBDAS))
    for index, row in levels.iterrows():
        column = values[:, index]
        interval = scipy.stats.ttest_1samp(column, 0.0).confidence_interval(0.95)
        assert row["mean"] == pytest.approx(column.mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high))
        assert row["seeds"] == len(column)
        if index == 0:
            assert row["difference"] == 0 and math.isnan(row["difference_p"])
            continue
        paired = scipy.stats.ttest_rel(column, values[:, 0])
        paired_interval = paired.confidence_interval(0.95)
        assert row["difference"] == pytest.approx((column - values[:, 0]).mean())
        assert row["difference_p"] == pytest.approx(paired.pvalue)
        assert (row["difference_ci_low"], row["difference_ci_high"]) == pytest.approx(
            (paired_interval.low, paired_interval.high)
        )


def test_a_monotone_response_is_a_trend_with_its_minimum_at_the_end_not_a_u():
    rng = np.random.default_rng(1)
    z = np.log10(LAMBDAS)
    values = rng.normal(0, 1.0, (10, 1)) - 0.5 * z + rng.normal(0, 0.1, (10, len(z)))
    row = dose_response(frame_from(values, LAMBDAS), AXIS, "macs", axis_label="λ").tests.iloc[0]
    assert row["trend_estimate"] == pytest.approx(-0.5, abs=0.1)
    assert row["trend_ci_high"] < 0 and row["trend_p"] < 0.001
    assert row["minimum_level"] == LAMBDAS[-1]
    assert row["minimum_ci_low"] == row["minimum_ci_high"] == LAMBDAS[-1]
    assert not row["minimum_interior"] and not row["is_u_shaped"]
    assert row["minimum_interior_fraction"] == 0
    assert "decreases with log λ" in row["reading"] and "U-shaped" not in row["reading"]


def test_a_concave_response_reads_as_inverted_u():
    rng = np.random.default_rng(2)
    z = np.log10(LAMBDAS)
    values = rng.normal(0, 1.0, (10, 1)) - 0.3 * (z + 3) ** 2 + rng.normal(0, 0.05, (10, len(z)))
    row = dose_response(frame_from(values, LAMBDAS), AXIS, "macs").tests.iloc[0]
    assert row["curvature_ci_high"] < 0
    assert math.isnan(row["vertex_level"])  # a concave fit has no minimum vertex
    assert not row["is_u_shaped"] and "∩-shaped" in row["reading"]


def test_widths_stay_on_their_own_scale_and_slopes_are_per_unit():
    widths = np.array([6, 8, 9, 12])
    rng = np.random.default_rng(4)
    values = rng.normal(0, 1, (6, 1)) + 0.1 * widths + rng.normal(0, 0.01, (6, 4))
    result = dose_response(
        frame_from(values, widths, axis="network.hidden_dim"), "network.hidden_dim", "macs"
    )
    row = result.tests.iloc[0]
    assert not result.log_scale and result.axis_label == "hidden_dim"
    assert row["trend_estimate"] == pytest.approx(0.1, abs=0.01)
    assert "per unit of hidden_dim" in row["reading"]
    assert result.levels["x"].tolist() == widths.tolist()


# --------------------------------------------------------------------------------------------------
# Error rates and the bootstrap
# --------------------------------------------------------------------------------------------------


# Strong seed-shared offset, each seed its own slope and curvature, and a smooth seed × level wiggle.
SEED_SHARED = {
    "seed_sd": 2.0,
    "seed_slope_sd": 0.3,
    "seed_curvature_sd": 0.1,
    "seed_by_level_sd": 1.0,
    "level_correlation": 0.8,
    "residual_sd": 0.3,
}


def test_the_seed_blocked_tests_hold_their_false_positive_rate_under_a_seed_shared_null():
    x = np.log10(LAMBDAS)
    values = simulate_seed_shared_dose(2000, 10, x, **SEED_SHARED, random_state=11)
    assert values.shape == (2000, 10, 5)
    tests = seed_blocked_dose_tests(values, x)
    for name in ("trend", "curvature"):
        rate = (tests[name]["p"] < 0.05).mean()
        assert 0.02 <= rate <= 0.09, (name, rate)
    # The same simulation with a planted curvature is found almost always: the test is not mute.
    planted = simulate_seed_shared_dose(500, 10, x, **SEED_SHARED, curvature=0.3)
    assert (seed_blocked_dose_tests(planted, x)["curvature"]["p"] < 0.05).mean() > 0.9


def test_the_vectorized_core_is_what_the_public_function_computes():
    x = np.log10(LAMBDAS)
    one = simulate_seed_shared_dose(1, 10, x, **SEED_SHARED, random_state=21)[0]  # [seed, level]
    core = seed_blocked_dose_tests(one, x)
    row = dose_response(frame_from(one, LAMBDAS), AXIS, "macs").tests.iloc[0]
    for name in ("trend", "curvature"):
        for field in ("estimate", "se", "t", "p", "ci_low", "ci_high"):
            assert row[f"{name}_{field}"] == pytest.approx(float(core[name][field]), rel=1e-12)
        assert row[f"{name}_df"] == core[name]["df"]


def test_the_pooled_ols_comparison_is_statsmodels_ols_on_every_run():
    x = np.log10(LAMBDAS)
    one = simulate_seed_shared_dose(1, 7, x, slope=0.2, curvature=0.1, random_state=8)[0]
    pooled = pooled_ols_dose_pvalues(one, x)
    u = np.tile(x - x.mean(), one.shape[0])
    y = one.reshape(-1)
    linear = sm.OLS(y, sm.add_constant(u)).fit()
    quadratic = sm.OLS(y, np.column_stack([np.ones_like(u), u, u**2])).fit()
    assert float(pooled["trend"]) == pytest.approx(linear.pvalues[1], rel=1e-9)
    assert float(pooled["curvature"]) == pytest.approx(quadratic.pvalues[2], rel=1e-9)


def test_the_bootstrap_interval_of_the_minimum_covers_the_true_vertex_when_it_is_well_determined():
    lambdas = np.array([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    z = np.log10(lambdas)
    true_vertex = -3.3  # λ ≈ 5e-4, between two tested levels
    covered = []
    for repetition in range(30):
        rng = np.random.default_rng(100 + repetition)
        values = (
            rng.normal(0, 1.0, (12, 1))
            + rng.normal(0.5, 0.05, (12, 1)) * (z - true_vertex) ** 2
            + rng.normal(0, 0.1, (12, len(z)))
        )
        row = dose_response(frame_from(values, lambdas), AXIS, "macs", n_resamples=500).tests.iloc[0]
        low, high = math.log10(row["vertex_ci_low"]), math.log10(row["vertex_ci_high"])
        covered.append(low <= true_vertex <= high)
        assert row["is_u_shaped"]
        assert high - low < 0.1  # well determined: a tenth of a decade wide at most
        assert row["minimum_level"] in (1e-4, 1e-3)
        assert row["minimum_ci_low"] >= 1e-4 and row["minimum_ci_high"] <= 1e-3
    assert covered[0]
    assert np.mean(covered) >= 0.8


def test_quadratic_minimum_clips_the_vertex_and_takes_the_lower_end_of_a_concave_fit():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert quadratic_minimum((x - 1.3) ** 2, x) == pytest.approx(1.3)
    assert quadratic_minimum((x - 7.0) ** 2, x) == pytest.approx(3.0)  # vertex beyond the range
    assert quadratic_minimum(-((x - 1.0) ** 2), x) == pytest.approx(3.0)  # concave: the farther end is lower
    assert quadratic_minimum(2 * x, x) == pytest.approx(0.0)  # straight line


def test_the_bootstrap_is_reproducible_and_a_group_does_not_depend_on_the_others():
    values, *_ = known_quadratic()
    noisy = values + np.random.default_rng(9).normal(0, 0.3, values.shape)
    alone = dose_response(frame_from(noisy, LAMBDAS, **{"network.reg": "l1"}), AXIS, "macs", n_resamples=300)
    both = dose_response(
        pd.concat(
            [
                frame_from(noisy, LAMBDAS, **{"network.reg": "l1"}),
                frame_from(noisy[:, ::-1], LAMBDAS, **{"network.reg": "l2"}),
            ]
        ),
        AXIS,
        "macs",
        group_columns=["network.reg"],
        n_resamples=300,
    )
    assert both.tests["group"].tolist() == ["reg=l1", "reg=l2"]
    first = both.tests.iloc[0]
    for column in ("vertex_ci_low", "vertex_ci_high", "minimum_ci_low", "minimum_interior_fraction"):
        assert first[column] == alone.tests.iloc[0][column]
    assert both.levels.groupby("group").size().tolist() == [5, 5]


# --------------------------------------------------------------------------------------------------
# Missing, duplicated and degenerate data
# --------------------------------------------------------------------------------------------------


def test_a_seed_missing_at_one_level_is_left_out_of_the_fits_and_counted():
    values, *_ = known_quadratic(seeds=10)
    values = values + np.random.default_rng(6).normal(0, 0.2, values.shape)
    frame = frame_from(values, LAMBDAS)
    gap = frame[~((frame["seed"] == 3) & (frame[AXIS] == 1e-3))]
    result = dose_response(gap, AXIS, "macs", axis_label="λ")
    without_seed = dose_response(frame[frame["seed"] != 3], AXIS, "macs", axis_label="λ")
    row = result.tests.iloc[0]
    assert (row["seeds"], row["seeds_total"]) == (9, 10)
    for column in ("trend_estimate", "trend_p", "curvature_estimate", "curvature_p", "vertex_level"):
        assert row[column] == pytest.approx(without_seed.tests.iloc[0][column])
    assert "9 seeds of 10" in row["reading"]
    # The per-level table still describes every level with all its seeds.
    assert result.levels["seeds"].tolist() == [10, 10, 9, 10, 10]
    assert result.levels["difference_seeds"].tolist() == [10, 10, 9, 10, 10]
    assert result.levels.loc[0, "mean"] == pytest.approx(values[:, 0].mean())


def test_a_failed_metric_counts_as_missing():
    values, *_ = known_quadratic(seeds=6)
    frame = frame_from(values, LAMBDAS)
    frame.loc[(frame["seed"] == 0) & (frame[AXIS] == 1e-2), "macs"] = np.nan
    assert dose_response(frame, AXIS, "macs").tests.iloc[0]["seeds"] == 5


def test_a_seed_run_twice_at_one_level_is_an_error_naming_axis_level_and_seed():
    values, *_ = known_quadratic(seeds=4)
    frame = frame_from(values, LAMBDAS)
    repeated = pd.concat([frame, frame[(frame["seed"] == 2) & (frame[AXIS] == 1e-4)]])
    with pytest.raises(ValueError, match=r"network\.lambda_reg = 0\.0001, seed 2"):
        dose_response(repeated, AXIS, "macs")
    # The same seed at the same level in two different groups is fine: groups are separate analyses.
    two_groups = pd.concat([frame.assign(reg="l1"), frame.assign(reg="l2")])
    assert len(dose_response(two_groups, AXIS, "macs", group_columns=["reg"]).tests) == 2


def test_two_levels_give_a_trend_but_no_curvature_and_say_why():
    values = np.random.default_rng(0).normal(0, 1, (5, 2)) + np.array([0.0, 1.0])
    row = dose_response(frame_from(values, [8, 12], axis="width"), "width", "macs").tests.iloc[0]
    assert np.isfinite(row["trend_p"])
    assert math.isnan(row["curvature_p"]) and math.isnan(row["curvature_estimate"])
    assert row["curvature_reason"] == "needs ≥ 3 levels; 2 tested"
    assert not row["is_u_shaped"]


def test_identical_seeds_leave_nothing_to_test_against():
    z = np.log10(LAMBDAS)
    values = np.tile((z + 3) ** 2, (4, 1))
    row = dose_response(frame_from(values, LAMBDAS), AXIS, "macs").tests.iloc[0]
    assert row["curvature_estimate"] == pytest.approx(1.0)
    assert math.isnan(row["curvature_p"]) and "no seed-to-seed variation" in row["curvature_reason"]
    assert "not testable" in row["reading"]


def test_one_seed_or_one_level_is_not_testable():
    one_seed = dose_response(frame_from(np.ones((1, 5)), LAMBDAS), AXIS, "macs").tests.iloc[0]
    assert "needs ≥ 2 seeds" in one_seed["trend_reason"] and math.isnan(one_seed["trend_p"])
    one_level = dose_response(frame_from(np.ones((3, 1)), [1e-3]), AXIS, "macs").tests.iloc[0]
    assert one_level["trend_reason"] == "needs ≥ 2 levels; 1 tested"


def test_axis_values_as_stored_strings_parse_and_bad_input_is_named():
    values, *_ = known_quadratic(seeds=4)
    frame = frame_from(values, LAMBDAS)
    as_strings = frame.assign(**{AXIS: frame[AXIS].map(lambda value: f"{value:g}")})
    assert dose_response(as_strings, AXIS, "macs").tests.iloc[0]["curvature_estimate"] == pytest.approx(
        dose_response(frame, AXIS, "macs").tests.iloc[0]["curvature_estimate"]
    )
    with pytest.raises(ValueError, match="must be numeric"):
        dose_response(frame.assign(**{AXIS: "high"}), AXIS, "macs")
    with pytest.raises(ValueError, match="infinite"):
        dose_response(frame.assign(macs=np.inf), AXIS, "macs")
    with pytest.raises(ValueError, match="missing column"):
        dose_response(frame, AXIS, "interference")
    with pytest.raises(ValueError, match="log_scale=True needs every level"):
        dose_response(frame.assign(**{AXIS: frame[AXIS] - 1e-4}), AXIS, "macs", log_scale=True)


def test_log_scale_is_chosen_from_the_range_of_the_levels():
    values = np.random.default_rng(0).normal(0, 1, (3, 3))
    assert dose_response(frame_from(values, [1e-4, 1e-3, 1e-2]), AXIS, "macs").log_scale
    assert not dose_response(frame_from(values, [6, 9, 12]), AXIS, "macs").log_scale
    assert not dose_response(frame_from(values, [0.0, 1e-3, 1e-2]), AXIS, "macs").log_scale
    assert not dose_response(frame_from(values, [1e-4, 1e-3, 1e-2]), AXIS, "macs", log_scale=False).log_scale


def test_numeric_axes_keeps_columns_that_parse_as_numbers_and_vary():
    settings = pd.DataFrame(
        {
            "network.lambda_reg": ["1e-5", "1e-4", "1e-3", "1e-4"],
            "network.hidden_dim": [12, 12, 12, 12],
            "network.reg": ["l1", "l2", "l1", "l2"],
            "network.sigma": ["0.1", "0.2", None, "0.1"],
            "flag": [True, False, True, False],
        }
    )
    candidates = [*settings.columns, "absent"]
    assert numeric_axes(settings, candidates) == ["network.lambda_reg", "network.sigma"]
    assert numeric_axes(settings, candidates, minimum_levels=3) == ["network.lambda_reg"]


def test_format_level_writes_levels_as_a_reader_would():
    assert [format_level(value, True) for value in (1e-4, 3.16e-5, 0.01, 5e-4, 0.5)] == [
        "1e-4",
        "3.2e-5",
        "0.01",
        "5e-4",
        "0.5",
    ]
    assert format_level(12.0, False) == "12" and format_level(math.nan, True) == "n/a"


# --------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------


def _group_containers(ax):
    return [container for container in ax.containers if not container.get_label().startswith("_")]


def _minimum_containers(ax):
    return [
        container for container in ax.containers if container.get_label().startswith(MINIMUM_LABEL_PREFIX)
    ]


def test_the_figure_uses_a_log_axis_for_lambda_and_draws_one_line_per_group():
    values, *_ = known_quadratic()
    frame = pd.concat(
        [
            frame_from(values, LAMBDAS, **{"network.reg": "l1"}),
            frame_from(-values, LAMBDAS, **{"network.reg": "l2"}),
        ]
    )
    result = dose_response(frame, AXIS, "macs", group_columns=["network.reg"], axis_label="λ")
    figure = dose_response_figure(result)
    (ax,) = figure.axes
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel().startswith("λ") and ax.get_ylabel() == "macs"
    groups = _group_containers(ax)
    assert [container.get_label() for container in groups] == ["reg=l1", "reg=l2"]
    for container, (_, levels) in zip(groups, result.levels.groupby("group"), strict=True):
        x, y = container.lines[0].get_data()
        assert np.asarray(x) == pytest.approx(LAMBDAS)
        assert np.asarray(y) == pytest.approx(levels["mean"].to_numpy())
    # The marked minimum is the level the readings name (lowest mean), for the U-shaped and the concave group.
    minima = {container.get_label(): container for container in _minimum_containers(ax)}
    for position, group in enumerate(("reg=l1", "reg=l2")):
        x_lowest, _ = minima[f"{MINIMUM_LABEL_PREFIX} {group}"].lines[0].get_data()
        assert x_lowest[0] == result.tests.iloc[position]["minimum_level"]
    assert "minimum" in ax.get_legend().get_texts()[-1].get_text()


def test_the_figure_keeps_widths_on_a_linear_axis_and_makes_one_panel_per_metric():
    widths = np.array([6, 8, 9, 12])
    rng = np.random.default_rng(3)
    values = rng.normal(0, 1, (5, 1)) + 0.02 * (widths - 9) ** 2 + rng.normal(0, 0.01, (5, 4))
    frame = frame_from(values, widths, axis="network.hidden_dim").assign(interference=lambda f: 2 * f["macs"])
    results = [dose_response(frame, "network.hidden_dim", metric) for metric in ("macs", "interference")]
    single = dose_response_figure(results[0], metric="MACS")
    assert single.axes[0].get_xscale() == "linear" and single.axes[0].get_ylabel() == "MACS"
    assert len(_group_containers(single.axes[0])) == 1
    panels = dose_response_figures(results)
    assert [ax.get_ylabel() for ax in panels.axes] == ["macs", "interference"]
    assert all(ax.get_xscale() == "linear" for ax in panels.axes)
    with pytest.raises(ValueError, match="at least one"):
        dose_response_figures([])


def test_within_seed_intervals_follow_cousineau_morey():
    """The figure's error bars remove each seed's offset across levels: computed here by hand."""
    generator = np.random.default_rng(3)
    seeds, levels = 8, len(LAMBDAS)
    offsets = generator.normal(0, 5.0, size=(seeds, 1))  # large shared per-seed offsets
    values = offsets + np.linspace(0, 1, levels) + generator.normal(0, 0.1, size=(seeds, levels))
    result = dose_response(frame_from(values, LAMBDAS), AXIS, "macs")
    normalized = values - values.mean(axis=1, keepdims=True) + values.mean()
    half = (
        scipy.stats.t.ppf(0.975, seeds - 1)
        * normalized.std(axis=0, ddof=1)
        / np.sqrt(seeds)
        * np.sqrt(levels / (levels - 1))
    )
    table = result.levels
    assert (table["within_ci_high"] - table["mean"]).to_numpy() == pytest.approx(half)
    assert (table["mean"] - table["within_ci_low"]).to_numpy() == pytest.approx(half)
    # Far narrower than the levels' own intervals, which carry the shared offsets.
    assert (
        (table["within_ci_high"] - table["within_ci_low"]) < (table["ci_high"] - table["ci_low"]) / 5
    ).all()


def test_matched_level_differences_are_paired_t_tests_with_holm():
    """L2 against L1 at each λ equals scipy's paired t-test on the seeds both ran; Holm as statsmodels."""
    from statsmodels.stats.multitest import multipletests

    from pipeline.dose_response import matched_level_differences, matched_readings

    generator = np.random.default_rng(3)
    rows = []
    lambdas = (1e-5, 1e-4, 1e-3)
    for seed in range(7):
        shared = generator.normal(0, 2)  # shared by every configuration of this seed
        for reg in ("l1", "l2"):
            for lam in lambdas:
                effect = 1.5 if (reg == "l2" and lam == 1e-3) else 0.0
                rows.append(
                    {
                        "seed": seed,
                        "network.reg": reg,
                        "network.lambda_reg": str(lam),
                        "y": shared + effect + generator.normal(0, 0.2),
                    }
                )
    frame = pd.DataFrame(rows).iloc[1:]  # seed 0 misses (l1, 1e-5): it leaves that level's pairs only
    table = matched_level_differences(frame, "network.lambda_reg", "y", ["network.reg"])
    assert list(table["group"].unique()) == ["reg=l2"] and set(table["reference"]) == {"reg=l1"}
    for row in table.itertuples():
        at_level = frame[frame["network.lambda_reg"].astype(float) == row.level]
        wide = at_level.pivot(index="seed", columns="network.reg", values="y").dropna()
        test = scipy.stats.ttest_rel(wide["l2"], wide["l1"])
        assert row.seeds == len(wide)
        assert row.difference == pytest.approx((wide["l2"] - wide["l1"]).mean())
        assert row.p == pytest.approx(test.pvalue)
        interval = test.confidence_interval(0.95)
        assert (row.ci_low, row.ci_high) == pytest.approx((interval.low, interval.high))
    assert table["seeds"].tolist() == [6, 7, 7]
    assert table["p_holm"].to_numpy() == pytest.approx(multipletests(table["p"], method="holm")[1])
    (reading,) = matched_readings(table, "λ")
    assert "clear (Holm p < 0.05) at 1 of 3 levels: λ=1e-3" in reading


def test_a_level_undefined_for_most_seeds_is_left_out_of_the_tests_and_named():
    """Seeds whose metric is NaN at the top level (a collapsed network's SAE metrics) must not shrink the
    per-seed fits to the few seeds defined everywhere: that level leaves the tests, and the reading says so."""
    rows = []
    for seed in range(8):
        for position, level in enumerate((1e-5, 1e-4, 1e-3, 1e-2)):
            value = 1.0 + 0.5 * position + 0.01 * seed * position
            if level == 1e-2 and seed >= 2:
                value = float("nan")  # defined for 2 of 8 seeds only
            rows.append({"seed": seed, "lambda": level, "y": value})
    result = dose_response(pd.DataFrame(rows), "lambda", "y")
    (test,) = result.tests.to_dict("records")
    assert test["levels"] == 3 and test["seeds"] == 8 and test["levels_left_out"] == "0.01"
    # the slope per decade over the three kept levels, by hand: seed s rises 0.5 + 0.01 s per decade
    assert test["trend_estimate"] == pytest.approx(0.5 + 0.01 * np.mean(range(8)))
    assert "0.01 left out" in test["reading"]
    assert len(result.levels) == 4  # the level is still described
