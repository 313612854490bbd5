"""The elastic-net penalty and gradient clipping, on both engines, against plain torch.

The reference trains one model at a time with autograd, torch.optim.Adam and
torch.nn.utils.clip_grad_norm_; only the random numbers are shared with the pipeline (data, initial
parameters, noise, as in tests/test_training_reference.py). The network's forward pass and loss are
written here; an SAE's objective is the registry's own (`pipeline.sae.training_losses`, checked against
independent implementations in tests/test_sae_architectures.py) evaluated on one unbatched SAE, so what is
checked here is what the options add: the penalty's and the clip's arithmetic per model inside a batch,
their order relative to Adam's coupled decay and the unit-norm projection, and that they stay per model.

The forms (docs/science.md §1.2 and pipeline/config.py): elastic = λ·(α·Σ|W| + (1−α)·ΣW²) over the weight
matrices; clipping scales a model's whole gradient of a stage (penalties included, Adam's coupled decay
not: torch.optim.Adam adds it inside its step, after the clip) by min(1, c/(‖g‖₂ + 1e-6)).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pipeline import fused
from pipeline import sae as sae_architectures
from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig, pass_key
from pipeline.config_tools import ConfigError
from pipeline.data import generator_for, make_dataset
from pipeline.models import ACTIVATION_FUNCTIONS, initial_parameters, layer_dims
from pipeline.train import train_pass, train_saes_on_hidden
from tests.test_training_reference import reference_noise

ENGINES = ["torch", "fused"] if fused.numba is not None else ["torch"]
# Measured gaps to the reference (both engines): networks after 60 steps at most 1.0e-6, SAEs after 40 steps
# at most 1.1e-6 (the tied SAE on raw inputs; the others 4e-7), as without the options
# (tests/test_training_reference.py). About 5× and 9× that is allowed.
NETWORK_TOLERANCE = 5e-6
SAE_TOLERANCE = 1e-5
# Clipping that binds often but not always: in these tests the networks' gradient norms run from 0.02 to
# 0.5 (the clip binds in 12 to 60 of the 60 steps, by case), the SAEs' from 0.04 to 1 (35 to 40 of 40).
CLIP = 0.05


def network_config(**network_fields) -> AblationConfig:
    """Published shape, 40 samples, 60 epochs; λ and lr large enough to move every parameter far beyond
    the tolerance (as tests/test_training_reference.py)."""
    fields = {"epochs": 60, "lambda_reg": 0.01, "lr": 1e-2, **network_fields}
    return AblationConfig(
        data=DataConfig(samples=40),
        network=NetworkConfig(**fields),
        sae=SAEConfig(epochs=1),
        curve_every=20,
        metric_null_draws=2,
    )


def reference_network(config: AblationConfig, seed: int) -> nn.ModuleList:
    """One network trained with nn.Linear, autograd, torch.optim.Adam and clip_grad_norm_."""
    network = config.network
    dataset = make_dataset(config.data, seed)
    dims = layer_dims(config.data.features, network.hidden_dim, network.hidden_layers)
    weights, biases = initial_parameters(network.init, dims, generator_for(seed, "init"))
    layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
    with torch.no_grad():
        for layer, weight, bias in zip(layers, weights, biases, strict=True):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    activation = ACTIVATION_FUNCTIONS[network.act]
    decay = network.lambda_reg if network.reg == "l2" and network.l2_form == "decay" else 0.0
    optimizer = torch.optim.Adam(layers.parameters(), lr=network.lr, weight_decay=decay)
    noise = reference_noise(config, seed, dataset.train_inputs.shape[0])
    strength, alpha = network.lambda_reg, network.elastic_alpha
    for epoch in range(network.epochs):
        hidden = dataset.train_inputs
        for layer in layers[:-1]:
            hidden = activation(layer(hidden))
        outputs = layers[-1](hidden + noise[epoch])
        loss = nn.functional.mse_loss(outputs, dataset.train_targets)
        absolute = sum(layer.weight.abs().sum() for layer in layers)
        squares = sum(layer.weight.square().sum() for layer in layers)
        if network.reg == "l1":
            loss = loss + strength * absolute
        elif network.reg == "l2" and network.l2_form == "penalty":
            loss = loss + strength * squares
        elif network.reg == "elastic":
            loss = loss + strength * (alpha * absolute + (1 - alpha) * squares)
        optimizer.zero_grad()
        loss.backward()
        if network.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(layers.parameters(), network.grad_clip)
        optimizer.step()
    return layers


def network_gap(result, layers: nn.ModuleList) -> float:
    state = result.network.state_dict()
    return max(
        max(
            (state[f"layers.{index}.weight"] - layer.weight.detach()).abs().max().item(),
            (state[f"layers.{index}.bias"] - layer.bias.detach()).abs().max().item(),
        )
        for index, layer in enumerate(layers)
    )


def assert_same_results(first, second) -> None:
    """Two SeedResults with equal parameters (network and SAE) and curves, bit for bit."""
    assert first.finished and second.finished, (first.failure, second.failure)
    for module in ("network", "sae"):
        first_state, second_state = getattr(first, module).state_dict(), getattr(second, module).state_dict()
        for name, value in first_state.items():
            assert torch.equal(second_state[name], value), (module, name)
    assert first.curves == second.curves


# Every form with and without clipping, both activations, one pass: per-model λ, α, c and decay together.
NETWORK_CASES = [
    {"reg": "elastic", "elastic_alpha": 0.3},
    {"reg": "elastic", "elastic_alpha": 0.7, "grad_clip": CLIP, "act": "gelu"},
    {"reg": "elastic", "elastic_alpha": 0.3, "grad_clip": CLIP, "noise": "positive_kurtosis"},
    {"reg": "l1", "grad_clip": CLIP},
    {"reg": "l2", "l2_form": "penalty", "grad_clip": CLIP, "act": "gelu"},
    # The coupled decay comes after the clip, as in torch.optim.Adam(weight_decay=λ) after clip_grad_norm_.
    {"reg": "l2", "l2_form": "decay", "grad_clip": CLIP, "lambda_reg": 0.1},
    {"reg": "none", "grad_clip": 2 * CLIP, "init": "orthogonal"},
]


@pytest.mark.parametrize("engine", ENGINES)
def test_networks_match_plain_torch_with_elastic_net_and_clipping(monkeypatch, engine):
    monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
    configs = [network_config(**fields) for fields in NETWORK_CASES]
    seeds = [index % 2 for index in range(len(configs))]
    results = train_pass(configs, seeds)
    for config, seed, result in zip(configs, seeds, results, strict=True):
        assert result.finished, result.failure
        gap = network_gap(result, reference_network(config, seed))
        assert gap <= NETWORK_TOLERANCE, (config.network, gap)


def test_the_options_change_the_training(monkeypatch):
    # The comparisons above would pass vacuously if clipping never bound or α did not matter.
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "torch")
    plain = network_config(reg="elastic", elastic_alpha=0.3)
    clipped = network_config(reg="elastic", elastic_alpha=0.3, grad_clip=CLIP)
    other_alpha = network_config(reg="elastic", elastic_alpha=0.7)
    results = train_pass([plain, clipped, other_alpha], [0, 0, 0])
    for other in results[1:]:
        gap = max(
            (value - other.network.state_dict()[name]).abs().max().item()
            for name, value in results[0].network.state_dict().items()
        )
        assert gap > 100 * NETWORK_TOLERANCE


@pytest.mark.parametrize("engine", ENGINES)
def test_elastic_net_at_the_ends_of_alpha_is_the_l1_and_the_l2_penalty_form(monkeypatch, engine):
    # λα and λ(1 − α) are exactly λ and 0 at the ends, so the engines compute the same numbers.
    monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
    configs = [
        network_config(reg="elastic", elastic_alpha=1.0),
        network_config(reg="l1"),
        network_config(reg="elastic", elastic_alpha=0.0, act="gelu"),
        network_config(reg="l2", l2_form="penalty", act="gelu"),
    ]
    results = train_pass(configs, [3, 3, 3, 3])
    assert_same_results(results[0], results[1])
    assert_same_results(results[2], results[3])


@pytest.mark.parametrize("engine", ENGINES)
def test_clipping_at_a_huge_norm_is_no_clipping(monkeypatch, engine):
    monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
    base = network_config(reg="elastic", act="gelu")
    huge = dataclasses.replace(
        base,
        network=dataclasses.replace(base.network, grad_clip=1e30),
        sae=dataclasses.replace(base.sae, grad_clip=1e30, epochs=30),
    )
    base = dataclasses.replace(base, sae=dataclasses.replace(base.sae, epochs=30))
    results = train_pass([base, huge], [1, 1])
    assert_same_results(results[0], results[1])


def test_a_model_alone_equals_the_same_model_in_a_batch(monkeypatch):
    target = network_config(reg="elastic", elastic_alpha=0.3, grad_clip=CLIP, act="gelu")
    target = dataclasses.replace(target, sae=dataclasses.replace(target.sae, grad_clip=CLIP, epochs=30))
    others = [
        network_config(reg="elastic", elastic_alpha=0.9, grad_clip=3 * CLIP),
        network_config(reg="l2", l2_form="decay"),
        network_config(reg="l1", grad_clip=CLIP, noise="positive_kurtosis"),
    ]
    others = [
        dataclasses.replace(c, sae=dataclasses.replace(c.sae, epochs=30, grad_clip=0.2)) for c in others
    ]
    for engine in ENGINES:
        monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
        batched = train_pass([others[0], target, *others[1:]], [0, 2, 2, 1])[1]
        alone = train_pass([target], [2])[0]
        if engine == "fused":  # one model, one thread, a fixed order: the same numbers
            assert_same_results(batched, alone)
        else:  # the batched GEMMs round differently with the batch's size (as tests/test_train.py allows)
            for module in ("network", "sae"):
                alone_state = getattr(alone, module).state_dict()
                for name, value in getattr(batched, module).state_dict().items():
                    torch.testing.assert_close(value, alone_state[name], atol=1e-5, rtol=0)


# SAEs: every architecture in the registry, trained by `train_saes_on_hidden` on given hidden activations.
SAE_EPOCHS = 40


def sae_config(architecture: str, **sae_fields) -> AblationConfig:
    fields = {"epochs": SAE_EPOCHS, "lr": 1e-2, "architecture": architecture, **sae_fields}
    return AblationConfig(
        data=DataConfig(samples=40), network=NetworkConfig(epochs=1), sae=SAEConfig(**fields), curve_every=20
    )


def reference_sae(config: AblationConfig, seed: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SAE on `hidden: [sample, hidden]` with autograd, torch.optim.Adam and clip_grad_norm_, through
    the registry's hooks in the order the trainer documents (gradient projection, clip, step,
    projection), and the published tie for tied architectures."""
    sae = config.sae
    architecture = sae_architectures.architecture(sae.architecture)
    mean, std = sae_architectures.standardization(hidden)
    standardized = (hidden - mean) / std
    inputs = standardized if sae.train_on == "standardized" else hidden
    initial = architecture.initial_parameters(hidden.shape[-1], sae.d_sae, sae, generator_for(seed, "sae"))
    parameters = {name: value.clone().requires_grad_() for name, value in initial.items()}
    trained = sae_architectures.trained_parameters(architecture, parameters)
    optimizer = torch.optim.Adam(trained, lr=sae.lr)
    state: dict[str, torch.Tensor] = {}
    for _ in range(sae.epochs):
        loss = sae_architectures.training_losses(architecture, parameters, inputs, sae, state)
        optimizer.zero_grad()
        loss.backward()
        sae_architectures.before_update(architecture, parameters)
        if sae.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, sae.grad_clip)
        decoder_before = parameters["decoder"].detach().clone()
        optimizer.step()
        sae_architectures.after_update(architecture, parameters)
        if getattr(architecture, "tied", False):
            with torch.no_grad():
                shared = parameters["decoder"] + parameters["encoder"].T - decoder_before
                parameters["decoder"].copy_(shared)
                parameters["encoder"].copy_(shared.T)
    sae_architectures.after_training(architecture, parameters, inputs, sae)
    return {name: value.detach() for name, value in parameters.items()}


