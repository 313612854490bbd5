"""Tests of pipeline.stats against independent computations: hand arithmetic, textbook formulas, and scipy /
statsmodels called directly in the test."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

from pipeline import stats

FACTORS = {
    "init": ("random", "orthogonal"),
    "noise": ("bipolar", "positive_kurtosis"),
    "reg": ("l1", "l2"),
    "act": ("relu", "gelu"),
}
EFFECTS_2X4 = [
    "init",
    "noise",
    "reg",
    "act",
    "init:noise",
    "init:reg",
    "init:act",
    "noise:reg",
    "noise:act",
    "reg:act",
    "init:noise:reg",
    "init:noise:act",
    "init:reg:act",
    "noise:reg:act",
    "init:noise:reg:act",
]


# --------------------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------------------


def test_describe_matches_hand_computation():
    values = [2, 4, 4, 4, 5, 5, 7, 9]  # mean 5, Σ(x − x̄)² = 32
    summary = stats.describe(values)
    std = math.sqrt(32 / 7)
    sem = std / math.sqrt(8)
    t_975_7 = 2.364624251592785  # Student t 97.5 % quantile, 7 df (tables: 2.365)
    assert summary["n"] == 8
    assert summary["mean"] == pytest.approx(5.0)
    assert summary["std"] == pytest.approx(std)
    assert summary["sem"] == pytest.approx(sem)
    assert summary["ci_low"] == pytest.approx(5 - t_975_7 * sem)
    assert summary["ci_high"] == pytest.approx(5 + t_975_7 * sem)
    low, high = scipy.stats.t.interval(0.95, df=7, loc=5, scale=sem)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((low, high))


def test_describe_drops_nan_and_handles_thin_samples():
    assert stats.describe([1.0, np.nan, 3.0])["n"] == 2
    assert stats.describe([1.0, np.nan, 3.0])["mean"] == pytest.approx(2.0)
    one = stats.describe([4.0])
    assert one["n"] == 1 and one["mean"] == 4.0
    assert all(math.isnan(one[key]) for key in ("std", "sem", "ci_low", "ci_high"))
    empty = stats.describe([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


# --------------------------------------------------------------------------------------------------
# effect sizes
# --------------------------------------------------------------------------------------------------


def test_cohen_d_hand_example():
    a, b = [1, 2, 3, 4, 5], [3, 4, 5, 6, 7]  # means 3 and 5, both variances 2.5
    assert stats.cohen_d(a, b) == pytest.approx(-2 / math.sqrt(2.5))
    assert stats.cohen_d(b, a) == pytest.approx(2 / math.sqrt(2.5))


def test_cohen_d_unequal_sizes_uses_pooled_sd():
    a, b = [2, 4, 6], [1, 3]  # means 4 and 2; sums of squares 8 and 2; pooled df 3
    assert stats.cohen_d(a, b) == pytest.approx(2 / math.sqrt(10 / 3))


def test_hedges_g_applies_j_factor():
    a, b = [1, 2, 3, 4, 5], [3, 4, 5, 6, 7]
    j = 1 - 3 / (4 * 10 - 9)  # = 28/31
    assert j == pytest.approx(28 / 31)
    assert stats.hedges_correction(8) == pytest.approx(j)
    assert stats.hedges_g(a, b) == pytest.approx(j * -2 / math.sqrt(2.5))


def test_paired_effect_size_is_dz_with_n_minus_one_correction():
    a = np.array([5.0, 7.0, 6.0, 9.0, 8.0])
    b = np.array([4.0, 5.0, 6.0, 6.0, 5.0])
    differences = [1.0, 2.0, 0.0, 3.0, 3.0]  # mean 1.8, Σ(d − d̄)² = 6.8
    dz = 1.8 / math.sqrt(6.8 / 4)
    assert np.allclose(a - b, differences)
    assert stats.cohen_d(a, b, paired=True) == pytest.approx(dz)
    j = 1 - 3 / (4 * (5 - 1) - 1)  # = 0.8
    assert stats.hedges_g(a, b, paired=True) == pytest.approx(0.8 * dz)
    assert j == pytest.approx(0.8)


def test_effect_sizes_undefined_for_zero_spread_or_no_df():
    assert math.isnan(stats.cohen_d([1.0, 1.0], [2.0, 2.0]))
    assert math.isnan(stats.cohen_d([1.0], [2.0]))
    assert math.isnan(stats.hedges_g([1.0], [2.0]))
    assert math.isnan(stats.hedges_correction(0))


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


def test_compare_welch_matches_scipy_and_hand_formula():
    a = np.array([12.1, 11.4, 13.0, 12.7, 11.9, 12.3])
    b = np.array([10.2, 13.5, 9.1, 12.8, 11.0, 14.2, 10.5, 9.9])
    result = stats.compare(a, b, n_resamples=199)

    reference = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["p"] == pytest.approx(reference.pvalue)

    v_a, v_b = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t_hand = (a.mean() - b.mean()) / math.sqrt(v_a + v_b)
    df_hand = (v_a + v_b) ** 2 / (v_a**2 / (a.size - 1) + v_b**2 / (b.size - 1))
    assert result["t"] == pytest.approx(t_hand)
    assert result["df"] == pytest.approx(df_hand)
    assert result["p"] == pytest.approx(2 * scipy.stats.t.sf(abs(t_hand), df_hand))

    assert (result["n_a"], result["n_b"]) == (6, 8)
    assert result["mean_a"] == pytest.approx(a.mean())
    assert result["diff"] == pytest.approx(a.mean() - b.mean())
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / 12)
    assert result["d"] == pytest.approx((a.mean() - b.mean()) / pooled)
    assert result["g"] == pytest.approx((1 - 3 / (4 * 14 - 9)) * (a.mean() - b.mean()) / pooled)


def test_compare_paired_matches_ttest_rel():
    a = np.array([0.31, 0.28, 0.35, 0.30, 0.27, 0.33, 0.29])
    b = np.array([0.29, 0.27, 0.31, 0.30, 0.24, 0.30, 0.28])
    result = stats.compare(a, b, paired=True, n_resamples=199)
    reference = scipy.stats.ttest_rel(a, b)
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["p"] == pytest.approx(reference.pvalue)
    assert result["df"] == 6
    d = a - b
    assert result["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(7)))
    assert result["d"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert result["n_a"] == result["n_b"] == 7


def test_compare_paired_needs_aligned_samples():
    with pytest.raises(ValueError, match="equal-length"):
        stats.compare([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)


def test_bootstrap_ci_matches_scipy_and_contains_true_difference():
    rng = np.random.default_rng(42)
    a = rng.normal(1.0, 1.0, size=40)
    b = rng.normal(0.0, 1.0, size=40)
    result = stats.compare(a, b, n_resamples=2000, random_state=7)

    def difference(x, y, axis):
        return x.mean(axis=axis) - y.mean(axis=axis)

    reference = scipy.stats.bootstrap(
        (a, b), difference, n_resamples=2000, method="BCa", rng=np.random.default_rng(7)
    ).confidence_interval
    assert result["ci_low"] == pytest.approx(reference.low)
    assert result["ci_high"] == pytest.approx(reference.high)
    assert result["ci_low"] < 1.0 < result["ci_high"]
    assert result["ci_low"] < result["diff"] < result["ci_high"]


def test_paired_bootstrap_resamples_differences():
    rng = np.random.default_rng(3)
    base = rng.normal(0.0, 1.0, size=12)
    a = base + 0.5 + rng.normal(0.0, 0.1, size=12)
    result = stats.compare(a, base, paired=True, n_resamples=1000, random_state=1)
    reference = scipy.stats.bootstrap(
        (a - base,), np.mean, n_resamples=1000, method="BCa", rng=np.random.default_rng(1)
    ).confidence_interval
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((reference.low, reference.high))
    # Pairing removes the shared seed effect: the paired CI is far narrower than the unpaired one.
    unpaired = stats.compare(a, base, n_resamples=1000, random_state=1)
    assert result["ci_high"] - result["ci_low"] < 0.5 * (unpaired["ci_high"] - unpaired["ci_low"])


def test_degenerate_data_falls_back_to_percentile_and_gives_nan_tests():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = stats.compare([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], n_resamples=99)
    assert result["diff"] == -1.0
    assert (result["ci_low"], result["ci_high"]) == (-1.0, -1.0)
    for key in ("t", "df", "p", "d", "g"):
        assert math.isnan(result[key]), key


def test_one_constant_sample_still_tested_without_warning():
    a, b = [0.0, 0.0, 0.0, 0.0], [0.1, 0.3, 0.2, 0.4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = stats.compare(a, b, n_resamples=99)
    # Welch with s_a = 0: t = diff / sqrt(s_b²/n_b), df = n_b − 1.
    b_array = np.array(b)
    assert result["t"] == pytest.approx(-0.25 / math.sqrt(b_array.var(ddof=1) / 4))
    assert result["df"] == pytest.approx(3.0)


@pytest.mark.parametrize("a, b", [([1.0], [2.0, 3.0]), ([1.0, 2.0], [3.0]), ([], [1.0, 2.0])])
def test_thin_samples_give_nan_statistics(a, b):
    result = stats.compare(a, b)
    assert (result["n_a"], result["n_b"]) == (len(a), len(b))
    for key in ("ci_low", "ci_high", "t", "df", "p", "d", "g"):
        assert math.isnan(result[key]), key
    if a:
        assert result["mean_a"] == pytest.approx(np.mean(a))


def test_thin_paired_sample_gives_nan_statistics():
    result = stats.compare([1.0, np.nan], [2.0, 3.0], paired=True)
    assert result["n_a"] == result["n_b"] == 1
    assert result["diff"] == pytest.approx(-1.0)
    assert math.isnan(result["p"]) and math.isnan(result["ci_low"])


def test_compare_drops_nan_values():
    with_nan = stats.compare([1.0, 2.0, np.nan, 4.0], [2.0, 3.0, 5.0], n_resamples=99)
    without = scipy.stats.ttest_ind([1.0, 2.0, 4.0], [2.0, 3.0, 5.0], equal_var=False)
    assert with_nan["n_a"] == 3
    assert with_nan["p"] == pytest.approx(without.pvalue)
    paired = stats.compare([1.0, 2.0, np.nan, 4.0], [2.0, 3.5, 5.0, 4.5], paired=True, n_resamples=99)
    assert paired["n_a"] == 3
    assert paired["p"] == pytest.approx(scipy.stats.ttest_rel([1.0, 2.0, 4.0], [2.0, 3.5, 4.5]).pvalue)


# --------------------------------------------------------------------------------------------------
# adjust_pvalues
# --------------------------------------------------------------------------------------------------


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 → running max.
    assert stats.adjust_pvalues(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted p·4/rank = 0.02, 0.02, 0.04, 0.04 → running min from the top.
    assert stats.adjust_pvalues(p, "fdr_bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_adjust_pvalues_ignores_nan_in_family():
    p = [0.01, np.nan, 0.04, 0.03, 0.005]
    holm = stats.adjust_pvalues(p, "holm")
    assert math.isnan(holm[1])
    assert np.delete(holm, 1) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    bh = stats.adjust_pvalues(p, "fdr_bh")
    assert np.delete(bh, 1) == pytest.approx(multipletests([0.01, 0.04, 0.03, 0.005], method="fdr_bh")[1])
    assert np.isnan(stats.adjust_pvalues([np.nan, np.nan], "holm")).all()
    assert stats.adjust_pvalues([], "holm").size == 0


def test_adjust_pvalues_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        stats.adjust_pvalues([0.1], "bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.adjust_pvalues([1.5], "holm")


# --------------------------------------------------------------------------------------------------
# compare_to_baseline
# --------------------------------------------------------------------------------------------------


def _per_seed_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shifts = {"baseline": 0.0, "ortho": -0.03, "gelu": 0.01}
    rows = []
    for config, shift in shifts.items():
        for run_seed in range(6):
            rows.append(
                {
                    "config": config,
                    "seed": run_seed,
                    "macs": 0.30 + shift + rng.normal(0, 0.02),
                    "interference": 8.7 + 40 * shift + rng.normal(0, 1.0),
                }
            )
    return pd.DataFrame(rows)


def test_compare_to_baseline_columns_rows_and_family():
    table = _per_seed_table()
    result = stats.compare_to_baseline(
        table,
        config_column="config",
        metrics=["macs", "interference"],
        baseline="baseline",
        paired=False,
        n_resamples=99,
    )
    assert list(result.columns) == [
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
    assert (result["test"] == "Welch t").all() and (result["effect_size"] == "Cohen's d").all()
    assert list(zip(result["metric"], result["config_a"], strict=True)) == [
        ("macs", "ortho"),
        ("macs", "gelu"),
        ("interference", "ortho"),
        ("interference", "gelu"),
    ]
    assert (result["config_b"] == "baseline").all()

    raw = []
    for metric, config in zip(result["metric"], result["config_a"], strict=True):
        a = table.loc[table["config"] == config, metric]
        b = table.loc[table["config"] == "baseline", metric]
        raw.append(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert result["p"].to_numpy() == pytest.approx(raw)
    # The family is all four rows, not each metric separately.
    assert result["p_holm"].to_numpy() == pytest.approx(multipletests(raw, method="holm")[1])
    assert result["p_bh"].to_numpy() == pytest.approx(multipletests(raw, method="fdr_bh")[1])


def test_compare_to_baseline_paired_aligns_on_seed():
    table = _per_seed_table(1)
    # ortho lost seed 0 and ran an extra seed 9 the baseline never ran; rows shuffled.
    table = table[~((table["config"] == "ortho") & (table["seed"] == 0))]
    extra = pd.DataFrame([{"config": "ortho", "seed": 9, "macs": 0.1, "interference": 1.0}])
    table = pd.concat([table, extra]).sample(frac=1.0, random_state=0)
    result = stats.compare_to_baseline(
        table, config_column="config", metrics=["macs"], baseline="baseline", paired=True, n_resamples=99
    )
    row = result[result["config_a"] == "ortho"].iloc[0]
    assert row["n_a"] == row["n_b"] == 5
    by_seed = table.pivot(index="seed", columns="config", values="macs").loc[[1, 2, 3, 4, 5]]
    reference = scipy.stats.ttest_rel(by_seed["ortho"], by_seed["baseline"])
    assert row["t"] == pytest.approx(reference.statistic)
    assert row["p"] == pytest.approx(reference.pvalue)
    assert row["df"] == 4


def test_compare_to_baseline_pairs_on_shared_seeds_by_default_and_welch_otherwise():
    table = _per_seed_table(3)
    # gelu ran seeds 10..15, which the baseline never ran: nothing to pair on.
    table.loc[table["config"] == "gelu", "seed"] += 10
    result = stats.compare_to_baseline(
        table, config_column="config", metrics=["macs"], baseline="baseline", n_resamples=99
    ).set_index("config_a")
    assert result.loc["ortho", "test"] == "paired t" and result.loc["ortho", "effect_size"] == "d_z"
    assert result.loc["gelu", "test"] == "Welch t" and result.loc["gelu", "effect_size"] == "Cohen's d"
    by_seed = table[table["config"] != "gelu"].pivot(index="seed", columns="config", values="macs")
    differences = by_seed["ortho"] - by_seed["baseline"]
    assert result.loc["ortho", "p"] == pytest.approx(
        scipy.stats.ttest_rel(by_seed["ortho"], by_seed["baseline"]).pvalue
    )
    assert result.loc["ortho", "d"] == pytest.approx(differences.mean() / differences.std(ddof=1))
    gelu = table.loc[table["config"] == "gelu", "macs"]
    baseline = table.loc[table["config"] == "baseline", "macs"]
    assert result.loc["gelu", "p"] == pytest.approx(
        scipy.stats.ttest_ind(gelu, baseline, equal_var=False).pvalue
    )


def test_compare_to_baseline_drops_nan_and_keeps_thin_rows_out_of_family():
    table = _per_seed_table(2)
    table.loc[(table["config"] == "ortho") & (table["seed"] < 5), "macs"] = np.nan  # one seed left
    table.loc[(table["config"] == "gelu") & (table["seed"] == 0), "interference"] = np.nan
    result = stats.compare_to_baseline(
        table,
        config_column="config",
        metrics=["macs", "interference"],
        baseline="baseline",
        paired=False,
        n_resamples=99,
    ).set_index(["metric", "config_a"])
    thin = result.loc[("macs", "ortho")]
    assert thin["n_a"] == 1 and math.isnan(thin["p"]) and math.isnan(thin["p_holm"])
    assert result.loc[("interference", "gelu"), "n_a"] == 5
    finite = result["p"].dropna()
    assert result.loc[finite.index, "p_holm"].to_numpy() == pytest.approx(
        multipletests(finite.to_numpy(), method="holm")[1]
    )


def test_compare_to_baseline_missing_baseline_names_it():
    with pytest.raises(ValueError, match=r"'nope'.*\['baseline', 'ortho', 'gelu'\]"):
        stats.compare_to_baseline(
            _per_seed_table(), config_column="config", metrics=["macs"], baseline="nope"
        )


def test_compare_to_baseline_paired_rejects_duplicate_seeds():
    table = _per_seed_table()
    table = pd.concat([table, table[table["config"] == "ortho"].head(1)])
    with pytest.raises(ValueError, match="more than once"):
        stats.compare_to_baseline(
            table, config_column="config", metrics=["macs"], baseline="baseline", paired=True, n_resamples=99
        )


# --------------------------------------------------------------------------------------------------
# factorial designs
# --------------------------------------------------------------------------------------------------


def _factorial_table(replicates: int = 5, noise: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """2^4 design, y = 3 + 1.0·A − 0.5·B + 0.25·A·B + noise with ±1 codes A = init, B = noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for cell in itertools.product(*FACTORS.values()):
        codes = [
            1.0 if level == levels[1] else -1.0 for level, levels in zip(cell, FACTORS.values(), strict=True)
        ]
        a, b = codes[0], codes[1]
        for replicate in range(replicates):
            y = 3 + 1.0 * a - 0.5 * b + 0.25 * a * b + noise * rng.normal()
            rows.append({**dict(zip(FACTORS, cell, strict=True)), "seed": replicate, "y": y})
    return pd.DataFrame(rows)


