"""Factor effects by level of another setting (the SAE × training study), checked against scipy.

The data are built by hand: a 2⁴ factorial at two levels of a moderator, 8 seeds, a known reg effect
(+2 at level "a", +0.5 at level "b"), a known act effect (−1 at both) and a seed effect shared by every
cell of a seed (which the seed-blocked analysis must remove, as the design's shared random numbers do).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from pipeline.config import FACTOR_LEVELS
from pipeline.moderation import complete_levels, factor_effects_by_level, moderation_readings

FACTORS = dict(FACTOR_LEVELS)


def hand_built(seeds: int = 8, reg_effect: dict | None = None) -> pd.DataFrame:
    reg_effect = reg_effect or {"a": 2.0, "b": 0.5}
    generator = np.random.default_rng(7)
    rows = []
    for seed in range(seeds):
        shared = generator.normal(0, 5)  # the same for every cell and level of this seed
        for level in ("a", "b"):
            for cell in itertools.product(*(levels for levels in FACTORS.values())):
                values = dict(zip(FACTORS, cell, strict=True))
                y = shared + reg_effect[level] * (values["reg"] == "l2") - 1.0 * (values["act"] == "gelu")
                rows.append(
                    {**values, "seed": seed, "sae.architecture": level, "y": y + generator.normal(0, 0.3)}
                )
    return pd.DataFrame(rows)


def per_seed_effect(frame: pd.DataFrame, level: str, factor: str) -> pd.Series:
    rows = frame[frame["sae.architecture"] == level]
    high = rows[rows[factor] == FACTORS[factor][1]].groupby("seed")["y"].mean()
    low = rows[rows[factor] == FACTORS[factor][0]].groupby("seed")["y"].mean()
    return high - low


def test_effects_and_differences_match_scipy_on_per_seed_contrasts():
    frame = hand_built()
    table = factor_effects_by_level(frame, "sae.architecture", ["y"], FACTORS, reference="a")
    for factor in FACTORS:
        for level in ("a", "b"):
            row = table[(table["effect"] == factor) & (table["level"] == level)].iloc[0]
            contrasts = per_seed_effect(frame, level, factor)
            test = scipy.stats.ttest_1samp(contrasts, 0.0)
            assert row["estimate"] == pytest.approx(contrasts.mean())
            assert row["p"] == pytest.approx(test.pvalue)
            interval = test.confidence_interval(0.95)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high))
            if level == "b":
                paired = scipy.stats.ttest_rel(
                    per_seed_effect(frame, "b", factor), per_seed_effect(frame, "a", factor)
                )
                assert row["difference"] == pytest.approx(
                    contrasts.mean() - per_seed_effect(frame, "a", factor).mean()
                )
                assert row["difference_p"] == pytest.approx(paired.pvalue)
    reg = table[(table["effect"] == "reg")].set_index("level")
    assert reg.loc["a", "estimate"] == pytest.approx(2.0, abs=0.3)
    assert reg.loc["b", "estimate"] == pytest.approx(0.5, abs=0.3)
    assert reg.loc["b", "difference_p_holm"] < 0.001  # the reg effect shrinks under "b"
    act = table[(table["effect"] == "act")].set_index("level")
    assert act.loc["b", "difference_p_holm"] > 0.05  # the act effect is the same under both
    holm = table["difference_p_holm"].dropna().to_numpy()
    raw = table["difference_p"].dropna().to_numpy()
    assert np.all(holm >= raw - 1e-15)


def test_readings_say_which_effect_persists_and_which_changes_size():
    table = factor_effects_by_level(hand_built(), "sae.architecture", ["y"], FACTORS, reference="a")
    (reading,) = moderation_readings(table)
    assert "l2 vs l1 +2" in reading and "its size differs clearly under b" in reading
    assert "gelu vs relu -0.98" in reading and "persists" in reading


def test_an_incomplete_level_is_left_out():
    frame = hand_built()
    frame = frame[~((frame["sae.architecture"] == "b") & (frame["reg"] == "l2") & (frame["act"] == "gelu"))]
    assert complete_levels(frame, "sae.architecture", FACTORS) == ["a"]
    with pytest.raises(ValueError, match="fewer than 2 levels"):
        factor_effects_by_level(frame, "sae.architecture", ["y"], FACTORS)


def test_false_positive_rate_of_the_difference_test_is_nominal():
    """No true difference between levels, seeds sharing a large random offset: the seed-blocked
    difference test must reject about 5 % of the time."""
    rejections, trials = 0, 300
    generator = np.random.default_rng(11)
    for _ in range(trials):
        rows = []
        for seed in range(6):
            shared = generator.normal(0, 3)
            for level in ("a", "b"):
                for cell in itertools.product(*(levels for levels in FACTORS.values())):
                    values = dict(zip(FACTORS, cell, strict=True))
                    y = shared + 1.0 * (values["reg"] == "l2") + generator.normal(0, 1)
                    rows.append({**values, "seed": seed, "sae.architecture": level, "y": y})
        table = factor_effects_by_level(pd.DataFrame(rows), "sae.architecture", ["y"], FACTORS, reference="a")
        row = table[(table["effect"] == "reg") & (table["level"] == "b")].iloc[0]
        rejections += row["difference_p"] < 0.05
    rate = rejections / trials
    # 300 trials at 5 %: the binomial 99.9 % band is about 1.3 %–10 %.
    assert 0.013 < rate < 0.10, rate
