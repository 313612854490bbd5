"""Co-occurring features in the incidental model: the sampler, the loss and its gradient, the measurements.

Independent checks: the sampler against the closed forms of Bernoulli(p)^n conditioned on a non-empty input
(marginals, pair co-occurrence, the law of the number of active features), the normalised loss against an
exact enumeration of all 2^n inputs, the gradient against autograd, the counts on hand-built weights.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from pipeline.config_tools import ConfigError
from pipeline.experiments.incidental import cooccurrence_points, run_point
from pipeline.incidental import (
    IncidentalConfig,
    batch_loss_gradient,
    batch_losses,
    cooccurring_inputs,
    features_per_neuron,
    features_represented,
    instance_losses,
    loss_gradient,
    occurrence_scale,
    polysemantic_neurons,
)
from pipeline.incidental_analysis import crossover_table, half_count_p


def sample(p: float, n: int, samples: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    first = torch.rand((samples, 1), generator=generator, dtype=torch.float64)
    rest = torch.rand((samples, n), generator=generator)
    return cooccurring_inputs(first, rest, p)


@pytest.mark.parametrize("p", [0.02, 0.1, 0.5])
def test_sampler_matches_bernoulli_given_a_non_empty_input(p):
    n, samples = 12, 200_000
    inputs = sample(p, n, samples).double()
    q = 1 - (1 - p) ** n
    assert set(inputs.unique().tolist()) <= {0.0, 1.0}
    assert (inputs.sum(dim=1) >= 1).all()
    # Marginal of each feature: P(x_i = 1 | x ≠ 0) = p/q, the same for every i (binomial 4.5 σ band).
    marginal = inputs.mean(dim=0).numpy()
    sigma = math.sqrt((p / q) * (1 - p / q) / samples)
    assert np.abs(marginal - p / q).max() < 4.5 * sigma
    # Pairs: P(x_i = x_k = 1 | x ≠ 0) = p²/q (independence within the input).
    pair = (inputs[:, 0] * inputs[:, n - 1]).mean().item()
    assert pair == pytest.approx(p * p / q, abs=4.5 * math.sqrt(p * p / q / samples))
    # Number of active features: Binomial(n, p) truncated to ≥ 1 (chi-square goodness of fit).
    active = inputs.sum(dim=1).long().numpy()
    expected = scipy.stats.binom.pmf(np.arange(1, n + 1), n, p) / q
    observed = np.bincount(active, minlength=n + 1)[1:]
    keep = expected * samples >= 5
    observed_kept = np.append(observed[keep], observed[~keep].sum())
    expected_kept = np.append(expected[keep], expected[~keep].sum()) * samples
    nonzero = expected_kept > 0
    assert scipy.stats.chisquare(observed_kept[nonzero], expected_kept[nonzero]).pvalue > 1e-3


def test_p_zero_is_one_uniform_feature_per_input():
    inputs = sample(0.0, 8, 80_000)
    assert (inputs.sum(dim=1) == 1).all()
    counts = inputs.sum(dim=0).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_p_zero_is_the_limit_of_small_p_on_the_same_uniforms():
    # The truncated geometric's inverse CDF tends to ⌊u·n⌋ as p → 0: the same inputs, feature for feature.
    assert torch.equal(sample(1e-9, 16, 5000, seed=3), sample(0.0, 16, 5000, seed=3))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.4])
def test_normalised_loss_equals_the_exact_expectation_over_all_inputs(p):
    """(q/p)·E[loss | x ≠ 0] = E_x[loss(x)]/p over all 2^n inputs (p = 0: the basis loss)."""
    n, m, l1 = 4, 6, 0.05
    weights = torch.randn(1, n, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.6
    if p == 0:
        exact = instance_losses(weights, l1).item()
    else:
        exact = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=n):
            x = torch.tensor([[bits]], dtype=torch.float64)
            probability = math.prod(p if bit else 1 - p for bit in bits)
            exact += probability * batch_losses(weights, x, l1).item()
        exact /= p
    inputs = sample(p, n, 400_000, seed=2).double().unsqueeze(0)
    estimate = batch_losses(weights, inputs, l1, occurrence_scale(n, p)).item()
    assert estimate == pytest.approx(exact, rel=0.01)


def test_occurrence_scale_limits():
    assert occurrence_scale(32, 0.0) == 32
    assert occurrence_scale(32, 1e-9) == pytest.approx(32, rel=1e-6)
    assert occurrence_scale(5, 0.5) == pytest.approx((1 - 0.5**5) / 0.5)


def test_batch_gradient_matches_autograd_and_reduces_to_the_basis_gradient():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 7, 9, generator=generator, dtype=torch.float64) / 3
    inputs = (torch.rand(3, 11, 7, generator=generator, dtype=torch.float64) < 0.3).double()
    leaf = weights.clone().requires_grad_(True)
    batch_losses(leaf, inputs, 0.01, 2.5).sum().backward()
    assert torch.allclose(batch_loss_gradient(weights, inputs, 0.01, 2.5), leaf.grad, atol=1e-12)
    identity = torch.eye(7, dtype=torch.float64).expand(3, 7, 7)
    # With X = I and scale = n: mean over n inputs times n = the basis loss's sum.
    assert torch.allclose(batch_loss_gradient(weights, identity, 0.01, 7.0), loss_gradient(weights, 0.01))


def test_counts_on_hand_built_weights():
    weights = torch.zeros(1, 4, 5)
    weights[0, 0, 0], weights[0, 1, 0] = 1.0, -0.9  # neuron 0: two features in [0.8, 1.2]: polysemantic
    weights[0, 2, 1], weights[0, 3, 1] = 1.0, 0.5  # neuron 1: one feature in the window
    weights[0, 2, 2] = 0.3  # a small weight
    assert polysemantic_neurons(weights).item() == 1
    # ‖W_i‖² ≥ 0.5: features 0 (1), 1 (0.81), 2 (1.09); feature 3 has 0.25.
    assert features_represented(weights).item() == 3
    # Participation ratios of used neurons (Σ W² ≥ 0.25): neuron 0 (1 + .81)²/(1 + .6561) ≈ 1.978,
    # neuron 1 (1.25)²/(1 + .0625) ≈ 1.471; neuron 2 (0.09) is unused.
    ratio_0 = 1.81**2 / (1 + 0.9**4)
    ratio_1 = 1.25**2 / (1 + 0.5**4)
    assert features_per_neuron(weights).item() == pytest.approx((ratio_0 + ratio_1) / 2, rel=1e-6)


def test_config_refuses_p_with_basis_data_and_noise_with_bernoulli():
    with pytest.raises(ConfigError, match="^p applies to data 'bernoulli'"):
        IncidentalConfig(p=0.1)
    with pytest.raises(ConfigError, match="^noise must be 'none' with data 'bernoulli'"):
        IncidentalConfig(data="bernoulli", p=0.1, noise="bipolar", sigma=0.1)
    with pytest.raises(ConfigError, match=r"^p must lie in \[0, 1\]"):
        IncidentalConfig(data="bernoulli", p=1.5)


def test_new_fields_at_their_defaults_keep_the_config_hash():
    from pipeline.config_tools import _hashed_view

    assert set(_hashed_view(IncidentalConfig())) == set(_hashed_view(IncidentalConfig())) - {
        "data",
        "p",
        "batch_size",
    }
    assert "p" in _hashed_view(IncidentalConfig(data="bernoulli", p=0.1))


def test_instances_are_independent_of_batching_and_paired_across_p():
    config = cooccurrence_points(n=8, ms=(8,), p_values=(0.1,), instances=3, steps=40, curve_every=20)[0]
    together = run_point(config)
    alone = run_point(config.replace(instances=1, first_instance=2))
    assert torch.allclose(together.final_weights[2], alone.final_weights[0])
    other_p = run_point(config.replace(p=0.3))
    assert torch.equal(together.initial_weights, other_p.initial_weights)


def test_half_count_p_interpolates_in_log_p_and_flags_censoring():
    assert half_count_p([0, 0.01, 0.1], [8, 6, 2]) == pytest.approx(
        math.exp(math.log(0.01) + 0.5 * math.log(10))
    )
    assert half_count_p([0, 0.01, 0.1], [8, 3, 0]) == -math.inf
    assert half_count_p([0, 0.01, 0.1], [8, 7, 6]) == math.inf
    assert math.isnan(half_count_p([0.01, 0.1], [8, 7]))


def test_crossover_resamples_instances_jointly_across_p():
    import pandas as pd

    rows = []
    for instance in range(6):
        for p, count in ((0.0, 8 + instance % 2), (0.01, 4.5), (0.1, 0)):
            rows.append({"n": 16, "m": 16, "p": p, "instance": instance, "polysemantic_neurons": count})
    table = crossover_table(pd.DataFrame(rows), n_resamples=200)
    (row,) = table.itertuples()
    assert row.count_at_p0 == pytest.approx(8.5)
    assert row.p_half_ci_low <= row.p_half <= row.p_half_ci_high
    assert row.forced_polysemantic == 0 and row.predicted_incidental == pytest.approx(4)
