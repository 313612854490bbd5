"""Tests of pipeline.metrics against hand-built cases, closed forms and independent numpy/scipy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from pipeline import metrics

GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7]]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uncorrelated_features(samples: int, count: int, seed: int = 0) -> torch.Tensor:
    """Columns with zero mean, unit norm and exactly zero sample correlation with each other."""
    gaussian = torch.randn(samples, count, generator=generator(seed), dtype=torch.float64)
    orthonormal, _ = torch.linalg.qr(gaussian - gaussian.mean(dim=0))
    return orthonormal


def random_unit_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    gaussian = torch.randn(rows, columns, generator=generator(seed), dtype=torch.float64)
    return gaussian / gaussian.norm(dim=1, keepdim=True)


# --- decoder overlap ----------------------------------------------------------------------------------


def test_unit_directions_normalises_rows_and_keeps_zero_rows():
    decoder = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=torch.float32)
    unit = metrics.unit_directions(decoder)
    assert unit.dtype == torch.float64
    assert torch.allclose(unit, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64))


def test_cosine_matrix_matches_numpy():
    decoder = torch.randn(5, 7, generator=generator(1))
    rows = decoder.double().numpy()
    expected = (rows @ rows.T) / np.outer(np.linalg.norm(rows, axis=1), np.linalg.norm(rows, axis=1))
    np.testing.assert_allclose(metrics.cosine_matrix(decoder).numpy(), expected, atol=1e-12)


def test_macs_is_zero_for_orthogonal_rows():
    decoder = torch.eye(6)[:4] * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert metrics.macs(decoder) == pytest.approx(0.0, abs=1e-12)


def test_macs_is_one_when_all_rows_are_parallel():
    row = torch.tensor([0.3, -1.2, 2.0])
    decoder = torch.stack([row, 2 * row, -row, row])
    assert metrics.macs(decoder) == pytest.approx(1.0, abs=1e-12)


def test_macs_on_three_hand_built_vectors():
    # |cos| pairs: (e1, e2) = 0, (e1, (1, -1)) = (e2, (1, -1)) = 1/sqrt(2); mean over 3 pairs.
    decoder = torch.tensor([[1.0, 0.0], [0.0, 5.0], [3.0, -3.0]])
    assert metrics.macs(decoder) == pytest.approx(2 / math.sqrt(2) / 3, abs=1e-12)


def numpy_unit_rows(decoder: torch.Tensor) -> np.ndarray:
    """Decoder rows scaled to unit length, in numpy (independent of `metrics.unit_directions`)."""
    rows = decoder.double().numpy()
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize(("latents", "hidden", "seed"), [(9, 4, 2), (16, 12, 3), (5, 7, 4)])
def test_macs_published_form_matches_an_independent_numpy_implementation(latents, hidden, seed):
    decoder = torch.randn(latents, hidden, generator=generator(seed))
    unit = numpy_unit_rows(decoder)
    absolute = np.abs(unit @ unit.T)
    np.fill_diagonal(absolute, 0.0)
    # Published (seed 002): the mean over all N² entries, zeroed diagonal included; ours: over the N(N−1)
    # off-diagonal entries (docs/science.md §1.4).
    published = absolute.sum() / latents**2
    ours = absolute.sum() / (latents * (latents - 1))
    assert metrics.macs_published_form(decoder) == pytest.approx(published, abs=1e-12)
    assert metrics.macs(decoder) == pytest.approx(ours, abs=1e-12)


@pytest.mark.parametrize(("latents", "features", "seed"), [(16, 8, 20), (21, 8, 21), (5, 8, 22)])
def test_interference_seed_matches_an_independent_numpy_implementation(latents, features, seed):
    decoder = torch.randn(latents, 12, generator=generator(seed))
    importances = torch.rand(features, generator=generator(seed + 100), dtype=torch.float64) + 0.1
    unit = numpy_unit_rows(decoder)
    weights = importances.numpy()
    # The published form (docs/science.md §1.4): Σ_{k<l} cos²(d_k, d_l)·I[k mod F]·I[l mod F], written as the
    # plain double loop; 21 latents over 8 features exercise a partial wraparound, 5 latents none.
    expected = sum(
        float(unit[k] @ unit[other]) ** 2 * weights[k % features] * weights[other % features]
        for k in range(latents)
        for other in range(k + 1, latents)
    )
    assert metrics.interference_seed(decoder, importances) == pytest.approx(expected, rel=1e-12)


def test_macs_rejects_a_single_latent():
    with pytest.raises(ValueError):
        metrics.macs(torch.ones(1, 3))


# --- nulls and calibration ---------------------------------------------------------------------------


def expected_absolute_cosine(dimension: int) -> float:
    """E|cos| of two uniform random unit vectors in R^d = Γ(d/2) / (√π Γ((d+1)/2))."""
    return math.exp(math.lgamma(dimension / 2) - math.lgamma((dimension + 1) / 2)) / math.sqrt(math.pi)


def test_closed_form_reference_value():
    assert expected_absolute_cosine(12) == pytest.approx(0.2352, abs=1e-4)


def test_random_direction_null_mean_matches_closed_form():
    mu0, sigma0 = metrics.random_direction_null(32, 12, draws=400, seed=3)
    assert mu0 == pytest.approx(expected_absolute_cosine(12), abs=3e-3)
    # Pairwise |cos| values are pairwise independent (given one vector the other's cosine has the same law),
    # so Var(macs) = Var|cos| / #pairs with Var|cos| = E cos² − (E|cos|)² = 1/d − (E|cos|)².
    pairs = 32 * 31 / 2
    expected_sigma = math.sqrt((1 / 12 - expected_absolute_cosine(12) ** 2) / pairs)
    assert sigma0 == pytest.approx(expected_sigma, rel=0.1)


def test_random_direction_null_is_deterministic_and_seed_dependent():
    first = metrics.random_direction_null(16, 12, 50, 7)
    metrics.random_direction_null.cache_clear()
    assert metrics.random_direction_null(16, 12, 50, 7) == first
    assert metrics.random_direction_null(16, 12, 50, 8) != first


def test_published_permutation_null_has_no_spread():
    decoder = torch.randn(16, 12, generator=generator(4))
    mu, sigma = metrics.published_permutation_null(decoder, draws=100)
    _, random_sigma = metrics.random_direction_null(16, 12)
    assert sigma < 1e-6
    assert mu == pytest.approx(metrics.macs(decoder), abs=1e-12)
    assert random_sigma > 0.01


def test_calibrated_macs_is_uniform_for_decoders_drawn_like_the_null():
    # Under the null, Φ(z) is (approximately) uniform on [0, 1], so its mean over many decoders is ≈ 0.5.
    values = np.array([metrics.calibrated_macs(random_unit_rows(16, 12, seed=1000 + i)) for i in range(200)])
    assert values.mean() == pytest.approx(0.5, abs=0.06)
    assert scipy.stats.kstest(values, "uniform").pvalue > 0.01


def test_calibrated_macs_near_zero_for_orthogonal_and_one_for_parallel_rows():
    assert metrics.calibrated_macs(torch.eye(12)) < 1e-6
    assert metrics.calibrated_macs(torch.eye(12)[:5]) < 1e-3
    assert metrics.calibrated_macs(torch.ones(8, 12)) > 1 - 1e-6


def test_calibrated_macs_equals_normal_cdf_of_z():
    decoder = torch.randn(10, 6, generator=generator(5))
    mu0, sigma0 = metrics.random_direction_null(10, 6, 200, 0)
    expected = scipy.stats.norm.cdf((metrics.macs(decoder) - mu0) / sigma0)
    assert metrics.calibrated_macs(decoder) == pytest.approx(expected, abs=1e-12)


# --- correlation, assignment, interference -----------------------------------------------------------


def test_absolute_correlation_matches_numpy_and_zeroes_constant_columns():
    a = torch.randn(50, 3, generator=generator(6), dtype=torch.float64)
    b = torch.randn(50, 2, generator=generator(7), dtype=torch.float64)
    a[:, 1] = 0.1  # constant, with a mean that is not exact in floating point
    b[:, 0] = 2 * a[:, 0] + 0.5 * b[:, 1]
    result = metrics.absolute_correlation(a, b)
    full = np.corrcoef(np.concatenate([a.numpy(), b.numpy()], axis=1), rowvar=False)
    assert not torch.isnan(result).any()
    for row in (0, 2):
        np.testing.assert_allclose(result[row].numpy(), np.abs(full[row, 3:]), atol=1e-12)
    assert torch.equal(result[1], torch.zeros(2, dtype=torch.float64))


def interference_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four latents tracking features 2, 0, none (constant) and 3 (negatively), with hand-set directions."""
    features = torch.randn(400, 4, generator=generator(8), dtype=torch.float64)
    noise = 0.1 * torch.randn(400, 4, generator=generator(9), dtype=torch.float64)
    latents = torch.stack(
        [
            features[:, 2] + noise[:, 0],
            features[:, 0] + noise[:, 1],
            torch.full((400,), 0.7),
            -features[:, 3],
        ],
        dim=1,
    )
    decoder = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    importances = torch.tensor([1.0, 0.5, 2.0, 3.0])
    return decoder, latents, features, importances


