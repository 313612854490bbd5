"""The SAE architectures of current practice against independent implementations.

Each reference below is written from the paper's equations, one model at a time, in plain torch with
autograd (no custom autograd functions, no top-k-and-scatter: selections come from sorting), in float64.
The registry's batched code (pipeline/sae/) runs three models at once on the same weights, and each
model's forward pass, loss and gradients must match its reference to float64 rounding (1e-10). A last
test runs the training engine itself for a few epochs and follows it with torch.optim.Adam on the
references. Where SAELens is installed (requirements-dev.txt), its implementations are a second, external
check of the forward pass and the loss on identical weights (see the SAELens section for the conventions
mapped between the two).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.config import AblationConfig, ConfigError, SAEConfig
from pipeline.data import generator_for
from pipeline.evaluation import checkpoint, load_checkpoint
from pipeline.metrics import dead_latents, l0_sparsity
from pipeline.sae import (
    ARCHITECTURES,
    after_training,
    after_update,
    architecture,
    before_update,
    standardization,
    trained_parameters,
    training_losses,
)
from pipeline.train import train_saes_on_hidden

MODELS, SAMPLES, HIDDEN, LATENTS = 3, 40, 6, 10
TOLERANCE = 1e-10
NEW_ARCHITECTURES = ("topk", "batch_topk", "jumprelu", "gated")


def _config(name: str, **fields) -> SAEConfig:
    return SAEConfig(architecture=name, d_sae=LATENTS, **fields)


def _batched_parameters(name: str, config: SAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Initial parameters of MODELS SAEs, stacked `[model, ...]`, float64, with the biases and (where the
    architecture has them) the extra parameters moved off their zero start so every term is exercised."""
    generator = torch.Generator().manual_seed(seed)
    chosen = architecture(name)
    models = [chosen.initial_parameters(HIDDEN, LATENTS, config, generator) for _ in range(MODELS)]
    parameters = {key: torch.stack([model[key] for model in models]).double() for key in models[0]}
    # Unit rows in float64 (float32's are unit only to 1e-7), as SAELens's Gated L1 weights by their norms.
    parameters["decoder"] /= parameters["decoder"].norm(dim=-1, keepdim=True)
    for key in ("encoder_bias", "decoder_bias", "magnitude_log_scale", "magnitude_bias"):
        if key in parameters:
            parameters[key] += 0.3 * torch.randn(
                parameters[key].shape, generator=generator, dtype=torch.float64
            )
    if "threshold" in parameters and name == "jumprelu":
        # Thresholds spread over the pre-activations' range, so the kernel catches some samples.
        parameters["threshold"] = 0.2 + 0.6 * torch.rand(
            parameters["threshold"].shape, generator=generator, dtype=torch.float64
        )
    return parameters