def _coded(table: pd.DataFrame) -> pd.DataFrame:
    coded = pd.DataFrame(
        {name: np.where(table[name] == high, 1.0, -1.0) for name, (_, high) in FACTORS.items()}
    )
    coded["y"] = table["y"].to_numpy()
    return coded


def _per_seed_contrasts(table: pd.DataFrame, effect: str) -> pd.Series:
    """Per seed: mean of y where the effect's ±1 contrast is +1 minus where it is −1, computed directly."""
    coded = _coded(table)
    coded["seed"] = table["seed"].to_numpy()
    coded["contrast"] = np.prod([coded[name] for name in effect.split(":")], axis=0)
    return coded.groupby("seed").apply(
        lambda rows: rows["y"][rows["contrast"] > 0].mean() - rows["y"][rows["contrast"] < 0].mean()
    )


def test_factorial_effects_recover_known_coefficients():
    table = _factorial_table()
    result = stats.factorial_effects(table, factors=FACTORS, metrics=["y"])
    assert list(result.columns) == stats.FACTORIAL_COLUMNS
    assert list(result["effect"]) == EFFECTS_2X4
    estimates = result.set_index("effect")["estimate"]
    # ±1 coding: mean(+) − mean(−) = 2β.
    assert estimates["init"] == pytest.approx(2.0, abs=0.1)
    assert estimates["noise"] == pytest.approx(-1.0, abs=0.1)
    assert estimates["init:noise"] == pytest.approx(0.5, abs=0.1)
    for effect in EFFECTS_2X4:
        if effect not in ("init", "noise", "init:noise"):
            assert abs(estimates[effect]) < 0.1, effect
    contrast = result.set_index("effect")["contrast"]
    assert contrast["init"] == "orthogonal vs random"
    assert contrast["act"] == "gelu vs relu"
    assert contrast["init:noise"] == "init × noise interaction"