SAE_CASES = [
    (architecture, engine)
    for architecture in sae_architectures.ARCHITECTURES
    for engine in ENGINES
    if engine == "torch" or architecture in fused.FUSED_SAE_ARCHITECTURES
]


@pytest.mark.parametrize(("architecture", "engine"), SAE_CASES)
def test_saes_match_plain_torch_with_clipping(monkeypatch, architecture, engine):
    monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
    train_on = "raw" if architecture == "published_tied" else "standardized"
    # Per model: clipped, unclipped, clipped harder at another learning rate.
    configs = [
        sae_config(architecture, grad_clip=CLIP, train_on=train_on),
        sae_config(architecture, train_on=train_on),
        sae_config(architecture, grad_clip=CLIP / 5, lr=3e-3, train_on=train_on),
    ]
    seeds = [0, 1, 2]
    generator = torch.Generator().manual_seed(7)
    hidden = torch.relu(torch.randn(len(configs), 32, 12, generator=generator) + 0.3)
    _, parameters, _ = train_saes_on_hidden(configs, seeds, hidden)
    for model, (config, seed) in enumerate(zip(configs, seeds, strict=True)):
        reference = reference_sae(config, seed, hidden[model])
        for name, value in reference.items():
            gap = (parameters[name][model] - value).abs().max().item()
            assert gap <= SAE_TOLERANCE, (architecture, model, name, gap)


