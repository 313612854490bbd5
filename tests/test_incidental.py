"""Tests of the incidental-polysemanticity model, measurements, ODE and experiments (docs/science.md §2).

Every assertion compares against something computed independently: hand-set weights, closed forms, autograd,
scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from matplotlib.figure import Figure

from pipeline.config_tools import ConfigError, config_hash, from_dict, to_dict
from pipeline.experiments.incidental import (
    POINT_METRICS,
    collisions_points,
    dynamics,
    noise_points,
    run_point,
)
from pipeline.incidental import (
    CONVERGENCE_THRESHOLD,
    SPARSIFICATION_COMPLETION_LIMIT,
    SPARSIFICATION_MIDDLE_WINDOW,
    SPARSIFICATION_RATIO_TOLERANCE,
    IncidentalConfig,
    assess_convergence,
    encoding_sparsity,
    excess_kurtosis_of_projection,
    fourth_norm,
    initial_colliding_pairs,
    initial_collisions,
    initial_weights,
    instance_generator,
    instance_losses,
    loss_gradient,
    polysemantic_neurons,
    polysemantic_sign_structure,
    predicted_nonzeros,
    predicted_polysemantic_neurons,
    sample_noise,
    simulate_sparsification,
    train_incidental,
    winner_was_initial_argmax,
)
from pipeline.incidental_analysis import (
    collisions_summary,
    collisions_table,
    curves_by_label,
    loglog_slope,
    slope_sentence,
    slope_table,
    unconverged_notes,
)
from pipeline.plots.incidental import (
    ZERO_COUNT_HEIGHT,
    collisions_plot,
    fourth_norm_plot,
    sparsification_plot,
)

# ------------------------------------------------------------------------------------------------------------
# Measurements on hand-set weights


def hand_set_weights() -> torch.Tensor:
    """5 features × 6 neurons with known structure (rows are features, columns neurons).

    neuron 0: features 0 (+1.0) and 1 (−0.9)            → polysemantic, opposite signs
    neuron 1: features 2 (+0.8) and 3 (+1.2)            → polysemantic (both bounds inclusive), same sign
    neuron 2: feature 4 (1.0) and feature 0 (0.79)      → 0.79 is below the band: monosemantic
    neuron 3: feature 1 (1.21) and feature 2 (−1.0)     → 1.21 is above the band: monosemantic
    neuron 4: one unit weight                           → monosemantic
    neuron 5: small weights only                        → dead
    """
    weights = torch.zeros(5, 6)
    weights[0, 0], weights[1, 0] = 1.0, -0.9
    weights[2, 1], weights[3, 1] = 0.8, 1.2
    weights[4, 2], weights[0, 2] = 1.0, 0.79
    weights[1, 3], weights[2, 3] = 1.21, -1.0
    weights[3, 4] = 1.0
    weights[:, 5] = 0.1
    return weights


def test_polysemantic_count_on_hand_set_weights():
    weights = hand_set_weights()
    assert int(polysemantic_neurons(weights)) == 2
    # Narrowing the band so that 0.8 and 1.2 fall outside removes neuron 1.
    assert int(polysemantic_neurons(weights, low=0.85, high=1.15)) == 1
    # Batched: leading instance dimension gives one count per instance.
    batch = torch.stack([weights, torch.zeros(5, 6)])
    assert polysemantic_neurons(batch).tolist() == [2, 0]


def test_sign_structure_on_hand_set_weights():
    weights = hand_set_weights()
    assert float(polysemantic_sign_structure(weights)) == pytest.approx(0.5)
    assert math.isnan(float(polysemantic_sign_structure(torch.eye(3))))


def test_initial_collisions_detects_a_known_collision():
    # Features 0 and 2 both have their largest |weight| on neuron 1; feature 1 on neuron 0; feature 3 on 2.
    weights = torch.tensor(
        [
            [0.1, 0.9, -0.2],
            [0.7, 0.3, 0.1],
            [0.2, -0.8, 0.5],
            [0.0, 0.1, 0.6],
        ]
    )
    assert int(initial_collisions(weights)) == 2
    assert int(initial_colliding_pairs(weights)) == 1
    assert int(initial_colliding_pairs(weights, opposite_signs=True)) == 1  # +0.9 vs −0.8
    # A three-way collision is three colliding pairs.
    assert int(initial_colliding_pairs(torch.tensor([[1.0, 0.0], [0.9, 0.1], [-0.8, 0.2]]))) == 3
    assert int(initial_collisions(torch.eye(4))) == 0


def test_initial_collisions_match_their_expectation_at_random_init():
    # Feature i collides when one of the other n − 1 argmaxes lands on its neuron: n·(1 − (1 − 1/m)^{n−1});
    # colliding pairs: C(n, 2)/m, half of them with opposite signs.
    n, m, instances = 16, 32, 4000
    weights = torch.randn(instances, n, m, generator=torch.Generator().manual_seed(4))
    features = initial_collisions(weights).double()
    pairs = initial_colliding_pairs(weights).double()
    benign = initial_colliding_pairs(weights, opposite_signs=True).double()
    for measured, expected in (
        (features, n * (1 - (1 - 1 / m) ** (n - 1))),
        (pairs, n * (n - 1) / 2 / m),
        (benign, n * (n - 1) / 4 / m),
    ):
        assert abs(measured.mean().item() - expected) < 4 * measured.std().item() / math.sqrt(instances)


def test_winner_was_initial_argmax_on_a_hand_case():
    initial = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.4, 0.2], [0.0, 0.3, 0.35], [-0.6, 0.2, 0.1]])
    # Features 0 and 3 keep neuron 0; feature 1 moves from neuron 1 to 2; feature 2 moves from 2 to 1.
    final = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert float(winner_was_initial_argmax(initial, final)) == pytest.approx(0.5)


def test_fourth_norm_of_one_hot_and_spread_vectors():
    assert float(fourth_norm(torch.eye(4))) == pytest.approx(1.0)
    for k in (2, 5, 16):
        spread = torch.zeros(1, 32)
        spread[0, :k] = 1 / math.sqrt(k)
        assert float(fourth_norm(spread)) == pytest.approx(1 / k, rel=1e-5)
        assert float(fourth_norm(3 * spread, normalized=True)) == pytest.approx(1 / k, rel=1e-5)


def test_fourth_norm_closed_forms_at_random_init():
    # E Σ_j w_j⁴ = m·3σ⁴ = 3/m for w ~ N(0, I/m); a random unit direction has E Σ u_j⁴ = 3/(m+2).
    m, features = 16, 20_000
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(features, m, generator=generator, dtype=torch.float64) / math.sqrt(m)
    per_feature = weights.pow(4).sum(dim=-1)
    standard_error = per_feature.std().item() / math.sqrt(features)
    assert abs(float(fourth_norm(weights)) - 3 / m) < 4 * standard_error
    per_direction = (weights.pow(4).sum(-1) / weights.square().sum(-1).square()).std().item()
    assert abs(float(fourth_norm(weights, normalized=True)) - 3 / (m + 2)) < 4 * per_direction / math.sqrt(
        features
    )
    # The two closed forms are distinguishable at this sample size, so the test would notice a mix-up.
    assert (3 / m - 3 / (m + 2)) > 10 * standard_error


def test_predicted_polysemantic_neurons():
    assert predicted_polysemantic_neurons(256, 256) == 64
    assert predicted_polysemantic_neurons(64, 512) == 2


# ------------------------------------------------------------------------------------------------------------
# Noise and kurtosis


@pytest.mark.parametrize("vector", [np.eye(12)[3], np.linspace(0.2, 1.0, 12)], ids=["one_hot", "spread"])
def test_projection_kurtosis_matches_closed_form(vector):
    rng = np.random.default_rng(1)
    noise = rng.choice([-1.0, 1.0], size=(400_000, vector.size))
    projection = noise @ vector
    measured = scipy.stats.kurtosis(projection, fisher=True)
    expected = excess_kurtosis_of_projection(vector, kappa=-2.0)
    assert measured == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize(
    ("noise", "nu", "kurtosis", "tolerance"),
    [
        ("bipolar", 5.0, -2.0, 0.02),
        ("gaussian", 5.0, 0.0, 0.05),
        ("laplace", 5.0, 3.0, 0.2),
        # κ = 6/(ν−4) = 1; ν > 8 keeps the sample kurtosis's own variance finite.
        ("student_t", 10.0, 1.0, 0.25),
    ],
)
def test_noise_has_requested_std_and_kurtosis(noise, nu, kurtosis, tolerance):
    sigma = 0.3
    draws = sample_noise(noise, sigma, (200_000,), torch.Generator().manual_seed(2), nu=nu).double().numpy()
    assert draws.std() == pytest.approx(sigma, rel=0.02)
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(draws.size)
    assert scipy.stats.kurtosis(draws) == pytest.approx(kurtosis, abs=tolerance)


def test_student_t_default_nu_is_heavy_tailed():
    # ν = 5: κ = 6 in theory, but the sample kurtosis converges slowly (the 8th moment is infinite);
    # check the sign and the scale only.
    draws = (
        sample_noise("student_t", 0.3, (200_000,), torch.Generator().manual_seed(2), nu=5.0).double().numpy()
    )
    assert draws.std() == pytest.approx(0.3, rel=0.03)
    assert scipy.stats.kurtosis(draws) > 2.0


def test_student_t_with_non_integer_nu_uses_numpy_generator():
    nu = 6.5  # excess kurtosis 6/(ν−4) = 2.4
    draws = sample_noise(
        "student_t", 1.0, (300_000,), torch.Generator(), nu=nu, numpy_generator=np.random.default_rng(3)
    ).double()
    assert draws.std().item() == pytest.approx(1.0, rel=0.03)
    assert scipy.stats.kurtosis(draws.numpy()) > 1.0


def test_noise_is_deterministic_given_the_generator():
    for noise in ("bipolar", "gaussian", "laplace", "student_t"):
        first = sample_noise(noise, 0.1, (50,), torch.Generator().manual_seed(7))
        second = sample_noise(noise, 0.1, (50,), torch.Generator().manual_seed(7))
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------------------------
# Model and training


def test_loss_gradient_matches_autograd():
    generator = instance_generator(0, 0, 0)
    weights = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64) / math.sqrt(7)
    for noise in (None, 0.2 * torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)):
        leaf = weights.clone().requires_grad_(True)
        instance_losses(leaf, 0.05, noise).sum().backward()
        assert torch.allclose(loss_gradient(weights, 0.05, noise), leaf.grad, atol=1e-12)


def test_loss_of_hand_set_solution():
    # A monosemantic identity and the opposite-sign polysemantic solution both reconstruct perfectly,
    # leaving only the L1 term λ·Σ|W|.
    identity = torch.eye(4, 6).unsqueeze(0)
    shared = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    assert instance_losses(identity, 0.1).item() == pytest.approx(0.4)
    assert instance_losses(shared, 0.1).item() == pytest.approx(0.4)
    # A same-sign pair interferes: each feature also lights the other's output.
    same_sign = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert instance_losses(same_sign, 0.0).item() == pytest.approx(2.0)


@pytest.mark.parametrize("noise", ["none", "bipolar", "student_t"])
def test_instance_alone_equals_instance_in_batch(noise):
    shared = {"n": 6, "m": 10, "steps": 60, "curve_every": 20, "l1": 1e-2}
    if noise != "none":
        shared |= {"noise": noise, "sigma": 0.1}
    batch = train_incidental(IncidentalConfig(instances=3, **shared))
    alone = train_incidental(IncidentalConfig(instances=1, first_instance=2, **shared))
    assert torch.equal(alone.initial_weights[0], batch.initial_weights[2])
    assert torch.allclose(alone.final_weights[0], batch.final_weights[2], atol=1e-6)
    assert alone.instance_indices == [2]
    assert not torch.allclose(batch.final_weights[0], batch.final_weights[2])


def test_training_is_deterministic_and_records_curves():
    config = IncidentalConfig(n=4, m=8, instances=2, steps=25, curve_every=10, noise="laplace", sigma=0.1)
    calls: list[int] = []
    first = train_incidental(config, progress=calls.append)
    second = train_incidental(config)
    assert torch.equal(first.final_weights, second.final_weights)
    assert first.curves["step"] == [0, 10, 20, 25]
    assert calls == [10, 20, 25]
    assert set(first.curves) == {"step", "loss", "fourth_norm", "polysemantic_neurons"}
    assert all(len(values) == 4 for values in first.curves.values())
    assert first.initial_weights.shape == first.final_weights.shape == (2, 4, 8)


def test_l1_training_sparsifies_toward_one_hot_encodings():
    config = IncidentalConfig(n=8, m=16, instances=4, steps=1500, l1=1e-2, lr=1e-2, curve_every=500)
    result = train_incidental(config)
    assert result.curves["fourth_norm"][0] < 0.4
    assert result.curves["fourth_norm"][-1] > 0.9
    assert result.curves["loss"][-1] < result.curves["loss"][0]


def hand_adamw(weights: torch.Tensor, l1: float, steps: int, lr: float, weight_decay: float) -> torch.Tensor:
    """AdamW written out (Loshchilov & Hutter, decoupled decay; torch's defaults β = (0.9, 0.999), ε = 1e-8),
    with the gradient from autograd on `instance_losses`, in float64. weights: [instance, n, m]."""
    beta1, beta2, epsilon = 0.9, 0.999, 1e-8
    weights = weights.double().clone()
    first = torch.zeros_like(weights)
    second = torch.zeros_like(weights)
    for step in range(1, steps + 1):
        leaf = weights.clone().requires_grad_(True)
        instance_losses(leaf, l1).sum().backward()
        gradient = leaf.grad
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient.square()
        first_unbiased = first / (1 - beta1**step)
        second_unbiased = second / (1 - beta2**step)
        weights = weights * (1 - lr * weight_decay)
        weights = weights - lr * first_unbiased / (second_unbiased.sqrt() + epsilon)
    return weights


def test_training_applies_adamw_weight_decay_of_the_published_run():
    # The published run had torch's default decay 0.01 active (docs/science.md §2.1); the collisions defaults
    # keep it. A large lr makes the decay's share of each step (lr·0.01·W) visible in float32.
    assert {config.weight_decay for config in collisions_points()} == {0.01}
    config = IncidentalConfig(n=5, m=7, instances=2, steps=4, lr=0.1, l1=1e-2, curve_every=4)
    start = initial_weights(config)
    trained = train_incidental(config).final_weights.double()
    with_decay = hand_adamw(start, config.l1, config.steps, config.lr, weight_decay=0.01)
    without_decay = hand_adamw(start, config.l1, config.steps, config.lr, weight_decay=0.0)
    assert torch.allclose(trained, with_decay, atol=1e-6)
    # The check can fail: without the decay the weights land measurably elsewhere.
    assert (with_decay - without_decay).abs().max() > 100 * 1e-6
    assert not torch.allclose(trained, without_decay, atol=1e-6)
    undecayed = train_incidental(config.replace(weight_decay=0.0)).final_weights.double()
    assert torch.allclose(undecayed, without_decay, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Convergence of a collisions point


def test_encoding_sparsity_of_hand_built_encodings():
    # One-hot rows give 1 whatever their length (L1 shortens a trained encoding to about 1 − λ/8).
    one_hot = torch.zeros(4, 6)
    one_hot[torch.arange(4), torch.tensor([0, 2, 2, 5])] = torch.tensor([0.9, -1.0, 0.95, 1.1])
    assert float(encoding_sparsity(one_hot)) == pytest.approx(1.0)
    # A row spread equally over k neurons gives 1/k; a zero row gives 0 (it sits on no neuron).
    mixed = torch.zeros(3, 8)
    mixed[0, 1] = 1.0
    mixed[1, :2] = 0.6
    mixed[2] = 0.0
    assert float(encoding_sparsity(mixed)) == pytest.approx((1 + 1 / 2 + 0) / 3)
    # Batched: one value per instance.
    assert encoding_sparsity(torch.stack([one_hot[:3, :], one_hot[1:, :]])).tolist() == pytest.approx([1, 1])


def test_random_init_is_unconverged_and_sparse_weights_are_converged():
    m = 32
    start = initial_weights(IncidentalConfig(n=64, m=m, instances=4))
    sparsity = encoding_sparsity(start)
    # A random direction has E Σ u⁴ = 3/(m+2) (docs/science.md §2.3); 64 features average it closely.
    assert sparsity.tolist() == pytest.approx([3 / (m + 2)] * 4, rel=0.15)
    check = assess_convergence(sparsity)
    assert not check.converged and check.unconverged_instances == 4 and check.instances == 4
    assert "4 of 4 instances" in check.reason() and f"{CONVERGENCE_THRESHOLD:g}" in check.reason()

    sparse = torch.zeros(4, 64, m)
    sparse[:, torch.arange(64), torch.arange(64) % m] = 0.99  # two features per neuron, each one-hot
    check = assess_convergence(encoding_sparsity(sparse))
    assert check.converged and check.unconverged_instances == 0 and check.reason() == ""
    assert check.lowest_sparsity == pytest.approx(1.0)


def test_one_unsparsified_instance_makes_the_point_unconverged():
    check = assess_convergence([1.0, 0.999, CONVERGENCE_THRESHOLD - 1e-3, 1.0])
    assert not check.converged and check.unconverged_instances == 1
    assert check.lowest_sparsity == pytest.approx(CONVERGENCE_THRESHOLD - 1e-3)
    assert assess_convergence([CONVERGENCE_THRESHOLD] * 3).converged  # the bound is inclusive
    assert not assess_convergence([1.0, math.nan]).converged
    assert not assess_convergence([]).converged


def summary_rows(counts, converged, ms=(64, 128, 256, 512)) -> pd.DataFrame:
    """A hand-built `collisions_summary` for one (n, λ): the columns the slope fit and the notes read."""
    return pd.DataFrame(
        {
            "n": 64,
            "l1": 1e-3,
            "m": list(ms),
            "steps": 2000,
            "polysemantic_neurons": list(counts),
            "converged": list(converged),
            "convergence": [
                "" if flag else "16 of 16 instances have encoding sparsity below 0.98" for flag in converged
            ],
        }
    )


def test_slope_leaves_out_unconverged_and_zero_points_and_says_so():
    # The converged points follow 1024/m exactly, so the fit gives slope −1 and intercept log 1024 only if the
    # unconverged m = 64 (count 0.5, far off the line) and the zero m = 512 are left out.
    summary = summary_rows([0.5, 8.0, 4.0, 0.0], [False, True, True, True])
    (row,) = slope_table(summary).itertuples()
    assert row.slope == pytest.approx(-1.0) and row.intercept == pytest.approx(math.log(1024))
    assert (row.points, row.unconverged, row.zero_count) == (2, 1, 1)
    assert "m = 64 unconverged" in row.note and "m = 512 with 0 polysemantic neurons" in row.note
    sentence = slope_sentence(row)
    assert "log–log slope -1.000" in sentence and "no CI with 2 points" in sentence
    notes = unconverged_notes(summary)
    assert (
        len(notes) == 2 and "m = 64 after 2000 steps" in notes[0] and "left out of the slope fit" in notes[0]
    )
    assert "--steps 12000" in notes[1]  # max(2·2000, the default 12 000)


def test_slope_with_fewer_than_two_usable_points_says_why():
    (row,) = slope_table(summary_rows([0.0, 0.0, 0.0, 0.0], [False] * 4)).itertuples()
    assert math.isnan(row.slope) and row.points == 0 and row.unconverged == 4
    sentence = slope_sentence(row)
    assert "nan" not in sentence
    assert "no log–log slope: 0 usable point(s) of 4, a fit needs 2" in sentence
    assert "m = 64, 128, 256, 512 unconverged" in sentence


def test_collisions_summary_applies_the_criterion_per_instance():
    per_instance = pd.DataFrame(
        {
            "n": 8,
            "l1": 1e-2,
            "m": [8, 8, 16, 16],
            "steps": 500,
            "polysemantic_neurons": [2, 1, 1, 0],
            "encoding_sparsity": [1.0, 0.5, 0.99, 1.0],
        }
    )
    summary = collisions_summary(per_instance)
    assert summary["converged"].tolist() == [False, True]
    assert summary["unconverged_instances"].tolist() == [1, 0]
    assert summary["encoding_sparsity_min"].tolist() == pytest.approx([0.5, 0.99])


# ------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"noise": "uniform"},
            "noise must be one of none, bipolar, gaussian, laplace, student_t; got 'uniform'",
        ),
        ({"noise_sharing": "batch"}, "noise_sharing must be one of per_sample, per_step; got 'batch'"),
        ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd; got 'adam'"),
        ({"device": "tpu"}, "device must be one of cpu, auto, cuda, mps; got 'tpu'"),
        ({"n": 0}, "n must be an integer >= 1; got 0"),
        ({"m": 2.5}, "m must be an integer >= 1; got 2.5"),
        ({"instances": True}, "instances must be an integer >= 1; got True"),
        ({"l1": -1.0}, "l1 must be >= 0; got -1.0"),
        ({"lr": 0.0}, "lr must be > 0; got 0.0"),
        ({"sigma": 0.1}, "sigma must be 0 when noise is 'none'; got 0.1"),
        ({"noise": "gaussian"}, "sigma must be > 0 when noise is 'gaussian'; got 0.0"),
        ({"nu": 2.0}, "nu must be > 2"),
        ({"optimizer": "sgd"}, "weight_decay applies to optimizer 'adamw' only"),
        ({"polysemantic_high": 0.5}, "polysemantic_high must be > polysemantic_low (0.8); got 0.5"),
        ({"curve_every": 0}, "curve_every must be an integer >= 1; got 0"),
    ],
)
def test_config_validation_messages(changes, message):
    with pytest.raises(ConfigError) as raised:
        IncidentalConfig(**changes)
    assert message in str(raised.value)


def test_config_round_trips_through_dict():
    config = IncidentalConfig(noise="student_t", sigma=0.1, nu=6.5, optimizer="sgd", weight_decay=0.0)
    assert from_dict(IncidentalConfig, to_dict(config)) == config
    assert config_hash(config) != config_hash(config.replace(seed=1))
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(IncidentalConfig, {"n_features": 3})


# ------------------------------------------------------------------------------------------------------------
# Sparsification ODE


def test_sparsification_ode_lands_within_documented_factor():
    m, l1 = 10_000, 1e-3
    simulation = simulate_sparsification(m, l1, t_max=SPARSIFICATION_COMPLETION_LIMIT / l1, dt=0.5, seed=0)
    times = simulation["t"]
    low, high = SPARSIFICATION_MIDDLE_WINDOW
    middle = (times * l1 >= low) & (times * l1 <= high)
    ratio = simulation["nonzeros"][middle] / predicted_nonzeros(m, l1, times[middle])
    assert middle.sum() > 20
    assert (
        SPARSIFICATION_RATIO_TOLERANCE[0] <= ratio.min() <= ratio.max() <= SPARSIFICATION_RATIO_TOLERANCE[1]
    )
    assert 1.5 <= np.median(ratio) <= 3.0  # about the documented 2–2.7
    assert simulation["nonzeros"][0] == m
    assert simulation["completion_time"] <= SPARSIFICATION_COMPLETION_LIMIT / l1
    assert simulation["completion_time"] >= 1.0 / l1  # later than the naive prediction, as documented
    assert simulation["nonzeros"][-1] == 1
    # The survivor settles where feature benefit balances L1: (1 − a²)·a = λ, so a ≈ 1 − λ/2.
    assert simulation["l2_norm"][-1] == pytest.approx(1 - l1 / 2, abs=1e-3)


def test_sparsification_zero_is_absorbing():
    initial = np.array([0.9, 0.0, 0.02, -0.01])
    simulation = simulate_sparsification(4, 0.05, t_max=5.0, dt=0.1, initial=initial)
    assert simulation["nonzeros"][0] == 3
    assert np.all(np.diff(simulation["nonzeros"]) <= 0)
    assert simulation["nonzeros"][-1] == 1


# ------------------------------------------------------------------------------------------------------------
# Experiments and plots


def test_run_point_returns_exactly_the_documented_metrics():
    config = IncidentalConfig(n=6, m=12, instances=3, steps=40, curve_every=20)
    point = run_point(config)
    assert set(point.metrics) == set(POINT_METRICS)
    assert list(point.metrics) == list(POINT_METRICS)
    assert point.metrics["predicted_polysemantic_neurons"] == pytest.approx(0.75)
    assert len(point.per_instance) == 3
    assert {"instance", "polysemantic_neurons", "fourth_norm", "initial_collisions"} <= set(
        point.per_instance
    )
    for key in ("n", "m", "l1", "noise", "sigma", "optimizer", "steps"):
        assert point.params[key] == getattr(config, key)
    assert point.metrics["polysemantic_neurons_std"] == pytest.approx(
        point.per_instance["polysemantic_neurons"].std(ddof=1), nan_ok=True
    )
    # 40 steps at lr 1e-3 leave the encodings near their random init (3/(m+2) ≈ 0.21): unconverged.
    assert point.metrics["converged"] == 0.0 and point.metrics["unconverged_instances"] == 3.0
    assert point.metrics["encoding_sparsity_min"] < 0.5
    noisy = run_point(config.replace(noise="gaussian", sigma=0.1, l1=0.0))
    assert math.isnan(noisy.metrics["converged"]) and noisy.convergence is None


def test_loglog_slope_recovers_a_power_law_with_ci():
    ms = np.array([64, 128, 256, 512, 1024])
    counts = 1000 / ms * np.exp(np.array([0.05, -0.03, 0.02, -0.04, 0.01]))
    slope, intercept, low, high = loglog_slope(ms, counts)
    reference = scipy.stats.linregress(np.log(ms), np.log(counts))
    assert slope == pytest.approx(reference.slope)
    assert intercept == pytest.approx(reference.intercept)
    assert low < -1 < high and low < slope < high


def test_noise_points_follow_published_recipe():
    configs = noise_points(steps=100)
    assert len(configs) == 12
    assert {config.optimizer for config in configs} == {"sgd"}
    assert {config.weight_decay for config in configs} == {0.0}
    assert {(config.n, config.m, config.instances, config.lr) for config in configs} == {(8, 16, 5, 0.02)}


def test_plots_return_figures():
    points = [
        run_point(IncidentalConfig(n=6, m=m, instances=2, steps=30, curve_every=10)) for m in (6, 12, 24)
    ]
    table = collisions_table(points)
    # Hand-set what each point shows: m = 6 converged with 2 neurons, m = 12 unconverged with 1, m = 24 a
    # converged zero count, which has no logarithm.
    table.loc[:, "polysemantic_neurons"] = [2.0, 1.0, 0.0]
    table.loc[:, "converged"] = [True, False, True]
    figure = collisions_plot(table)
    axes = figure.axes[0]
    assert axes.get_xscale() == "log" and axes.get_yscale() == "log"
    prediction = next(line for line in axes.get_lines() if "prediction" in line.get_label())
    assert np.allclose(prediction.get_ydata(), 6 * 6 / (4 * np.asarray(prediction.get_xdata(), dtype=float)))
    # Error-bar series carry their label on the container; its first line holds the data points.
    series = {container.get_label(): container.lines[0] for container in axes.containers}
    fitted = series["λ = 0.001 (mean, 95 % CI)"]
    assert list(fitted.get_xdata()) == [6] and list(fitted.get_ydata()) == [2.0]
    hollow = series["λ = 0.001 unconverged (not fitted)"]
    assert list(hollow.get_xdata()) == [12] and hollow.get_markerfacecolor() == "none"
    lines = {line.get_label(): line for line in axes.get_lines()}
    # The zero count is drawn, at the bottom edge in axes coordinates, with a "0" beside it.
    zero = lines["λ = 0.001: 0 polysemantic neurons (at the bottom edge)"]
    assert list(zero.get_xdata()) == [24] and list(zero.get_ydata()) == [ZERO_COUNT_HEIGHT]
    bottom_left = zero.get_transform().transform((24, ZERO_COUNT_HEIGHT))
    expected = axes.transData.transform((24, 1.0))[0], axes.transAxes.transform((0, ZERO_COUNT_HEIGHT))[1]
    assert np.allclose(bottom_left, expected)
    assert [text.get_text() for text in axes.texts] == ["0"]
    figure.canvas.draw()  # renders without a log-of-zero error
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "λ = 0.001: 0 polysemantic neurons (at the bottom edge)" in legend
    curves = curves_by_label(points)
    drawn = {line.get_label() for line in fourth_norm_plot(curves, m=12).axes[0].get_lines()}
    assert set(curves) <= drawn
    simulations = [point.simulation for point in dynamics(m=500, l1_values=(1e-2,), t_max_times_l1=2.0)]
    assert isinstance(sparsification_plot(simulations), Figure)