def test_latent_feature_assignment_on_hand_built_latents():
    _, latents, features, _ = interference_case()
    assignment = metrics.latent_feature_assignment(latents, features)
    assert assignment.dtype == torch.long
    assert assignment.tolist() == [2, 0, -1, 3]


def test_interference_by_hand():
    decoder, latents, features, importances = interference_case()
    # Pairs among the live latents 0, 1, 3 (latent 2 tracks nothing and contributes 0):
    # cos²(d0, d1) = 1/2 with I2·I0 = 2; cos²(d0, d3) = 0; cos²(d1, d3) = 1/4 with I0·I3 = 3.
    expected = 0.5 * 2.0 * 1.0 + 0.0 + 0.25 * 1.0 * 3.0
    assert metrics.interference(decoder, latents, features, importances) == pytest.approx(expected, abs=1e-12)


def test_interference_seed_by_hand_with_wraparound():
    decoder = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    importances = torch.tensor([1.0, 2.0, 3.0])
    # Latent weights I[k mod 3] = 1, 2, 3, 1. Squared cosines: (0,1) 1/2, (0,2) 1, (1,2) 1/2, (1,3) 1/4, rest 0.
    expected = 0.5 * 1 * 2 + 1.0 * 1 * 3 + 0.5 * 2 * 3 + 0.25 * 2 * 1
    assert metrics.interference_seed(decoder, importances) == pytest.approx(expected, abs=1e-12)