def test_sae_clipping_binds(monkeypatch):
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "torch")
    configs = [sae_config("leaky_relu", grad_clip=CLIP), sae_config("leaky_relu")]
    hidden = torch.relu(torch.randn(1, 32, 12, generator=torch.Generator().manual_seed(7)) + 0.3)
    _, parameters, _ = train_saes_on_hidden(configs, [0, 0], hidden.expand(2, -1, -1).contiguous())
    assert (parameters["decoder"][0] - parameters["decoder"][1]).abs().max().item() > 100 * SAE_TOLERANCE


# Configuration: hashes, validation, passes.


def test_new_fields_at_their_defaults_keep_every_config_hash():
    default = AblationConfig()
    stored = default.to_dict()
    for section, name in (("network", "elastic_alpha"), ("network", "grad_clip"), ("sae", "grad_clip")):
        del stored[section][name]  # a config stored before the fields existed
    assert AblationConfig.from_dict(stored).hash() == default.hash()
    explicit = AblationConfig(
        network=NetworkConfig(elastic_alpha=0.5, grad_clip=0.0), sae=SAEConfig(grad_clip=0.0)
    )
    assert explicit.hash() == default.hash()
    for changed in (
        AblationConfig(network=NetworkConfig(grad_clip=1.0)),
        AblationConfig(network=NetworkConfig(elastic_alpha=0.25)),
        AblationConfig(sae=SAEConfig(grad_clip=1.0)),
    ):
        assert changed.hash() != default.hash()


