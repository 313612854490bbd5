"""Every metric has a documented range, computed values respect it, and summaries clip their CIs to it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import metrics, stats
from pipeline.evaluation import METRIC_NAMES
from pipeline.metrics import METRIC_RANGES, metric_bounds


def test_every_metric_has_exactly_one_range():
    # Same names in the same order: a metric added to the evaluation without a range fails here.
    assert tuple(METRIC_RANGES) == METRIC_NAMES
    for name, (low, high) in METRIC_RANGES.items():
        assert low < high, name
        assert metric_bounds(name) == (low, high)


def test_fractions_are_bounded_by_one():
    for name in METRIC_NAMES:
        if name.endswith("_fraction") or name in {"dead_latents", "l0_sparsity", "macs", "feature_mcc"}:
            assert METRIC_RANGES[name] == (0.0, 1.0), name


def test_an_unknown_metric_has_no_range():
    with pytest.raises(KeyError, match="no documented range"):
        metric_bounds("not_a_metric")


@pytest.mark.parametrize("seed", range(4))
def test_computed_metrics_lie_in_their_ranges(seed):
    generator = torch.Generator().manual_seed(seed)
    samples, features, hidden_size, latents = 64, 8, 12, 16
    features_values = torch.relu(torch.randn(samples, features, generator=generator))
    hidden = torch.relu(features_values @ torch.randn(features, hidden_size, generator=generator))
    standardized = (hidden - hidden.mean(0)) / hidden.std(0).clamp_min(1e-6)
    decoder = torch.randn(latents, hidden_size, generator=generator)
    codes = torch.nn.functional.leaky_relu(standardized @ decoder.T - 0.5, 0.01)
    values = metrics.taming_metrics(
        decoder=decoder,
        latents=codes,
        reconstruction=codes @ decoder,
        standardized_hidden=standardized,
        hidden=hidden,
        features=features_values,
        groups=[[0, 1, 2], [3, 4], [5, 6, 7]],
        importances=0.9 ** torch.arange(features, dtype=torch.float64),
        network_weights=[torch.randn(hidden_size, features, generator=generator)],
        null_draws=20,
    )
    values.update(train_mse=0.3, val_mse=0.4)
    for name, value in values.items():
        low, high = metric_bounds(name)
        assert math.isnan(value) or low <= value <= high, (name, value)


def test_describe_clips_the_interval_to_the_bounds():
    # A fraction of dead latents that is mostly 0: the t-interval reaches below 0 unless clipped.
    values = [0.0, 0.0, 0.0, 0.0625]
    open_interval = stats.describe(values)
    assert open_interval["ci_low"] < 0
    clipped = stats.describe(values, bounds=metric_bounds("dead_latents"))
    assert clipped["ci_low"] == 0.0
    assert clipped["ci_high"] == pytest.approx(open_interval["ci_high"])
    for key in ("n", "mean", "std", "sem"):
        assert clipped[key] == open_interval[key]


def test_describe_clips_above_and_leaves_open_sides_alone():
    near_one = [1.0, 1.0, 0.9]
    clipped = stats.describe(near_one, bounds=(0.0, 1.0))
    assert clipped["ci_high"] == 1.0 and clipped["ci_low"] < 1.0
    unbounded = stats.describe([0.0, 0.0, 1e-3], bounds=(0.0, math.inf))
    assert unbounded["ci_low"] == 0.0 and unbounded["ci_high"] > 1e-3
    assert stats.describe(near_one, bounds=(-math.inf, math.inf)) == stats.describe(near_one)


def test_describe_keeps_nan_intervals_and_rejects_bad_bounds():
    one = stats.describe([0.5], bounds=(0.0, 1.0))
    assert np.isnan(one["ci_low"]) and np.isnan(one["ci_high"])
    with pytest.raises(ValueError, match="low <= high"):
        stats.describe([0.1, 0.2], bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="low <= high"):
        stats.describe([0.1, 0.2], bounds=(math.nan, 1.0))


def test_cell_means_pass_the_bounds_on():
    import pandas as pd

    frame = pd.DataFrame({"init": ["random"] * 4, "seed": range(4), "dead_latents": [0.0, 0.0, 0.0, 0.0625]})
    table = stats.factorial_cell_means(
        frame, {"init": ("random", "orthogonal")}, "dead_latents", bounds=metric_bounds("dead_latents")
    )
    assert table.loc[0, "ci_low"] == 0.0