def test_factorial_effects_are_one_sample_t_tests_of_per_seed_contrasts():
    table = _factorial_table(replicates=6, noise=0.3, seed=4)
    result = stats.factorial_effects(table, factors=FACTORS, metrics=["y"]).set_index("effect")
    for effect in EFFECTS_2X4:
        contrasts = _per_seed_contrasts(table, effect)
        reference = scipy.stats.ttest_1samp(contrasts, 0.0)
        interval = reference.confidence_interval(0.95)
        assert result.loc[effect, "estimate"] == pytest.approx(contrasts.mean()), effect
        assert result.loc[effect, "t"] == pytest.approx(reference.statistic), effect
        assert result.loc[effect, "p"] == pytest.approx(reference.pvalue), effect
        assert result.loc[effect, "ci_low"] == pytest.approx(interval.low), effect
        assert result.loc[effect, "ci_high"] == pytest.approx(interval.high), effect
        assert result.loc[effect, "se"] == pytest.approx(contrasts.std(ddof=1) / math.sqrt(6)), effect
    assert (result["df"] == 5).all() and (result["seeds"] == 6).all()
    assert result["p_holm"].to_numpy() == pytest.approx(multipletests(result["p"], method="holm")[1])


def test_factorial_pooled_ols_column_matches_statsmodels():
    table = _factorial_table(seed=4)
    result = stats.factorial_effects(table, factors=FACTORS, metrics=["y"]).set_index("effect")
    coded = _coded(table)
    model = smf.ols("y ~ init * noise * reg * act", data=coded).fit()
    anova = anova_lm(model, typ=2)
    for effect in EFFECTS_2X4:
        term = next(t for t in anova.index if sorted(t.split(":")) == sorted(effect.split(":")))
        assert result.loc[effect, "p_pooled_ols"] == pytest.approx(anova.loc[term, "PR(>F)"])
        assert result.loc[effect, "estimate"] == pytest.approx(2 * model.params[term])
    pooled = result["p_pooled_ols"].to_numpy()
    assert result["p_pooled_ols_holm"].to_numpy() == pytest.approx(multipletests(pooled, method="holm")[1])
    vectorized = stats.pooled_ols_effect_pvalues(
        table.assign(cell=_cell_index(table)).pivot(index="seed", columns="cell", values="y").to_numpy()
    )
    assert vectorized == pytest.approx(pooled)