# --- sparsity and reconstruction ---------------------------------------------------------------------


def test_l0_and_dead_latents_on_a_hand_matrix():
    latents = torch.tensor([[1.0, 0.0, -0.5, 2.0], [0.0, 0.0, 3.0, 1.0], [0.1, -0.01, 0.0, 0.0]])
    assert metrics.l0_sparsity(latents) == pytest.approx((2 / 4 + 2 / 4 + 1 / 4) / 3)
    assert metrics.dead_latents(latents) == pytest.approx(1 / 4)


def test_sparsity_w4_by_hand():
    weights = [torch.tensor([[1.0, -2.0], [0.0, 1.0]]), torch.tensor([[0.5, 1.0, -1.0]])]
    expected = (1 + 16 + 0 + 1 + 0.0625 + 1 + 1) / 7
    assert metrics.sparsity_w4(weights) == pytest.approx(expected)


def test_reconstruction_mse_and_fvu_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    # Squared errors per sample 0, 1, 1. Mean (3, 5); E||x||^2 = 136/3, ||E x||^2 = 34.
    assert metrics.reconstruction_mse(x, x_hat) == pytest.approx(2 / 6)
    assert metrics.fraction_of_variance_unexplained(x, x_hat) == pytest.approx((2 / 3) / (136 / 3 - 34))