def _inputs(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(MODELS, SAMPLES, HIDDEN, generator=generator, dtype=torch.float64)


def _leaves(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.clone().requires_grad_() for name, value in parameters.items()}


def _one(parameters: dict[str, torch.Tensor], model: int) -> dict[str, torch.Tensor]:
    return {name: value[model].detach().clone().requires_grad_() for name, value in parameters.items()}


# ---------------------------------------------------------------------------------------------------------
# References: one SAE, from the papers' equations


def _largest_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` largest entries of a 1-D tensor (by sorting; no ties in random data)."""
    order = torch.sort(values, descending=True).indices
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def reference_topk_latents(p: dict, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gao et al.: z = ReLU(TopK(W_enc(x − b_pre) + b_enc)), row by row. Returns (pre, z)."""
    pre = (x - p["decoder_bias"]) @ p["encoder"] + p["encoder_bias"]
    rows = [torch.where(_largest_mask(row.detach(), k), row, torch.zeros_like(row)) for row in pre]
    return pre, torch.relu(torch.stack(rows))


def reference_aux_loss(p: dict, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int):
    """Gao et al. (AuxK): ‖e − W_dec z_aux‖² with z_aux the top-aux_k dead pre-activations (ReLU)."""
    if not bool(dead.any()):
        return torch.zeros((), dtype=pre.dtype)
    dead_indices = torch.nonzero(dead).flatten()
    count = min(aux_k, len(dead_indices))
    rows = []
    for row in pre:
        dead_values = row[dead_indices]
        keep = dead_indices[_largest_mask(dead_values.detach(), count)]
        selected = torch.zeros_like(row)
        selected[keep] = 1.0
        rows.append(torch.relu(row) * selected)
    estimate = torch.stack(rows) @ p["decoder"]
    return ((estimate - residual.detach()) ** 2).mean()


def reference_topk_loss(p: dict, x: torch.Tensor, config: SAEConfig, dead: torch.Tensor) -> torch.Tensor:
    pre, z = reference_topk_latents(p, x, config.k)
    reconstruction = z @ p["decoder"] + p["decoder_bias"]
    error = ((reconstruction - x) ** 2).mean()
    return error + config.aux_coefficient * reference_aux_loss(p, pre, x - reconstruction, dead, config.aux_k)


def reference_batch_topk_latents(p: dict, x: torch.Tensor, k: int):
    """Bussmann et al.: keep the k·B largest pre-activations of the batch; θ = smallest kept z > 0."""
    pre = (x - p["decoder_bias"]) @ p["encoder"] + p["encoder_bias"]
    keep = _largest_mask(pre.detach().flatten(), k * x.shape[0]).reshape(pre.shape)
    z = torch.relu(torch.where(keep, pre, torch.zeros_like(pre)))
    threshold = z.detach()[z.detach() > 0].min()
    return pre, z, threshold


def reference_batch_topk_loss(p: dict, x: torch.Tensor, config: SAEConfig, dead: torch.Tensor):
    pre, z, _ = reference_batch_topk_latents(p, x, config.k)
    reconstruction = z @ p["decoder"] + p["decoder_bias"]
    error = ((reconstruction - x) ** 2).mean()
    return error + config.aux_coefficient * reference_aux_loss(p, pre, x - reconstruction, dead, config.aux_k)


def reference_jumprelu_loss_and_gradients(p: dict, x: torch.Tensor, config: SAEConfig):
    """ "Jumping ahead" (§3–4), with the threshold's pseudo-derivatives written out by hand.

    Autograd handles everything that is an ordinary derivative (z's dependence on the pre-activation where
    it is active); the threshold's gradient is the sum, over samples, of ∂L/∂z · (−θ/ε)K((π − θ)/ε) plus
    λ/N · (−1/ε)K((π − θ)/ε).
    """
    epsilon, coefficient = config.jumprelu_bandwidth, config.l0_coefficient
    threshold = p["threshold"].detach()
    pre = x @ p["encoder"] + p["encoder_bias"]
    active = (pre.detach() > threshold).double()
    z = pre * active
    z.retain_grad()
    reconstruction = z @ p["decoder"] + p["decoder_bias"]
    l0 = active.sum(dim=1).mean()
    loss = ((reconstruction - x) ** 2).mean() + coefficient * l0
    loss.backward()
    kernel = ((pre.detach() - threshold).abs() / epsilon < 0.5).double()
    threshold_gradient = (z.grad * (-threshold / epsilon) * kernel).sum(dim=0)
    threshold_gradient += coefficient / x.shape[0] * (-kernel / epsilon).sum(dim=0)
    gradients = {name: value.grad for name, value in p.items() if name != "threshold"}
    gradients["threshold"] = threshold_gradient
    return loss.detach(), z.detach(), gradients


def reference_gated_loss(p: dict, x: torch.Tensor, config: SAEConfig):
    """Gated SAE, Rajamanoharan et al. 2024a, with weight sharing (W_mag)_ij = exp(r_mag)_j (W_gate)_ij."""
    centred = x - p["decoder_bias"]
    gate = centred @ p["encoder"] + p["encoder_bias"]
    magnitude_weights = p["encoder"] * torch.exp(p["magnitude_log_scale"])[None, :]
    magnitude = centred @ magnitude_weights + p["magnitude_bias"]
    z = (gate > 0).double() * torch.relu(magnitude)
    reconstruction = z @ p["decoder"] + p["decoder_bias"]
    frozen_reconstruction = torch.relu(gate) @ p["decoder"].detach() + p["decoder_bias"].detach()
    loss = (
        ((reconstruction - x) ** 2).mean()
        + config.l1_coefficient * torch.relu(gate).sum(dim=1).mean()
        + ((frozen_reconstruction - x) ** 2).mean()
    )
    return loss, z


# ---------------------------------------------------------------------------------------------------------
# Forward, loss and gradients against the references


def _batched_loss_and_gradients(name, parameters, inputs, config, state=None):
    leaves = _leaves(parameters)
    losses = training_losses(architecture(name), leaves, inputs, config, {} if state is None else state)
    losses.sum().backward()
    return losses.detach(), leaves


@pytest.mark.parametrize("name", ["topk", "batch_topk"])
def test_topk_family_matches_reference_with_and_without_dead_latents(name):
    config = _config(name, k=3, aux_k=4, aux_coefficient=0.5, dead_epochs=1)
    parameters, inputs = _batched_parameters(name, config), _inputs()
    # Latents 7 to 9 of every model cannot win: their pre-activations are pushed far down, except for a
    # small positive part so that ReLU(z_aux) is not zero and AuxK has something to train.
    parameters["encoder"][:, :, 7:] *= 0.001
    parameters["encoder_bias"][:, 7:] = torch.tensor([0.02, 0.03, 0.04], dtype=torch.float64)
    parameters["encoder_bias"][:, :7] += 10.0  # the live latents always outbid them
    state: dict[str, torch.Tensor] = {}
    losses, leaves = _batched_loss_and_gradients(name, parameters, inputs, config, state)
    dead = state["epochs_since_fired"] >= 1
    assert dead[:, 7:].all() and not dead[:, :7].any()
    latents = architecture(name).training_latents(
        parameters,
        (inputs - parameters["decoder_bias"].unsqueeze(1)) @ parameters["encoder"]
        + parameters["encoder_bias"].unsqueeze(1),
        config,
    )
    reference_loss = reference_topk_loss if name == "topk" else reference_batch_topk_loss
    reference_latents = reference_topk_latents if name == "topk" else reference_batch_topk_latents
    for model in range(MODELS):
        one = _one(parameters, model)
        loss = reference_loss(one, inputs[model], config, dead[model])
        loss.backward()
        assert abs(float(loss.detach()) - float(losses[model])) < TOLERANCE
        assert torch.allclose(
            latents[model], reference_latents(one, inputs[model], config.k)[1], atol=TOLERANCE
        )
        for key, value in one.items():
            if key == "threshold":
                continue
            assert torch.allclose(leaves[key].grad[model], value.grad, atol=TOLERANCE), key
    # The auxiliary term is really in there: without it the dead latents' weights get no gradient at all.
    _, without = _batched_loss_and_gradients(
        name, parameters, inputs, dataclasses.replace(config, aux_coefficient=0.0)
    )
    assert torch.count_nonzero(without["encoder"].grad[:, :, 7:]) == 0
    assert torch.count_nonzero(leaves["encoder"].grad[:, :, 7:]) > 0


def test_jumprelu_matches_reference_with_straight_through_threshold_gradient():
    config = _config("jumprelu", l0_coefficient=0.05, jumprelu_bandwidth=0.3)
    parameters, inputs = _batched_parameters("jumprelu", config), _inputs()
    losses, leaves = _batched_loss_and_gradients("jumprelu", parameters, inputs, config)
    latents = architecture("jumprelu").encode(parameters, inputs, config)
    for model in range(MODELS):
        loss, z, gradients = reference_jumprelu_loss_and_gradients(
            _one(parameters, model), inputs[model], config
        )
        assert abs(float(loss.detach()) - float(losses[model])) < TOLERANCE
        assert torch.allclose(latents[model], z, atol=TOLERANCE)
        for key, gradient in gradients.items():
            assert torch.allclose(leaves[key].grad[model], gradient, atol=TOLERANCE), key
    # The kernel caught samples, so the threshold's gradient is a real test.
    assert torch.count_nonzero(leaves["threshold"].grad) > LATENTS


def test_jumprelu_l0_penalty_reaches_only_the_threshold():
    """The L0 term's gradient: zero for encoder, biases and decoder; the rectangle-kernel estimate for θ."""
    config = _config("jumprelu", l0_coefficient=1.0, jumprelu_bandwidth=0.3)
    parameters, inputs = _batched_parameters("jumprelu", config), _inputs()
    _, with_penalty = _batched_loss_and_gradients("jumprelu", parameters, inputs, config)
    _, without = _batched_loss_and_gradients(
        "jumprelu", parameters, inputs, dataclasses.replace(config, l0_coefficient=0.0)
    )
    for key in ("encoder", "encoder_bias", "decoder", "decoder_bias"):
        assert torch.allclose(with_penalty[key].grad, without[key].grad, atol=TOLERANCE), key
    penalty_gradient = with_penalty["threshold"].grad - without["threshold"].grad
    threshold = parameters["threshold"]  # [model, latent]
    pre = inputs @ parameters["encoder"] + parameters["encoder_bias"].unsqueeze(1)
    inside = ((pre - threshold.unsqueeze(1)).abs() < config.jumprelu_bandwidth / 2).double()
    expected = -inside.sum(dim=1) / (SAMPLES * config.jumprelu_bandwidth)
    assert torch.allclose(penalty_gradient, expected, atol=TOLERANCE)
    assert bool((penalty_gradient <= 0).all()) and bool((penalty_gradient < 0).any())  # pushes θ up


def test_gated_matches_reference():
    config = _config("gated", l1_coefficient=0.02)
    parameters, inputs = _batched_parameters("gated", config), _inputs()
    losses, leaves = _batched_loss_and_gradients("gated", parameters, inputs, config)
    latents = architecture("gated").encode(parameters, inputs, config)
    for model in range(MODELS):
        one = _one(parameters, model)
        loss, z = reference_gated_loss(one, inputs[model], config)
        loss.backward()
        assert abs(float(loss.detach()) - float(losses[model])) < TOLERANCE
        assert torch.allclose(latents[model], z.detach(), atol=TOLERANCE)
        for key, value in one.items():
            assert torch.allclose(leaves[key].grad[model], value.grad, atol=TOLERANCE), key


def test_gated_reconstruction_sends_no_gradient_through_the_gate():
    """Without the sparsity and auxiliary terms the gate bias gets no gradient (the step passes none),
    and the auxiliary term reaches no decoder weight (it decodes with frozen copies)."""
    config = _config("gated", l1_coefficient=0.0)
    parameters, inputs = _batched_parameters("gated", config), _inputs()
    leaves = _leaves(parameters)
    chosen = architecture("gated")
    latents = chosen.encode(leaves, inputs, config)
    ((chosen.decode(leaves, latents) - inputs) ** 2).mean(dim=(1, 2)).sum().backward()
    assert leaves["encoder_bias"].grad is None or torch.count_nonzero(leaves["encoder_bias"].grad) == 0
    _, full = _batched_loss_and_gradients("gated", parameters, inputs, config)
    assert torch.allclose(full["decoder"].grad, leaves["decoder"].grad, atol=TOLERANCE)
    assert torch.count_nonzero(full["encoder_bias"].grad) > 0


# ---------------------------------------------------------------------------------------------------------
# Meaningful metrics


def _trained(name: str, epochs: int = 60, seeds=(0, 1), **fields):
    """SAEs trained by the engine on a random 'hidden layer' `[model, sample, hidden]`."""
    sae = _config(name, epochs=epochs, **fields)
    configs = [dataclasses.replace(AblationConfig(), sae=sae, curve_every=10) for _ in seeds]
    generator = torch.Generator().manual_seed(5)
    hidden = torch.relu(torch.randn(len(seeds), 120, HIDDEN, generator=generator))
    curves, parameters, (mean, std) = train_saes_on_hidden(configs, list(seeds), hidden)
    standardized = (hidden - mean.unsqueeze(1)) / std.unsqueeze(1)
    return sae, curves, parameters, standardized


def test_topk_l0_is_exactly_k_per_sample():
    config, _, parameters, standardized = _trained("topk", k=3)
    latents = architecture("topk").encode(parameters, standardized, config)
    counts = (latents > 0).sum(dim=-1)  # [model, sample]
    pre = (standardized - parameters["decoder_bias"].unsqueeze(1)) @ parameters["encoder"]
    kth = (pre + parameters["encoder_bias"].unsqueeze(1)).topk(3, dim=-1).values[..., -1]
    # Exactly k wherever the k-th largest pre-activation is positive (ReLU follows TopK), never more.
    assert bool((counts <= 3).all())
    assert torch.equal(counts[kth > 0], torch.full_like(counts[kth > 0], 3))
    assert float((kth > 0).double().mean()) > 0.95
    for model in range(2):
        if bool((kth[model] > 0).all()):
            assert l0_sparsity(latents[model]) == pytest.approx(3 / LATENTS, abs=1e-12)


@pytest.mark.parametrize("name", ["topk", "batch_topk"])
def test_topk_family_inference_codes_are_never_negative(name):
    """Where fewer than k pre-activations are positive, ReLU after the selection leaves fewer than k active
    latents rather than negative ones (Gao et al.'s TopK keeps ReLU; z > 0 is what every metric counts)."""
    config = _config(name, k=4)
    parameters = _batched_parameters(name, config)
    parameters["encoder_bias"] -= 1.5
    inputs = _inputs()
    if name == "batch_topk":
        architecture(name).after_training(parameters, inputs, config)
    latents = architecture(name).encode(parameters, inputs, config)
    assert bool((latents >= 0).all())
    assert bool(((latents > 0).sum(dim=-1) < 4).any())
    if name == "topk":
        for model in range(MODELS):
            expected = reference_topk_latents(_one(parameters, model), inputs[model], 4)[1]
            assert torch.allclose(latents[model], expected.detach(), atol=TOLERANCE)


def test_batch_topk_average_l0_is_k_and_threshold_is_the_smallest_kept_activation():
    config, curves, parameters, standardized = _trained("batch_topk", k=3)
    chosen = architecture("batch_topk")
    pre = (standardized - parameters["decoder_bias"].unsqueeze(1)) @ parameters["encoder"]
    pre = pre + parameters["encoder_bias"].unsqueeze(1)
    saved = parameters["threshold"].clone()
    training = chosen.training_latents({**parameters, "threshold": saved.clone()}, pre, config)
    # Training: k·B latents kept over the batch, so the mean L0 is exactly k.
    assert torch.equal((training > 0).sum(dim=(1, 2)), torch.full((2,), 3 * standardized.shape[1]))
    # θ (Bussmann et al.): the smallest activation the batch kept, from the trained weights.
    smallest = torch.where(training > 0, training, math.inf).flatten(1).amin(dim=1)
    assert torch.equal(saved, smallest)
    # Inference with θ on the batch θ was estimated on gives back the training code exactly.
    assert torch.equal(chosen.encode(parameters, standardized, config), training)
    # The logged L0 curve is the inference L0 and ends at k / d_sae.
    assert curves["sae_l0"][-1] == pytest.approx([3 / LATENTS] * 2, abs=0.02)


def test_auxk_counts_dead_latents_after_the_window_and_revives_them():
    config = _config("topk", k=2, aux_k=2, aux_coefficient=1.0, dead_epochs=3)
    parameters = _batched_parameters("topk", config)
    parameters["encoder"][:, :, 6:] = 0.0
    parameters["encoder_bias"][:, 6:] = 0.05  # positive but always below the live latents
    parameters["encoder_bias"][:, :6] = 5.0
    inputs = _inputs()
    state: dict[str, torch.Tensor] = {}
    chosen = architecture("topk")
    for epoch in range(1, 5):
        losses, leaves = _batched_loss_and_gradients("topk", parameters, inputs, config, state)
        assert torch.equal(state["epochs_since_fired"][:, 6:], torch.full((MODELS, 4), epoch))
        dead_gradient = leaves["encoder_bias"].grad[:, 6:]
        if epoch < config.dead_epochs:
            # Not yet dead: AuxK is off, the loss is the reconstruction error alone.
            assert torch.count_nonzero(dead_gradient) == 0, epoch
            reconstruction = chosen.decode(parameters, chosen.encode(parameters, inputs, config))
            assert torch.allclose(losses, ((reconstruction - inputs) ** 2).mean(dim=(1, 2)), atol=TOLERANCE)
        else:
            assert torch.count_nonzero(dead_gradient) > 0, epoch
    latents = architecture("topk").encode(parameters, inputs, config)
    assert dead_latents(latents[0]) == pytest.approx(4 / LATENTS)
    # A latent that fires again is alive: its count resets.
    parameters["encoder_bias"][:, 6] = 50.0
    _batched_loss_and_gradients("topk", parameters, inputs, config, state)
    assert bool((state["epochs_since_fired"][:, 6] == 0).all())


@pytest.mark.parametrize("name", NEW_ARCHITECTURES)
def test_unit_norm_decoder_update_and_gradient_projection(name):
    config = _config(name)
    parameters = _leaves(_batched_parameters(name, config))
    parameters["decoder"].grad = torch.randn_like(parameters["decoder"])
    before_update(architecture(name), parameters)
    # The gradient left is orthogonal to every decoder row.
    assert (parameters["decoder"].grad * parameters["decoder"]).sum(dim=-1).abs().max() < 1e-12
    with torch.no_grad():
        parameters["decoder"].mul_(3.0)
        parameters["decoder"][0, 0] = 0.0  # a failed model's zeroed row stays zero, not NaN
    after_update(architecture(name), parameters)
    norms = parameters["decoder"].norm(dim=-1)
    assert torch.allclose(norms[1:], torch.ones_like(norms[1:]))
    assert norms[0, 0] == 0 and torch.allclose(norms[0, 1:], torch.ones_like(norms[0, 1:]))


def test_only_batch_topk_threshold_is_left_to_the_architecture():
    config = _config("batch_topk")
    parameters = _batched_parameters("batch_topk", config)
    trained = trained_parameters(architecture("batch_topk"), parameters)
    assert len(trained) == len(parameters) - 1 and all(
        value is not parameters["threshold"] for value in trained
    )
    for name in ("topk", "jumprelu", "gated"):
        assert len(trained_parameters(architecture(name), _batched_parameters(name, _config(name)))) == len(
            _batched_parameters(name, _config(name))
        )


# ---------------------------------------------------------------------------------------------------------
# The engine: registry, config, training, checkpoints


def test_registry_and_config():
    assert set(NEW_ARCHITECTURES) <= set(ARCHITECTURES)
    assert SAEConfig(architecture="leaky_relu", d_sae=2).k == 4  # k matters only for the TopK family
    with pytest.raises(ConfigError, match="sae.k must be <= sae.d_sae"):
        SAEConfig(architecture="topk", d_sae=3, k=4)
    for field, value in (
        ("k", 0),
        ("aux_coefficient", -1.0),
        ("jumprelu_bandwidth", 0.0),
        ("dead_epochs", 0),
    ):
        with pytest.raises(ConfigError, match=f"sae.{field}"):
            SAEConfig(**{field: value})
    # New settings at their defaults leave the hash of every existing configuration as it was.
    assert AblationConfig().hash() == dataclasses.replace(AblationConfig(), sae=SAEConfig()).hash()
    changed = dataclasses.replace(AblationConfig(), sae=SAEConfig(k=5))
    assert changed.hash() != AblationConfig().hash()


@pytest.mark.parametrize("name", NEW_ARCHITECTURES)
def test_engine_training_follows_the_reference_with_adam(name):
    """train_saes_on_hidden for 4 epochs on 2 seeds = the reference loss with torch.optim.Adam, gradient
    projection and row renormalization, seed by seed (float32: 1e-5)."""
    epochs = 4
    sae = _config(name, epochs=epochs, k=3, dead_epochs=1, aux_coefficient=0.5, l1_coefficient=0.01)
    configs = [dataclasses.replace(AblationConfig(), sae=sae, curve_every=2) for _ in range(2)]
    generator = torch.Generator().manual_seed(3)
    hidden = torch.relu(torch.randn(2, 30, HIDDEN, generator=generator) + 0.2)
    _, trained, _ = train_saes_on_hidden(configs, [0, 1], hidden)
    mean, std = standardization(hidden)
    chosen = architecture(name)
    for model, seed in enumerate([0, 1]):
        x = ((hidden[model] - mean[model]) / std[model]).double()
        initial = chosen.initial_parameters(HIDDEN, LATENTS, sae, generator_for(seed, "sae"))
        p = {key: value.double().requires_grad_() for key, value in initial.items()}
        adam_parameters = [
            value for key, value in p.items() if not (name == "batch_topk" and key == "threshold")
        ]
        optimizer = torch.optim.Adam(adam_parameters, lr=sae.lr)
        since = torch.zeros(LATENTS, dtype=torch.long)
        for _ in range(epochs):
            optimizer.zero_grad()
            if name in ("topk", "batch_topk"):
                latents = (
                    reference_topk_latents(p, x, sae.k)[1]
                    if name == "topk"
                    else reference_batch_topk_latents(p, x, sae.k)[1]
                )
                since = torch.where((latents.detach() > 0).any(dim=0), 0, since + 1)
                reference = reference_topk_loss if name == "topk" else reference_batch_topk_loss
                reference(p, x, sae, since >= sae.dead_epochs).backward()
            elif name == "jumprelu":
                _, _, gradients = reference_jumprelu_loss_and_gradients(p, x, sae)
                p["threshold"].grad = gradients["threshold"]
            else:
                reference_gated_loss(p, x, sae)[0].backward()
            with torch.no_grad():
                unit = p["decoder"] / p["decoder"].norm(dim=1, keepdim=True)
                p["decoder"].grad -= unit * (p["decoder"].grad * unit).sum(dim=1, keepdim=True)
                optimizer.step()
                p["decoder"] /= p["decoder"].norm(dim=1, keepdim=True)
                if name == "jumprelu":
                    p["threshold"].clamp_(min=0.0)
        if name == "batch_topk":
            p["threshold"] = reference_batch_topk_latents(p, x, sae.k)[2]
        for key, value in p.items():
            assert torch.allclose(trained[key][model].double(), value.detach(), atol=1e-5), (name, key)


@pytest.mark.parametrize("name", NEW_ARCHITECTURES)
def test_checkpoint_round_trip_and_after_training(name):
    from pipeline.models import MLP
    from pipeline.sae import SparseAutoencoder

    config = dataclasses.replace(AblationConfig(), sae=SAEConfig(architecture=name))
    hidden = config.network.hidden_dim
    chosen = architecture(name)
    batched = {
        key: value.unsqueeze(0)
        for key, value in chosen.initial_parameters(
            hidden, config.sae.d_sae, config.sae, torch.Generator()
        ).items()
    }
    after_training(chosen, batched, torch.randn(1, 9, hidden), config.sae)
    parameters = {key: value[0] for key, value in batched.items()}
    if name == "batch_topk":
        assert float(parameters["threshold"]) > 0  # set from the inputs, and stored with the weights
    sae = SparseAutoencoder(config.sae, parameters, torch.zeros(hidden), torch.ones(hidden))
    network = MLP(8, hidden, config.network.hidden_layers, "relu")
    _, _, _, loaded = load_checkpoint(checkpoint(config, 0, network, sae))
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------------
# SAELens, where installed: forward pass and loss on identical weights
#
# Conventions mapped (SAELens 6.x): its reconstruction error sums over the hidden units where ours averages,
# so its losses are HIDDEN times ours once its sparsity coefficients are HIDDEN times ours; its JumpReLU
# keeps its θ in float32 whatever the SAE's dtype (hence 1e-6 there); its AuxK always takes hidden // 2
# dead latents, scales the loss down when fewer are dead and applies no ReLU to them, so the case below
# has at least hidden // 2 dead latents with positive pre-activations, where the two definitions agree;
# its Gated auxiliary loss decodes with the live decoder (the paper freezes it), which changes no value
# and only the decoder's gradients, which are therefore not compared.


def _saelens_step(sae, inputs: torch.Tensor, coefficients: dict, dead: torch.Tensor | None = None):
    from sae_lens.saes.sae import TrainStepInput

    step = TrainStepInput(
        sae_in=inputs,
        coefficients=coefficients,
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )
    return sae.training_forward_pass(step)


def _load_into(sae, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            getattr(sae, name).copy_(value)


@pytest.mark.parametrize("name", ["topk", "batch_topk"])
def test_topk_family_equals_saelens(name):
    saes = pytest.importorskip("sae_lens.saes")
    config = _config(name, k=3, aux_k=HIDDEN // 2, aux_coefficient=0.5, dead_epochs=1)
    parameters, inputs = _batched_parameters(name, config), _inputs()
    parameters["encoder"][:, :, 6:] *= 0.001
    parameters["encoder_bias"][:, 6:] = torch.linspace(0.02, 0.05, 4, dtype=torch.float64)
    parameters["encoder_bias"][:, :6] += 10.0
    state: dict[str, torch.Tensor] = {}
    losses, leaves = _batched_loss_and_gradients(name, parameters, inputs, config, state)
    dead = state["epochs_since_fired"] >= 1
    assert int(dead[0].sum()) >= HIDDEN // 2
    chosen = architecture(name)
    ours = chosen.encode(parameters, inputs, config) if name == "topk" else None
    for model in range(MODELS):
        shared = dict(d_in=HIDDEN, d_sae=LATENTS, dtype="float64", rescale_acts_by_decoder_norm=False)
        if name == "topk":
            sae = saes.TopKTrainingSAE(saes.TopKTrainingSAEConfig(k=3, aux_loss_coefficient=0.5, **shared))
        else:
            sae = saes.BatchTopKTrainingSAE(
                saes.BatchTopKTrainingSAEConfig(
                    k=3, aux_loss_coefficient=0.5, topk_threshold_lr=1.0, **shared
                )
            )
        _load_into(
            sae,
            {
                "W_enc": parameters["encoder"][model],
                "b_enc": parameters["encoder_bias"][model],
                "W_dec": parameters["decoder"][model],
                "b_dec": parameters["decoder_bias"][model],
            },
        )
        output = _saelens_step(sae, inputs[model], {}, dead[model])
        assert float(output.loss.detach()) == pytest.approx(HIDDEN * float(losses[model]), rel=1e-10)
        output.loss.backward()
        for theirs, key in (
            ("W_enc", "encoder"),
            ("b_enc", "encoder_bias"),
            ("W_dec", "decoder"),
            ("b_dec", "decoder_bias"),
        ):
            assert torch.allclose(getattr(sae, theirs).grad, HIDDEN * leaves[key].grad[model], atol=1e-9), key
        if name == "topk":
            assert torch.allclose(output.feature_acts, ours[model], atol=TOLERANCE)
            assert torch.allclose(sae.encode(inputs[model]), ours[model], atol=TOLERANCE)
        else:
            # Its threshold, with the moving average's rate at 1, is the batch's smallest kept activation.
            assert float(sae.topk_threshold) == pytest.approx(
                float(leaves["threshold"][model].detach()), rel=1e-12
            )


def test_jumprelu_equals_saelens():
    saes = pytest.importorskip("sae_lens.saes")
    config = _config("jumprelu", l0_coefficient=0.05, jumprelu_bandwidth=0.3)
    parameters, inputs = _batched_parameters("jumprelu", config), _inputs()
    losses, leaves = _batched_loss_and_gradients("jumprelu", parameters, inputs, config)
    for model in range(MODELS):
        sae = saes.JumpReLUTrainingSAE(
            saes.JumpReLUTrainingSAEConfig(
                d_in=HIDDEN,
                d_sae=LATENTS,
                dtype="float64",
                apply_b_dec_to_input=False,
                jumprelu_bandwidth=config.jumprelu_bandwidth,
                l0_coefficient=HIDDEN * config.l0_coefficient,
            )
        )
        threshold = parameters["threshold"][model]
        _load_into(
            sae,
            {
                "W_enc": parameters["encoder"][model],
                "b_enc": parameters["encoder_bias"][model],
                "W_dec": parameters["decoder"][model],
                "b_dec": parameters["decoder_bias"][model],
                "threshold": threshold,
            },
        )
        # Its threshold is float32 whatever the SAE's dtype (ours is float64 here): hence 1e-6.
        output = _saelens_step(sae, inputs[model], {"l0": HIDDEN * config.l0_coefficient})
        assert float(output.loss.detach()) == pytest.approx(HIDDEN * float(losses[model]), rel=1e-6)
        ours = architecture("jumprelu").encode(parameters, inputs, config)[model]
        assert torch.allclose(output.feature_acts, ours, atol=1e-6)
        output.loss.backward()
        for theirs, key in (("W_enc", "encoder"), ("b_enc", "encoder_bias"), ("W_dec", "decoder")):
            assert torch.allclose(getattr(sae, theirs).grad, HIDDEN * leaves[key].grad[model], atol=1e-6), key
        expected = HIDDEN * leaves["threshold"].grad[model]
        assert torch.allclose(sae.threshold.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_gated_equals_saelens():
    saes = pytest.importorskip("sae_lens.saes")
    config = _config("gated", l1_coefficient=0.02)
    parameters, inputs = _batched_parameters("gated", config), _inputs()
    losses, leaves = _batched_loss_and_gradients("gated", parameters, inputs, config)
    ours = architecture("gated").encode(parameters, inputs, config)
    for model in range(MODELS):
        sae = saes.GatedTrainingSAE(
            saes.GatedTrainingSAEConfig(
                d_in=HIDDEN, d_sae=LATENTS, dtype="float64", l1_coefficient=HIDDEN * config.l1_coefficient
            )
        )
        _load_into(
            sae,
            {
                "W_enc": parameters["encoder"][model],
                "b_gate": parameters["encoder_bias"][model],
                "r_mag": parameters["magnitude_log_scale"][model],
                "b_mag": parameters["magnitude_bias"][model],
                "W_dec": parameters["decoder"][model],
                "b_dec": parameters["decoder_bias"][model],
            },
        )
        output = _saelens_step(sae, inputs[model], {"l1": HIDDEN * config.l1_coefficient})
        assert float(output.loss.detach()) == pytest.approx(HIDDEN * float(losses[model]), rel=1e-10)
        assert torch.allclose(output.feature_acts, ours[model], atol=TOLERANCE)
        output.loss.backward()
        for theirs, key in (
            ("W_enc", "encoder"),
            ("b_gate", "encoder_bias"),
            ("r_mag", "magnitude_log_scale"),
            ("b_mag", "magnitude_bias"),
        ):
            assert torch.allclose(getattr(sae, theirs).grad, HIDDEN * leaves[key].grad[model], atol=1e-9), key


@pytest.mark.parametrize("name", NEW_ARCHITECTURES)
def test_an_sae_is_the_same_alone_beside_others_and_on_a_rerun(name):
    """Per-model selections (BatchTopK's batch, AuxK's dead latents) never reach across models, and a
    rerun of the same config and seed gives identical weights on the CPU."""
    sae = _config(name, epochs=30, k=1, dead_epochs=2, aux_coefficient=1.0)
    configs = [dataclasses.replace(AblationConfig(), sae=sae, curve_every=10)] * 3
    hidden = torch.relu(torch.randn(3, 50, HIDDEN, generator=torch.Generator().manual_seed(4)))
    _, together, _ = train_saes_on_hidden(configs, [0, 1, 2], hidden)
    _, alone, _ = train_saes_on_hidden(configs[:1], [1], hidden[1:2])
    _, again, _ = train_saes_on_hidden(configs[:1], [1], hidden[1:2])
    for key in together:
        assert torch.allclose(together[key][1], alone[key][0], atol=1e-6), key
        assert torch.equal(alone[key], again[key]), key


def test_jumprelu_threshold_is_kept_non_negative():
    config = _config("jumprelu")
    parameters = _batched_parameters("jumprelu", config)
    parameters["threshold"][:, :3] = -0.5
    after_update(architecture("jumprelu"), parameters)
    assert bool((parameters["threshold"][:, :3] == 0).all()) and bool(
        (parameters["threshold"][:, 3:] > 0).all()
    )
