"""The paired comparison of seed variances (pipeline/variance.py) against direct computations, and its
error rates by simulation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from pipeline.variance import PAIRED_VARIANCE_COLUMNS, paired_variance_comparison, pitman_morgan

SIMULATIONS = 4000


def paired_normal(rng: np.random.Generator, pairs: int, correlation: float, ratio: float = 1.0):
    """`pairs` draws of (x, y), bivariate normal with corr(x, y) = correlation and var x / var y = ratio;
    the means differ (they must not matter)."""
    common = rng.standard_normal(pairs)
    own = rng.standard_normal((2, pairs))
    mix = math.sqrt(1 - correlation)
    x = math.sqrt(correlation) * common + mix * own[0]
    y = math.sqrt(correlation) * common + mix * own[1]
    return 3.0 + math.sqrt(ratio) * x, -1.0 + y


def test_pitman_morgan_against_a_direct_computation():
    rng = np.random.default_rng(1)
    x, y = paired_normal(rng, 12, 0.7, ratio=2.0)
    result = pitman_morgan(x, y)
    n = len(x)
    sums, differences = x + y, x - y
    r = np.corrcoef(sums, differences)[0, 1]
    t = r * math.sqrt(n - 2) / math.sqrt(1 - r * r)
    assert result["pairs"] == n and result["df"] == n - 2
    assert result["variance_ratio"] == pytest.approx(np.var(x, ddof=1) / np.var(y, ddof=1), rel=1e-12)
    assert result["sum_difference_correlation"] == pytest.approx(r, rel=1e-12)
    assert result["pair_correlation"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert result["t"] == pytest.approx(t, rel=1e-12)
    assert result["p"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), n - 2), rel=1e-10)
    # The same test from scipy's own test of a correlation (exact beta distribution).
    assert result["p"] == pytest.approx(scipy.stats.pearsonr(sums, differences).pvalue, rel=1e-8)


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_the_ratio_interval_inverts_the_test(confidence):
    # At each end φ of the interval, testing var x = φ·var y (equal variances of x and √φ·y) gives p = 1 −
    # confidence exactly; inside it p is larger.
    rng = np.random.default_rng(2)
    x, y = paired_normal(rng, 10, 0.5, ratio=0.5)
    result = pitman_morgan(x, y, confidence)
    assert result["ratio_ci_low"] < result["variance_ratio"] < result["ratio_ci_high"]
    for end in (result["ratio_ci_low"], result["ratio_ci_high"]):
        scaled = math.sqrt(end) * y
        p = scipy.stats.pearsonr(x + scaled, x - scaled).pvalue
        assert p == pytest.approx(1 - confidence, rel=1e-6)
    middle = math.sqrt(result["ratio_ci_low"] * result["ratio_ci_high"])
    assert scipy.stats.pearsonr(x + math.sqrt(middle) * y, x - math.sqrt(middle) * y).pvalue > 1 - confidence


def test_false_positive_rate_with_equal_variances_is_nominal_and_levene_is_not():
    # Ten seeds, strongly correlated levels (the same network under two SAE settings), equal variances.
    # Pitman–Morgan is exact for bivariate normal pairs: its rejection rate must sit in a binomial band
    # around 5 %. Levene's test (center='median') treats the two columns as independent samples; the
    # pairing makes the two spreads move together, so it rejects far less often than it claims (and
    # loses power to match).
    rng = np.random.default_rng(3)
    rejections = levene_rejections = 0
    for _ in range(SIMULATIONS):
        x, y = paired_normal(rng, 10, 0.8)
        rejections += pitman_morgan(x, y)["p"] < 0.05
        levene_rejections += scipy.stats.levene(x, y, center="median").pvalue < 0.05
    low, high = scipy.stats.binom.interval(0.999, SIMULATIONS, 0.05)
    assert low <= rejections <= high, rejections / SIMULATIONS
    assert levene_rejections < low, levene_rejections / SIMULATIONS


def test_ratio_interval_covers_the_true_ratio_at_its_level():
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(SIMULATIONS):
        x, y = paired_normal(rng, 10, 0.6, ratio=2.0)
        result = pitman_morgan(x, y)
        covered += result["ratio_ci_low"] <= 2.0 <= result["ratio_ci_high"]
    low, high = scipy.stats.binom.interval(0.999, SIMULATIONS, 0.95)
    assert low <= covered <= high, covered / SIMULATIONS


def test_degenerate_samples():
    constant = np.ones(6)
    varying = np.arange(6.0)
    one_constant = pitman_morgan(constant, varying)
    assert one_constant["variance_ratio"] == 0 and one_constant["p"] == 0 and one_constant["t"] == -math.inf
    both_constant = pitman_morgan(constant, 2 * constant)
    assert math.isnan(both_constant["t"]) and math.isnan(both_constant["p"])
    with pytest.raises(ValueError, match="at least 3 pairs"):
        pitman_morgan([1.0, 2.0], [1.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        pitman_morgan([1.0, 2.0, math.nan], [1.0, 3.0, 2.0])


def clipping_table(rng: np.random.Generator) -> pd.DataFrame:
    """A per-seed table as the store gives it: two configurations × sae.grad_clip {0, 1} × 10 seeds, the
    clipped level of configuration "b" with a third of the spread."""
    rows = []
    for config, scale in (("a", 1.0), ("b", 1 / 3)):
        x, y = paired_normal(rng, 10, 0.8)
        for seed in range(10):
            rows.append(
                {"config": config, "seed": seed, "sae.grad_clip": 0.0, "sae_fvu": 0.2 + 0.05 * y[seed]}
            )
            rows.append(
                {
                    "config": config,
                    "seed": seed,
                    "sae.grad_clip": 1.0,
                    "sae_fvu": 0.2 + 0.05 * scale * x[seed],
                }
            )
    return pd.DataFrame(rows)


def test_paired_variance_comparison_per_configuration():
    table = clipping_table(np.random.default_rng(5))
    # A failed seed (NaN) leaves its pair out of that configuration only.
    table.loc[
        (table["config"] == "a") & (table["seed"] == 4) & (table["sae.grad_clip"] == 1.0), "sae_fvu"
    ] = np.nan
    result = paired_variance_comparison(table, "sae.grad_clip", "sae_fvu", group_columns=["config"])
    assert list(result.columns) == ["config", *PAIRED_VARIANCE_COLUMNS]
    assert list(result["config"]) == ["a", "b"] and list(result["pairs"]) == [9, 10]
    for _, row in result.iterrows():
        rows = table[table["config"] == row["config"]].pivot(
            index="seed", columns="sae.grad_clip", values="sae_fvu"
        )
        rows = rows.dropna()
        expected = pitman_morgan(rows[1.0].to_numpy(), rows[0.0].to_numpy())
        assert row["reference_level"] == 0.0 and row["level"] == 1.0
        assert row["variance"] == pytest.approx(expected["variance_x"])
        assert row["reference_variance"] == pytest.approx(expected["variance_y"])
        for name in ("variance_ratio", "ratio_ci_low", "ratio_ci_high", "t", "p"):
            assert row[name] == pytest.approx(expected[name]), name
        assert row["mean"] == pytest.approx(rows[1.0].mean())
    b = result.set_index("config").loc["b"]
    assert b["variance_ratio"] < 0.5 and b["ratio_ci_high"] < 1 and b["p"] < 0.05


def test_paired_variance_comparison_refuses_bad_tables():
    table = clipping_table(np.random.default_rng(6))
    with pytest.raises(ValueError, match="exactly two levels"):
        paired_variance_comparison(
            pd.concat([table, table.assign(**{"sae.grad_clip": 2.0})]), "sae.grad_clip", "sae_fvu"
        )
    with pytest.raises(ValueError, match="appears twice"):
        paired_variance_comparison(
            pd.concat([table, table.head(1)]), "sae.grad_clip", "sae_fvu", group_columns=["config"]
        )
    with pytest.raises(ValueError, match="missing column"):
        paired_variance_comparison(table, "network.grad_clip", "sae_fvu")
    few = table[table["seed"] < 2]
    result = paired_variance_comparison(few, "sae.grad_clip", "sae_fvu", group_columns=["config"])
    assert list(result["pairs"]) == [2, 2] and result["p"].isna().all()