def _cell_index(table: pd.DataFrame) -> np.ndarray:
    """Standard-order cell index (first factor slowest, low before high), computed here by hand."""
    index = np.zeros(len(table), dtype=int)
    for name, (_, high) in FACTORS.items():
        index = index * 2 + (table[name] == high).to_numpy().astype(int)
    return index


def test_factorial_seed_missing_a_cell_is_left_out_of_that_metric():
    table = _factorial_table(replicates=5, noise=0.3, seed=2)
    dropped = table.drop(index=table.index[(table["seed"] == 0)][:1])
    result = stats.factorial_effects(dropped, factors=FACTORS, metrics=["y"]).set_index("effect")
    complete = table[table["seed"] != 0]
    reference = scipy.stats.ttest_1samp(_per_seed_contrasts(complete, "init"), 0.0)
    assert result.loc["init", "seeds"] == 4
    assert result.loc["init", "p"] == pytest.approx(reference.pvalue)


def test_factorial_duplicate_run_for_a_cell_and_seed_raises():
    table = _factorial_table(replicates=3)
    with pytest.raises(ValueError, match="more than one run for one cell and seed"):
        stats.factorial_effects(pd.concat([table, table.head(1)]), factors=FACTORS, metrics=["y"])


def test_factorial_missing_cell_raises_with_its_name():
    table = _factorial_table(replicates=2)
    missing = (
        (table["init"] == "orthogonal")
        & (table["noise"] == "bipolar")
        & (table["reg"] == "l1")
        & (table["act"] == "relu")
    )
    with pytest.raises(ValueError, match="init=orthogonal, noise=bipolar, reg=l1, act=relu"):
        stats.factorial_effects(table[~missing], factors=FACTORS, metrics=["y"])


