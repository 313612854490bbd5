"""The batched network training of `train_pass` against plain torch: nn.Linear, autograd and torch.optim.Adam.

Only the random numbers are shared with the pipeline (data, initial parameters and noise come from the
project's own generators); the forward pass, the loss with its regularization, the gradients and the
optimizer are written here independently, one model at a time. docs/science.md §1.2 defines the forms:
l1 = λ·Σ|W| over weight matrices in the loss, l2 decay = Adam `weight_decay=λ` (coupled, on every
parameter, biases included), l2 penalty = λ·ΣW² over weight matrices in the loss.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig
from pipeline.data import generator_for, make_dataset, numpy_generator_for
from pipeline.models import ACTIVATION_FUNCTIONS, initial_parameters, layer_dims
from pipeline.train import NOISE_CHUNK_EPOCHS, fill_unit_noise, train_pass

REGULARIZATIONS = [("l1", "decay"), ("l2", "decay"), ("l2", "penalty")]
ACTIVATIONS = ["relu", "gelu"]
NOISE_KINDS = ["bipolar", "positive_kurtosis"]
PARAMETER_TOLERANCE = 5e-6


def reference_config(**network_fields) -> AblationConfig:
    """Published shape (8 → 12 ×4 → 8), few samples; λ and lr large enough that 60 steps of each form
    move the parameters far beyond the comparison tolerance."""
    fields = {"epochs": 60, "lambda_reg": 0.01, "lr": 1e-2, **network_fields}
    return AblationConfig(
        data=DataConfig(samples=40),
        network=NetworkConfig(**fields),
        sae=SAEConfig(epochs=1),
        curve_every=20,
        metric_null_draws=2,
    )


def reference_noise(config: AblationConfig, seed: int, train_samples: int) -> list[torch.Tensor]:
    """The per-epoch last-hidden noise `[sample, hidden]` of one model, from the pipeline's noise stream.

    The pipeline draws unit noise NOISE_CHUNK_EPOCHS epochs at a time, each chunk `[epoch, hidden, sample]`
    from the (seed, noise kind) generator; the same calls here give the same numbers.
    """
    network = config.network
    if network.noise == "none":
        return [torch.zeros(train_samples, network.hidden_dim)] * network.epochs
    generator = numpy_generator_for(seed, f"noise_{network.noise}")
    per_epoch: list[torch.Tensor] = []
    for start in range(0, network.epochs, NOISE_CHUNK_EPOCHS):
        count = min(NOISE_CHUNK_EPOCHS, network.epochs - start)
        chunk = fill_unit_noise(
            network.noise, torch.empty(count, network.hidden_dim, train_samples), generator
        )
        per_epoch.extend(epoch_noise.T * network.sigma for epoch_noise in chunk)
    return per_epoch


def reference_training(config: AblationConfig, seed: int) -> tuple[nn.ModuleList, dict[str, list[float]]]:
    """Train one model with nn.Linear + autograd + torch.optim.Adam; returns the layers and the curves."""
    network = config.network
    dataset = make_dataset(config.data, seed)
    dims = layer_dims(config.data.features, network.hidden_dim, network.hidden_layers)
    # Same initial numbers as the pipeline: its init stream, read through its initializer.
    weights, biases = initial_parameters(network.init, dims, generator_for(seed, "init"))
    layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
    with torch.no_grad():
        for layer, weight, bias in zip(layers, weights, biases, strict=True):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    activation = ACTIVATION_FUNCTIONS[network.act]

    def forward(inputs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        hidden = inputs
        for layer in layers[:-1]:
            hidden = activation(layer(hidden))
        if noise is not None:
            hidden = hidden + noise
        return layers[-1](hidden)

    decay = network.lambda_reg if network.reg == "l2" and network.l2_form == "decay" else 0.0
    optimizer = torch.optim.Adam(layers.parameters(), lr=network.lr, weight_decay=decay)
    weight_matrices = [layer.weight for layer in layers]
    noise = reference_noise(config, seed, dataset.train_inputs.shape[0])
    curves: dict[str, list[float]] = {"epoch": [], "train_mse": [], "val_mse": []}
    for epoch in range(network.epochs):
        loss = nn.functional.mse_loss(forward(dataset.train_inputs, noise[epoch]), dataset.train_targets)
        if network.reg == "l1":
            loss = loss + network.lambda_reg * sum(weight.abs().sum() for weight in weight_matrices)
        elif network.reg == "l2" and network.l2_form == "penalty":
            loss = loss + network.lambda_reg * sum(weight.square().sum() for weight in weight_matrices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % config.curve_every == 0 or epoch + 1 == network.epochs:
            with torch.no_grad():
                curves["epoch"].append(epoch + 1)
                for name, inputs, targets in (
                    ("train_mse", dataset.train_inputs, dataset.train_targets),
                    ("val_mse", dataset.validation_inputs, dataset.validation_targets),
                ):
                    curves[name].append(nn.functional.mse_loss(forward(inputs), targets).item())
    return layers, curves


def assert_matches_reference(result, layers: nn.ModuleList, curves: dict[str, list[float]]) -> None:
    """Final parameters and the train/validation curves of a `SeedResult` equal the reference's."""
    state = result.network.state_dict()
    for index, layer in enumerate(layers):
        # Float32 rounding differs between the batched GEMMs and nn.Linear; after 60 Adam steps the two
        # agree to below 1e-6 (measured), while every form moves the parameters by ~1e-1.
        torch.testing.assert_close(
            state[f"layers.{index}.weight"], layer.weight.detach(), atol=PARAMETER_TOLERANCE, rtol=0
        )
        torch.testing.assert_close(
            state[f"layers.{index}.bias"], layer.bias.detach(), atol=PARAMETER_TOLERANCE, rtol=0
        )
    network_curves = result.curves["network"]
    assert network_curves["epoch"] == curves["epoch"]
    for name in ("train_mse", "val_mse"):
        assert network_curves[name] == pytest.approx(curves[name], rel=1e-4, abs=1e-6), name


FACTORIAL = [
    {"reg": reg, "l2_form": form, "act": act, "noise": noise}
    for (reg, form), act, noise in itertools.product(REGULARIZATIONS, ACTIVATIONS, NOISE_KINDS)
]


def test_batched_training_matches_plain_torch_for_every_form_activation_and_noise():
    # All twelve (reg form, act, noise) cells in one pass, alternating init and seed, so the batched slicing
    # (activation runs, per-model λ, decay and noise streams) is exercised together with each formula.
    configs = [
        reference_config(init="orthogonal" if index % 2 else "random", **fields)
        for index, fields in enumerate(FACTORIAL)
    ]
    seeds = [index % 3 for index in range(len(configs))]
    results = train_pass(configs, seeds)
    for config, seed, result in zip(configs, seeds, results, strict=True):
        assert result.finished, result.failure
        layers, curves = reference_training(config, seed)
        assert_matches_reference(result, layers, curves)
