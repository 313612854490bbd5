"""The composed training engine against plain torch, and the initial weights against their laws.

The engine writes its own batched forward, backward, regularization terms and Adam. Each test here builds
the same computation from torch's own pieces (nn.Linear, autograd, torch.optim.Adam) from the same random
numbers, so a defect anywhere in the composition (a penalty on the biases, decay missing on the biases, a
wrong noise layout, a halved init bound) shows up as a difference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig
from pipeline.data import generator_for, make_dataset, numpy_generator_for
from pipeline.models import initial_parameters, layer_dims
from pipeline.train import NOISE_CHUNK_EPOCHS, fill_unit_noise, train_pass

EPOCHS = 60
# Large enough that a penalty on the biases, or decay missing on them, moves the result far past rounding.
STRENGTH = 2e-2


def _config(reg: str, l2_form: str, act: str, noise: str, init: str = "random") -> AblationConfig:
    return AblationConfig(
        data=DataConfig(samples=64),
        network=NetworkConfig(
            init=init,
            noise=noise,
            reg=reg,
            act=act,
            l2_form=l2_form,
            lambda_reg=STRENGTH,
            sigma=0.3,
            hidden_dim=6,
            hidden_layers=2,
            lr=1e-2,
            epochs=EPOCHS,
        ),
        sae=SAEConfig(epochs=1, d_sae=4),
    )


def _reference_network(config: AblationConfig, seed: int) -> list[nn.Linear]:
    """Full-batch training written with torch's own modules, autograd and Adam."""
    network = config.network
    dims = layer_dims(config.data.features, network.hidden_dim, network.hidden_layers)
    weights, biases = initial_parameters(network.init, dims, generator_for(seed, "init"))
    layers = [nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)]
    with torch.no_grad():
        for layer, weight, bias in zip(layers, weights, biases, strict=True):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    parameters = [parameter for layer in layers for parameter in layer.parameters()]
    decay = network.lambda_reg if network.reg == "l2" and network.l2_form == "decay" else 0.0
    optimizer = torch.optim.Adam(parameters, lr=network.lr, weight_decay=decay)
    dataset = make_dataset(config.data, seed)
    inputs, targets = dataset.train_inputs, dataset.train_targets
    activation = {"relu": torch.relu, "gelu": nn.functional.gelu}[network.act]
    # The engine's noise stream: unit draws of shape [epoch, hidden, sample], NOISE_CHUNK_EPOCHS at a time.
    stream = numpy_generator_for(seed, f"noise_{network.noise}")
    chunk = None
    for epoch in range(network.epochs):
        if epoch % NOISE_CHUNK_EPOCHS == 0:
            count = min(NOISE_CHUNK_EPOCHS, network.epochs - epoch)
            chunk = fill_unit_noise(
                network.noise, torch.empty(count, network.hidden_dim, len(inputs)), stream
            )
        hidden = inputs
        for layer in layers[:-1]:
            hidden = activation(layer(hidden))
        hidden = hidden + network.sigma * chunk[epoch % NOISE_CHUNK_EPOCHS].t()
        loss = ((layers[-1](hidden) - targets) ** 2).mean()
        weight_matrices = [layer.weight for layer in layers]
        if network.reg == "l1":
            loss = loss + network.lambda_reg * sum(weight.abs().sum() for weight in weight_matrices)
        elif network.reg == "l2" and network.l2_form == "penalty":
            loss = loss + network.lambda_reg * sum(weight.square().sum() for weight in weight_matrices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layers


@pytest.mark.parametrize("noise", ["bipolar", "positive_kurtosis"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize(("reg", "l2_form"), [("l1", "decay"), ("l2", "decay"), ("l2", "penalty")])
def test_engine_equals_torch_autograd_and_adam(reg, l2_form, act, noise):
    config = _config(reg, l2_form, act, noise)
    seed = 5
    trained = train_pass([config], [seed])[0].network
    reference = _reference_network(config, seed)
    for ours, theirs in zip(trained.layers, reference, strict=True):
        assert torch.allclose(ours.weight, theirs.weight, atol=2e-5, rtol=1e-4)
        assert torch.allclose(ours.bias, theirs.bias, atol=2e-5, rtol=1e-4)


def test_the_reference_can_tell_the_regularization_forms_apart():
    """The comparison above is only worth something if each form leaves its own mark at this strength."""
    seed = 5
    finals = {}
    for reg, form in (("l1", "decay"), ("l2", "decay"), ("l2", "penalty"), ("none", "decay")):
        layers = _reference_network(_config(reg, form, "relu", "bipolar"), seed)
        finals[(reg, form)] = torch.cat(
            [p.detach().flatten() for layer in layers for p in layer.parameters()]
        )
    keys = list(finals)
    for index, first in enumerate(keys):
        for second in keys[index + 1 :]:
            assert (finals[first] - finals[second]).abs().max() > 1e-3, (first, second)


# --------------------------------------------------------------------------------------------------
# Initial weights against their laws
# --------------------------------------------------------------------------------------------------


def test_random_init_is_torch_default_uniform():
    """W, b ~ U(−1/√fan_in, 1/√fan_in): what torch.nn.Linear draws by default (kaiming_uniform, a = √5)."""
    dims = layer_dims(8, 12, 4)
    scaled_weights, scaled_biases = [], []
    for seed in range(60):
        weights, biases = initial_parameters("random", dims, generator_for(seed, "init"))
        for weight, bias in zip(weights, biases, strict=True):
            bound = 1 / math.sqrt(weight.shape[1])
            scaled_weights.append((weight / bound).flatten())
            scaled_biases.append((bias / bound).flatten())
    uniform = scipy.stats.uniform(loc=-1, scale=2).cdf
    for sample in (torch.cat(scaled_weights).numpy(), torch.cat(scaled_biases).numpy()):
        assert scipy.stats.kstest(sample, uniform).pvalue > 1e-3
        # Half the bound would be U(−½, ½) here: rejected beyond doubt.
        assert scipy.stats.kstest(sample, scipy.stats.uniform(loc=-0.5, scale=1).cdf).pvalue < 1e-12
    # The same law as torch's own default init of nn.Linear, compared directly.
    torch_weights = torch.cat(
        [nn.Linear(12, 12).weight.detach().flatten() * math.sqrt(12) for _ in range(60)]
    )
    assert scipy.stats.ks_2samp(torch.cat(scaled_weights).numpy(), torch_weights.numpy()).pvalue > 1e-3


def test_orthogonal_init_has_gain_root_two_and_zero_biases():
    dims = layer_dims(8, 12, 4)
    entries = []
    for seed in range(40):
        weights, biases = initial_parameters("orthogonal", dims, generator_for(seed, "init"))
        for weight, bias in zip(weights, biases, strict=True):
            singular_values = torch.linalg.svdvals(weight.double())
            assert torch.allclose(singular_values, torch.full_like(singular_values, math.sqrt(2)), atol=1e-5)
            assert torch.equal(bias, torch.zeros_like(bias))
        entries.append(weights[1].flatten())
    # A random orthogonal 12 × 12 matrix times √2 has entries of variance 2/12, nearly normal.
    sample = torch.cat(entries).numpy() / math.sqrt(2 / 12)
    assert abs(np.var(sample) - 1) < 0.05
    assert scipy.stats.kstest(sample, "norm").pvalue > 1e-4