def test_factorial_nan_metric_can_empty_a_cell():
    table = _factorial_table(replicates=1)
    table.loc[0, "y"] = np.nan
    with pytest.raises(ValueError, match="'y'.*1 of 16 cells"):
        stats.factorial_effects(table, factors=FACTORS, metrics=["y"])


def test_factorial_unknown_level_raises():
    table = _factorial_table(replicates=1)
    table.loc[0, "act"] = "tanh"
    with pytest.raises(ValueError, match="tanh"):
        stats.factorial_effects(table, factors=FACTORS, metrics=["y"])


def test_factorial_exact_fit_reports_estimates_and_nan_tests():
    table = _factorial_table(noise=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = stats.factorial_effects(table, factors=FACTORS, metrics=["y"]).set_index("effect")
    assert result.loc["init", "estimate"] == pytest.approx(2.0)
    assert result.loc["noise", "estimate"] == pytest.approx(-1.0)
    assert result.loc["init:noise", "estimate"] == pytest.approx(0.5)
    assert result.loc["reg:act", "estimate"] == pytest.approx(0.0, abs=1e-12)
    assert result[["t", "p", "p_holm", "ci_low", "p_pooled_ols"]].isna().all().all()


def test_factorial_one_seed_has_no_error_estimate():
    result = stats.factorial_effects(_factorial_table(replicates=1), factors=FACTORS, metrics=["y"])
    assert (result["seeds"] == 1).all()
    assert result[["t", "p", "df", "p_pooled_ols"]].isna().all().all()
    assert result["estimate"].notna().all()


def test_factorial_two_factor_design_by_hand():
    # 2^2, two seeds. Seed 0 cells (lo,lo)=1, (lo,hi)=3, (hi,lo)=2, (hi,hi)=6;
    # seed 1 cells 2, 3, 5, 7. Per-seed contrasts of a: (2+6)/2 − (1+3)/2 = 2 and (5+7)/2 − (2+3)/2 = 3.5.
    table = pd.DataFrame(
        {
            "a": ["lo", "lo", "hi", "hi"] * 2,
            "b": ["lo", "hi", "lo", "hi"] * 2,
            "seed": [0, 0, 0, 0, 1, 1, 1, 1],
            "y": [1.0, 3.0, 2.0, 6.0, 2.0, 3.0, 5.0, 7.0],
        }
    )
    factors = {"a": ("lo", "hi"), "b": ("lo", "hi")}
    result = stats.factorial_effects(table, factors=factors, metrics=["y"]).set_index("effect")
    assert list(result.index) == ["a", "b", "a:b"]
    assert result.loc["a", "estimate"] == pytest.approx((2 + 3.5) / 2)
    # SD of {2, 3.5} = 1.5/√2, se = SD/√2 = 0.75, t = 2.75/0.75 on 1 df.
    assert result.loc["a", "se"] == pytest.approx(0.75)
    assert result.loc["a", "t"] == pytest.approx(2.75 / 0.75)
    assert result.loc["a", "p"] == pytest.approx(2 * scipy.stats.t.sf(2.75 / 0.75, 1))
    # Interaction: seed 0 (1+6)/2 − (3+2)/2 = 1, seed 1 (2+7)/2 − (3+5)/2 = 0.5.
    assert result.loc["a:b", "estimate"] == pytest.approx(0.75)
    assert result.loc["a", "df"] == 1


def test_seed_blocked_effects_vectorized_matches_the_table_function():
    values = stats.simulate_seed_shared_factorial(3, 7, random_state=11)
    batched = stats.seed_blocked_effects(values)
    for index in range(3):
        rows = [
            {**dict(zip(FACTORS, cell, strict=True)), "seed": seed, "y": values[index, seed, position]}
            for seed in range(7)
            for position, cell in enumerate(itertools.product(*FACTORS.values()))
        ]
        table = stats.factorial_effects(pd.DataFrame(rows), factors=FACTORS, metrics=["y"], pooled_ols=False)
        assert table["p"].to_numpy() == pytest.approx(batched["p"][index])
        assert table["estimate"].to_numpy() == pytest.approx(batched["estimate"][index])


# --------------------------------------------------------------------------------------------------
# Error rates on data shaped like the study's design (seed-shared random numbers)
# --------------------------------------------------------------------------------------------------

SIMULATIONS = 2000


@pytest.mark.parametrize("seeds", [5, 10])
def test_seed_blocked_test_keeps_its_false_positive_rate_where_pooled_ols_does_not(seeds):
    values = stats.simulate_seed_shared_factorial(SIMULATIONS, seeds, random_state=seeds)
    blocked = (stats.seed_blocked_effects(values)["p"] < 0.05).mean(axis=0)
    pooled = (stats.pooled_ols_effect_pvalues(values) < 0.05).mean(axis=0)
    # Every one of the 15 effects: 2000 nulls put a correct 5 % test within about ±1.5 points.
    assert blocked.min() > 0.02 and blocked.max() < 0.09, blocked
    # The pooled OLS, blind to the shared init and noise components, rejects the true null of init and
    # noise far too often, and is far too conservative for the effects where the seed component cancels.
    assert pooled[0] > 0.15 and pooled[1] > 0.10, pooled
    assert pooled[2:].max() < 0.02, pooled


def test_seed_blocked_power_on_a_planted_effect_matches_the_noncentral_t():
    seeds, effect = 10, 2.0
    values = stats.simulate_seed_shared_factorial(SIMULATIONS, seeds, effects={0: effect}, random_state=3)
    power = (stats.seed_blocked_effects(values)["p"][:, 0] < 0.05).mean()
    # With the simulation's defaults the per-seed init contrast has variance 2·1·(1 − (−0.5)) from the
    # init-level component plus 2·1/8 from the cell residuals (the seed and noise components cancel): 3.25.
    noncentrality = effect / math.sqrt(3.25 / seeds)
    critical = scipy.stats.t.ppf(0.975, seeds - 1)
    expected = scipy.stats.nct.sf(critical, seeds - 1, noncentrality) + scipy.stats.nct.cdf(
        -critical, seeds - 1, noncentrality
    )
    assert power == pytest.approx(expected, abs=0.035)
    assert expected > 0.8


def test_factorial_cell_means_by_hand():
    table = pd.DataFrame(
        {
            "a": ["lo", "lo", "lo", "hi", "hi", "hi"],
            "b": ["lo", "lo", "hi", "lo", "hi", "hi"],
            "y": [1.0, 3.0, 5.0, 2.0, np.nan, 8.0],
        }
    )
    cells = stats.factorial_cell_means(table, {"a": ("lo", "hi"), "b": ("lo", "hi")}, "y")
    assert list(cells[["a", "b"]].itertuples(index=False, name=None)) == [
        ("lo", "lo"),
        ("lo", "hi"),
        ("hi", "lo"),
        ("hi", "hi"),
    ]
    assert list(cells["n"]) == [2, 1, 1, 1]
    assert list(cells["mean"]) == pytest.approx([2.0, 5.0, 2.0, 8.0])
    assert cells.loc[0, "sem"] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert math.isnan(cells.loc[1, "sem"])
    marginal = stats.factorial_cell_means(table, {"a": ("lo", "hi")}, "y")
    assert list(marginal["mean"]) == pytest.approx([3.0, 5.0])
    assert list(marginal["n"]) == [3, 2]
