"""The splitting remedy: exactness of the split, outcome bookkeeping on hand-built weights, the experiment.

Independent checks: W' W'ᵀ and the outputs compared with the unsplit model in float32 and float64, the L1
term's closed-form increase, zero padding staying exactly zero, symmetric copies staying equal without noise,
outcomes of hand-built weights, the cluster bootstrap against a hand computation.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.experiments.incidental_splitting import SplittingConfig, run_split_point, splitting_points
from pipeline.incidental import IncidentalConfig, continue_training, instance_losses, reconstruction
from pipeline.incidental_analysis import splitting_summary
from pipeline.splitting import (
    OTHER,
    RECOLLIDED,
    RESOLVED,
    copy_noise,
    mixed_neurons,
    outcome,
    outcome_counts,
    separated,
    split_neurons,
    unsplit,
)


def polysemantic_weights(dtype=torch.float32) -> torch.Tensor:
    """Two instances, n = 4, m = 3: instance 0 has neuron 1 carrying features 0 (+1) and 2 (−1); instance 1
    has neurons 0 and 2 polysemantic; plus small random weights everywhere."""
    generator = torch.Generator().manual_seed(5)
    weights = torch.randn(2, 4, 3, generator=generator, dtype=dtype) * 0.05
    weights[0, 0, 1], weights[0, 2, 1] = 1.0, -1.0
    weights[1, 1, 0], weights[1, 3, 0] = 0.95, -1.05
    weights[1, 0, 2], weights[1, 2, 2] = -0.9, 1.1
    return weights


def selected_of(weights: torch.Tensor) -> torch.Tensor:
    magnitude = weights.abs()
    return ((magnitude >= 0.8) & (magnitude <= 1.2)).sum(dim=-2) >= 2


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2e-7), (torch.float64, 1e-15)])
def test_split_without_noise_leaves_w_wt_and_the_output_unchanged(dtype, tolerance):
    weights = polysemantic_weights(dtype)
    split = split_neurons(weights, selected_of(weights), 0.0)
    assert split.weights.shape == (2, 4, 3 + 2)  # instance 1 splits two neurons: one padding column for 0
    gram = weights @ weights.transpose(-1, -2)
    grown = split.weights @ split.weights.transpose(-1, -2)
    assert (grown - gram).abs().max().item() <= tolerance * 4
    assert (reconstruction(split.weights) - reconstruction(weights)).abs().max().item() <= tolerance * 4
    # The L1 term grows by (√2 − 1)·λ·Σ|w| over the split columns: closed form.
    l1 = 0.1
    split_mass = sum(weights[i, :, j].abs().sum() for i, j in ((0, 1), (1, 0), (1, 2)))
    increase = (instance_losses(split.weights, l1) - instance_losses(weights, l1)).sum()
    assert increase.item() == pytest.approx((math.sqrt(2) - 1) * l1 * split_mass.item(), rel=1e-5)
    # Bookkeeping: copies in column j and m + r, padding −1 and an all-zero column.
    assert split.first.tolist() == [[1, -1], [0, 2]] and split.second.tolist() == [[3, -1], [3, 4]]
    assert torch.equal(split.weights[0, :, 4], torch.zeros(4, dtype=dtype))
    assert split.features == [[[0, 2]], [[1, 3], [0, 2]]]


def test_noise_perturbs_only_the_copies_by_epsilon():
    weights = polysemantic_weights()
    noise = copy_noise(0, [0, 1], 4, 3)
    split = split_neurons(weights, selected_of(weights), 0.1, noise)
    exact = split_neurons(weights, selected_of(weights), 0.0)
    difference = split.weights - exact.weights
    assert torch.allclose(difference[0, :, 1], 0.1 * noise[0, 0, :, 1])
    assert torch.allclose(difference[0, :, 3], 0.1 * noise[0, 1, :, 1])
    assert torch.equal(difference[0, :, [0, 2, 4]], torch.zeros(4, 3))


def test_zero_columns_stay_zero_and_identical_copies_stay_identical():
    weights = polysemantic_weights()
    split = split_neurons(weights, selected_of(weights), 0.0)
    config = IncidentalConfig(n=4, m=3, l1=1e-2, lr=1e-2, instances=2, steps=1)
    final = continue_training(split.weights, config, 300, every=300, measure=lambda w, s: None)
    assert torch.equal(final[0, :, 4], torch.zeros(4))  # padding
    assert torch.equal(final[0, :, 1], final[0, :, 3])  # ε = 0: the symmetry is never broken
    assert torch.equal(final[1, :, 0], final[1, :, 3])


def test_outcomes_on_hand_built_weights():
    weights = torch.zeros(4, 6)
    weights[0, 0], weights[2, 4] = 1.0, -1.0  # copies 0 and 4 each carry one former feature: resolved
    assert outcome(weights, 0, 4, [0, 2]) == RESOLVED
    weights[2, 0] = -1.0  # copy 0 now carries both: recollided
    assert outcome(weights, 0, 4, [0, 2]) == RECOLLIDED
    both_halves = torch.zeros(4, 6)
    both_halves[[0, 2], 1] = torch.tensor([0.7071, -0.7071])
    both_halves[[0, 2], 5] = torch.tensor([0.7071, -0.7071])
    assert outcome(both_halves, 1, 5, [0, 2]) == OTHER  # nothing at unit strength on either copy
    assert mixed_neurons(both_halves.unsqueeze(0)).item() == 2  # the lenient count sees both copies
    stranger = torch.zeros(4, 6)
    stranger[0, 1], stranger[3, 5] = 1.0, 1.0  # copy 5 carries feature 3, which the neuron never had
    assert outcome(stranger, 1, 5, [0, 2]) == OTHER
    # Baseline bookkeeping (no second copy): resolved when one former feature is left.
    single = torch.zeros(4, 6)
    single[0, 1] = 1.0
    assert outcome(single, 1, -1, [0, 2]) == RESOLVED
    # Separated anywhere: feature 2 alone on neuron 3, feature 0 alone on neuron 1.
    single[2, 3] = 1.0
    assert separated(single, [0, 2]) and not separated(weights, [0, 2])


def test_outcome_counts_per_instance():
    weights = polysemantic_weights()
    split = unsplit(weights, selected_of(weights))
    counts = outcome_counts(weights, split)
    assert counts["split"].tolist() == [1, 2] and counts[RECOLLIDED].tolist() == [1, 2]


def test_experiment_splits_resolves_some_and_baseline_none():
    base = IncidentalConfig(n=12, m=24, l1=1e-2, lr=1e-2, instances=6, steps=1500, curve_every=500)
    arms = splitting_points(base, epsilons=(0.0, 0.03), extra_steps=1500, measure_every=500)
    cache: dict = {}
    results = {arm.label(): run_split_point(arm, base_cache=cache) for arm in arms}
    assert len(cache) == 1  # the base trained once
    baseline, exact, noisy = results.values()
    assert baseline.metrics["split_neurons"] == exact.metrics["split_neurons"] > 0
    assert baseline.metrics["resolved_fraction"] == 0 and baseline.metrics["output_change_at_split"] == 0
    assert exact.metrics["output_change_at_split"] < 1e-5  # the split alone does not move the output
    assert exact.metrics["resolved_fraction"] == 0 and exact.metrics["other_fraction"] == 1
    assert noisy.metrics["resolved_fraction"] > 0
    assert sorted(noisy.checkpoints["step"].unique()) == [0, 500, 1000, 1500]
    # Pooled fraction = Σ resolved / Σ split over instances.
    table = noisy.per_instance
    assert noisy.metrics["resolved_fraction"] == pytest.approx(table["resolved"].sum() / table["split"].sum())
    with pytest.raises(ValueError, match="epsilon must be 0 for the baseline"):
        SplittingConfig(base, split=False, epsilon=0.1)


def test_cluster_bootstrap_pools_whole_instances():
    per_instance = pd.DataFrame(
        {
            "instance": [0, 1, 2, 3],
            "polysemantic_before": [2, 2, 1, 3],
            "split": [2, 2, 1, 3],
            "resolved": [1, 2, 0, 1],
            "recollided": [1, 0, 1, 2],
            "other": [0, 0, 0, 0],
            "separated": [1, 2, 0, 1],
            "polysemantic_after": [1, 0, 1, 2],
            "mixed_after": [1, 0, 1, 2],
            "loss_before": [0.3] * 4,
            "loss_at_split": [0.31] * 4,
            "loss_after": [0.3] * 4,
            "squared_error_after": [0.0] * 4,
        }
    )
    checkpoints = per_instance.assign(
        step=10, polysemantic_neurons=per_instance["polysemantic_after"], loss=0.3
    )
    summary = splitting_summary({"split ε=0.1": per_instance}, {"split ε=0.1": checkpoints}, n_resamples=2000)
    (row,) = summary.arms.itertuples()
    assert row.resolved_fraction == pytest.approx(4 / 8)
    # The CI lies within the range of ratios any resample of whole instances can give.
    ratios = per_instance["resolved"] / per_instance["split"]
    assert ratios.min() <= row.resolved_ci_low <= 0.5 <= row.resolved_ci_high <= ratios.max()
    assert np.isclose(summary.curves["resolved_fraction"].iloc[0], 0.5)