def test_fvu_is_one_for_the_mean_and_zero_for_a_perfect_reconstruction():
    x = 5.0 + torch.randn(300, 6, generator=generator(10))
    mean_prediction = x.double().mean(dim=0, keepdim=True).expand_as(x)
    assert metrics.fraction_of_variance_unexplained(x, mean_prediction) == pytest.approx(1.0, abs=1e-12)
    assert metrics.fraction_of_variance_unexplained(x, x) == 0.0


# --- ground-truth polysemanticity --------------------------------------------------------------------


def hand_built_neurons() -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons: feature 0 alone; 0 + 3 (different groups); 0 + 1 (same group); constant; 0 + 0.2·3; 0 + 0.3·3."""
    features = uncorrelated_features(500, 8, seed=11)
    f = features.T
    units = torch.stack(
        [f[0], f[0] + f[3], f[0] + f[1], torch.full_like(f[0], 2.5), f[0] + 0.2 * f[3], f[0] + 0.3 * f[3]],
        dim=1,
    )
    return units, features


def test_attribution_and_participation_ratio_of_hand_built_neurons():
    units, features = hand_built_neurons()
    attribution = metrics.attribution_matrix(units, features)
    assert attribution.shape == (6, 8)
    assert attribution[1, 0] == pytest.approx(1 / math.sqrt(2))
    assert attribution[1, 3] == pytest.approx(1 / math.sqrt(2))
    ratio = metrics.participation_ratio(attribution)
    assert ratio[0] == pytest.approx(1.0)
    assert ratio[1] == pytest.approx(2.0)
    assert ratio[2] == pytest.approx(2.0)
    assert math.isnan(ratio[3])


def test_polysemantic_units_only_count_cross_group_sharing():
    units, features = hand_built_neurons()
    flags = metrics.polysemantic_units(metrics.attribution_matrix(units, features), GROUPS)
    # Monosemantic; cross-group; same group; unresponsive; secondary at 20 % (< 25 %); secondary at 30 %.
    assert flags.tolist() == [False, True, False, False, False, True]


def test_polysemanticity_summary_excludes_unresponsive_units():
    units, features = hand_built_neurons()
    summary = metrics.polysemanticity_summary(units[:, :4], features, GROUPS, "neuron")
    assert summary == pytest.approx(
        {
            "neuron_polysemantic": 1.0,
            "neuron_polysemantic_fraction": 1 / 3,
            "neuron_participation_ratio": 5 / 3,
        }
    )


def test_polysemanticity_summary_with_no_responsive_units():
    features = uncorrelated_features(100, 8)
    summary = metrics.polysemanticity_summary(torch.ones(100, 2), features, GROUPS, "latent")
    assert summary["latent_polysemantic"] == 0.0
    assert summary["latent_polysemantic_fraction"] == 0.0
    assert math.isnan(summary["latent_participation_ratio"])


def test_polysemantic_units_rejects_overlapping_groups():
    with pytest.raises(ValueError):
        metrics.polysemantic_units(torch.ones(2, 3), [[0, 1], [1, 2]])


# --- feature recovery --------------------------------------------------------------------------------


def recovery_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden = features @ M + offset, with M: [3, 5] of orthonormal rows."""
    features = torch.rand(200, 3, generator=generator(12), dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(5, 3, generator=generator(13), dtype=torch.float64))
    directions = basis.T
    hidden = features @ directions + 0.7
    return features, directions, hidden