def test_configurations_differing_only_in_the_new_fields_share_a_pass():
    configs = [
        AblationConfig(network=NetworkConfig(reg="elastic", elastic_alpha=alpha, grad_clip=clip))
        for alpha in (0.0, 0.5, 1.0)
        for clip in (0.0, 1.0)
    ] + [AblationConfig(sae=SAEConfig(grad_clip=1.0))]
    assert len({pass_key(config) for config in configs}) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NetworkConfig(elastic_alpha=1.5), r"network.elastic_alpha must lie in \[0, 1\]; got 1.5"),
        (lambda: NetworkConfig(elastic_alpha=-0.1), r"network.elastic_alpha must be >= 0; got -0.1"),
        (lambda: NetworkConfig(grad_clip=-1.0), r"network.grad_clip must be >= 0; got -1.0"),
        (lambda: NetworkConfig(grad_clip=float("inf")), r"network.grad_clip must be a finite number"),
        (lambda: SAEConfig(grad_clip=float("nan")), r"sae.grad_clip must be a finite number"),
        (
            lambda: NetworkConfig(reg="ridge"),
            r"network.reg must be one of none, l1, l2, elastic; got 'ridge'",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_option(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_command_line_has_the_options():
    from click.testing import CliRunner

    import cli

    for command in ("sweep", "ablate"):
        result = CliRunner().invoke(cli.cli, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for flag in ("--grad-clip", "--sae-grad-clip", "--elastic-alpha"):
            assert flag in result.output, (command, flag)


@pytest.mark.parametrize(
    ("name", "path"), [("clipping", "sae.grad_clip"), ("clipping_network", "network.grad_clip")]
)
def test_clipping_designs_cross_the_published_eight_with_clipping_off_and_on(name, path):
    from pipeline.config_tools import leaf_values
    from pipeline.design import load_design

    strategic = {config.hash() for config in load_design("strategic").configs()}
    configs = load_design(name).configs()
    levels = sorted({leaf_values(config)[path] for config in configs})
    assert len(configs) == 16 and levels[0] == 0.0 and len(levels) == 2 and levels[1] > 0
    # The unclipped half is the strategic sweep, config for config (a store that holds it reuses it).
    assert {config.hash() for config in configs if leaf_values(config)[path] == 0.0} == strategic
    assert len({pass_key(config) for config in configs}) == 1