def test_feature_directions_match_numpy_lstsq():
    features, directions, hidden = recovery_case()
    noisy = hidden + 0.05 * torch.randn(hidden.shape, generator=generator(14), dtype=torch.float64)
    design = np.concatenate([features.numpy(), np.ones((200, 1))], axis=1)
    expected = np.linalg.lstsq(design, noisy.numpy(), rcond=None)[0][:3]
    np.testing.assert_allclose(metrics.feature_directions(noisy, features).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(
        metrics.feature_directions(hidden, features).numpy(), directions.numpy(), atol=1e-10
    )


def test_feature_recovery_is_perfect_for_the_true_directions():
    features, directions, hidden = recovery_case()
    recovery = metrics.feature_recovery(directions, hidden, features)
    assert recovery["feature_mmcs"] == pytest.approx(1.0)
    assert recovery["feature_mcc"] == pytest.approx(1.0)


def test_feature_mcc_survives_permutation_sign_flips_and_extra_latents():
    features, directions, hidden = recovery_case()
    extra = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    decoder = torch.cat([directions[[2, 0, 1]], extra])
    assert metrics.feature_recovery(decoder, hidden, features)["feature_mcc"] == pytest.approx(1.0)
    flipped = metrics.feature_recovery(-directions, hidden, features)
    assert flipped["feature_mcc"] == pytest.approx(1.0)
    # Signed MMCS: each feature's best match is a flipped copy of another orthogonal direction, so 0.
    assert flipped["feature_mmcs"] == pytest.approx(0.0, abs=1e-9)


def test_feature_mcc_with_fewer_latents_than_features():
    features, directions, hidden = recovery_case()
    tilted = directions[2] + directions[0]
    decoder = torch.stack([directions[1], tilted])
    # Hungarian pairs latent 0 with feature 1 (|cos| 1) and latent 1 with feature 0 or 2 (|cos| 1/sqrt(2)).
    expected = (1 + 1 / math.sqrt(2)) / 2
    assert metrics.feature_recovery(decoder, hidden, features)["feature_mcc"] == pytest.approx(expected)


# --- everything at once ------------------------------------------------------------------------------


def test_taming_metrics_returns_every_metric_finite():
    rng = generator(15)
    features = torch.relu(torch.randn(300, 8, generator=rng))
    hidden = features @ torch.randn(8, 12, generator=rng) + 0.1 * torch.randn(300, 12, generator=rng)
    standardized = (hidden - hidden.mean(0)) / hidden.std(0)
    decoder = torch.randn(16, 12, generator=rng)
    latents = torch.nn.functional.leaky_relu(standardized @ torch.randn(12, 16, generator=rng), 0.01)
    reconstruction = latents @ decoder
    result = metrics.taming_metrics(
        decoder=decoder,
        latents=latents,
        reconstruction=reconstruction,
        standardized_hidden=standardized,
        hidden=hidden,
        features=features,
        groups=GROUPS,
        importances=0.9 ** torch.arange(8.0),
        network_weights=[torch.randn(12, 8, generator=rng), torch.randn(8, 12, generator=rng)],
        null_draws=50,
    )
    assert tuple(result) == metrics.TAMING_METRIC_NAMES
    assert all(isinstance(value, float) and math.isfinite(value) for value in result.values())
    assert set(metrics.HEADLINE_METRICS) <= set(metrics.TAMING_METRIC_NAMES)
    assert result["macs_published_form"] == pytest.approx(result["macs"] * 15 / 16)


def test_every_metric_has_a_direction_and_every_direction_a_metric():
    """One list of metric names (pipeline.evaluation.METRIC_NAMES, built from metrics.TAMING_METRIC_NAMES,
    which `taming_metrics` must fill key by key); the report's directions may not drift from it."""
    from pipeline.conclusions import METRIC_DIRECTIONS
    from pipeline.evaluation import METRIC_NAMES
    from pipeline.metrics import HEADLINE_METRICS

    assert set(METRIC_DIRECTIONS) == set(METRIC_NAMES)
    assert set(HEADLINE_METRICS) <= set(METRIC_NAMES)


def test_dead_neurons_counts_units_that_never_vary():
    hidden = torch.tensor([[0.0, 1.0, 2.0, 0.5], [0.0, 3.0, 2.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    # unit 0 never active, unit 2 constant (not dead in the ReLU sense, but nothing to decompose)
    assert metrics.dead_neurons(hidden) == 0.5
    assert metrics.dead_neurons(torch.zeros(5, 3)) == 1.0
