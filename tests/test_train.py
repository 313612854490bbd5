import dataclasses
import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from pipeline.config import AblationConfig
from pipeline.data import make_dataset
from pipeline.evaluation import METRIC_NAMES, checkpoint, evaluate_seed, reevaluate
from pipeline.experiments.taming import run_ablation, run_ablations
from pipeline.models import (
    ACTIVATION_FUNCTIONS,
    MLP,
    initial_parameters,
    layer_dims,
    mlp_backward,
    mlp_forward,
    mlp_forward_features,
)
from pipeline.train import BatchedAdam, draw_noise, train_pass
from tests.conftest import tiny_config, with_network
from tests.test_training_reference import (
    PARAMETER_TOLERANCE,
    assert_matches_reference,
    reference_config,
    reference_training,
)


def test_batched_adam_matches_torch_adam_slice_by_slice():
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    targets = torch.randn(3, 4, 5)
    learning_rates = [1e-3, 1e-2, 5e-2]
    decays = [0.0, 1e-2, 1e-1]
    batched = start.clone().requires_grad_()
    optimizer = BatchedAdam([batched], lr=torch.tensor(learning_rates), coupled_decay=torch.tensor(decays))
    singles = [start[index].clone().requires_grad_() for index in range(3)]
    references = [
        torch.optim.Adam([single], lr=lr, weight_decay=decay)
        for single, lr, decay in zip(singles, learning_rates, decays, strict=True)
    ]
    for _ in range(50):
        optimizer.zero_grad()
        ((batched - targets) ** 3).abs().sum().backward()
        optimizer.step()
        for index, (single, reference) in enumerate(zip(singles, references, strict=True)):
            reference.zero_grad()
            ((single - targets[index]) ** 3).abs().sum().backward()
            reference.step()
    for index, single in enumerate(singles):
        assert torch.allclose(batched[index], single, atol=1e-6)


def test_noise_distributions():
    generator = np.random.Generator(np.random.PCG64(0))
    bipolar = draw_noise("bipolar", 0.1, (200_000,), generator)
    assert bipolar.unique().tolist() == pytest.approx([-0.1, 0.1])
    assert abs(bipolar.mean().item()) < 2e-3
    gaussian = draw_noise("gaussian", 0.1, (200_000,), generator)
    assert abs(gaussian.std().item() - 0.1) < 2e-3
    heavy = draw_noise("positive_kurtosis", 0.1, (400_000,), generator)
    # Student-t(3)·σ/√3: median absolute value σ/√3 · t₃'s 75th percentile (0.7649), a robust check.
    assert abs(heavy.abs().median().item() - 0.1 / math.sqrt(3) * 0.7649) < 2e-3
    # Heavy tails: P(|t₃| > 4.541) = 0.02 (t table), far above the Gaussian's 6e-6 at the same multiple.
    tail = (heavy.abs() > 0.1 / math.sqrt(3) * 4.541).float().mean().item()
    assert abs(tail - 0.02) < 2e-3


def _pooled_initial_parameters(init: str, seeds: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    dims = layer_dims(8, 12, 4)
    return [initial_parameters(init, dims, torch.Generator().manual_seed(seed)) for seed in range(seeds)]


def test_random_init_follows_pytorch_default_linear_law():
    models = _pooled_initial_parameters("random", 100)
    weights, biases = models[0]
    assert [tuple(w.shape) for w in weights] == [(12, 8), (12, 12), (12, 12), (12, 12), (8, 12)]
    # Scaled by √fan_in every entry should be U(−1, 1): W, b ~ U(−1/√fan_in, 1/√fan_in). 100 seeds pool
    # 62 400 independent weights, so a bound off by even 5 % gives p ≈ 0.
    scaled_weights = torch.cat(
        [weight.flatten() * math.sqrt(weight.shape[1]) for weights, _ in models for weight in weights]
    )
    scaled_biases = torch.cat(
        [
            bias * math.sqrt(weight.shape[1])
            for weights, biases in models
            for weight, bias in zip(weights, biases, strict=True)
        ]
    )
    for scaled in (scaled_weights, scaled_biases):
        assert scipy.stats.kstest(scaled.numpy(), scipy.stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    # And the same law as nn.Linear itself draws (its global RNG, isolated from the rest of the suite).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linears = [torch.nn.Linear(12, 12) for _ in range(300)]
    linear_weights = torch.cat([linear.weight.detach().flatten() for linear in linears]) * math.sqrt(12)
    linear_biases = torch.cat([linear.bias.detach() for linear in linears]) * math.sqrt(12)
    assert scipy.stats.ks_2samp(scaled_weights.numpy(), linear_weights.numpy()).pvalue > 1e-3
    assert scipy.stats.ks_2samp(scaled_biases.numpy(), linear_biases.numpy()).pvalue > 1e-3


def test_orthogonal_init_has_gain_root_two_zero_biases_and_haar_directions():
    first_entries = []
    for weights, biases in _pooled_initial_parameters("orthogonal", 300):
        for weight, bias in zip(weights, biases, strict=True):
            rows, columns = weight.shape
            # nn.Linear layout [out, in]: a tall matrix has orthogonal columns, a wide one orthogonal rows.
            gram = weight.T @ weight if rows >= columns else weight @ weight.T
            assert torch.allclose(gram, 2 * torch.eye(min(rows, columns)), atol=1e-5)
            singular_values = torch.linalg.svdvals(weight)
            assert torch.allclose(singular_values, torch.full_like(singular_values, math.sqrt(2)), atol=1e-5)
            assert torch.equal(bias, torch.zeros_like(bias))
            first_entries.append(weight[0, 0].item() / math.sqrt(2))
    # Haar measure: entry [0, 0] / gain is one coordinate u of a uniform unit vector in R^12 (12 = the
    # longer side of every layer here), and (u + 1)/2 ~ Beta(11/2, 11/2). One entry per layer and seed keeps
    # the 1500 samples independent.
    law = scipy.stats.beta(5.5, 5.5, loc=-1, scale=2)
    assert scipy.stats.kstest(first_entries, law.cdf).pvalue > 1e-3


@pytest.mark.parametrize("activation", ["relu", "gelu", [("relu", 0, 1), ("gelu", 1, 2)]])
def test_hand_written_backward_matches_autograd(activation):
    generator = torch.Generator().manual_seed(0)
    dims = layer_dims(5, 7, 3)
    weights = [
        torch.randn(2, d_out, d_in, generator=generator)
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
    ]
    biases = [torch.randn(2, d_out, generator=generator) for d_out in dims[1:]]
    inputs = torch.randn(2, 5, 11, generator=generator)
    targets = torch.randn(2, 5, 11, generator=generator)
    noise = torch.randn(2, 7, 11, generator=generator)
    names = [activation] * 2 if isinstance(activation, str) else ["relu", "gelu"]
    leaves = [tensor.clone().requires_grad_() for tensor in weights + biases]
    # Reference: autograd through plain per-model code (out= kernels of mixed passes have no autograd).
    for model, name in enumerate(names):
        hidden = inputs[model]
        for weight, bias in zip(leaves[:3], leaves[4:7], strict=True):
            hidden = ACTIVATION_FUNCTIONS[name](weight[model] @ hidden + bias[model].unsqueeze(-1))
        outputs = leaves[3][model] @ (hidden + noise[model]) + leaves[7][model].unsqueeze(-1)
        ((outputs - targets[model]) ** 2).mean().backward()
    outputs, trace = mlp_forward_features(inputs, weights, biases, activation, noise)
    gradient = 2 * (outputs - targets) / (5 * 11)
    weight_gradients, bias_gradients = mlp_backward(gradient, weights, trace, activation)
    for mine, leaf in zip(weight_gradients + bias_gradients, leaves, strict=True):
        assert torch.allclose(mine, leaf.grad, atol=1e-5)


def test_hand_written_sae_gradients_match_autograd():
    from pipeline.config import SAEConfig
    from pipeline.sae import architecture

    leaky = architecture("leaky_relu")
    config = SAEConfig(l1_coefficient=0.05)
    generator = torch.Generator().manual_seed(1)
    models = [leaky.initial_parameters(6, 9, config, generator) for _ in range(3)]
    parameters = {name: torch.stack([model[name] for model in models]) for name in models[0]}
    inputs = torch.randn(3, 13, 6, generator=generator)  # [model, sample, hidden]
    leaves = {name: value.clone().requires_grad_() for name, value in parameters.items()}
    latents = leaky.encode(leaves, inputs, config)
    reference = ((leaky.decode(leaves, latents) - inputs) ** 2).mean(dim=(1, 2)) + leaky.sparsity_penalty(
        leaves, latents, config
    )
    reference.sum().backward()
    losses, gradients = leaky.losses_and_gradients(parameters, inputs.transpose(1, 2).contiguous(), config)
    assert torch.allclose(losses, reference.detach(), atol=1e-6)
    for name, leaf in leaves.items():
        assert torch.allclose(gradients[name], leaf.grad, atol=1e-6), name


def test_configs_sharing_a_seed_and_noise_kind_share_noise():
    # With σ = 0 for one config the only difference between two configs is σ, so noise must scale exactly.
    low, high = tiny_config(sigma=0.05), tiny_config(sigma=0.1)
    from pipeline.train import _NoiseSource

    source = _NoiseSource([low, high, low], [0, 0, 1], (12, 5), 3, torch.device("cpu"))
    first = source.for_epoch(0)
    assert torch.allclose(first[1], 2 * first[0]) and not torch.allclose(first[2], first[0])


def _two_configs():
    first = tiny_config()
    second = tiny_config(init="orthogonal", noise="positive_kurtosis", reg="l2", act="gelu", sigma=0.2)
    return first, second


def test_seed_in_a_batch_equals_seed_alone():
    first, second = _two_configs()
    mixed = train_pass([first, second, first, second], [0, 0, 1, 1])
    alone = train_pass([second], [1])[0]
    batched = mixed[3]
    assert batched.config == second and batched.seed == 1
    for a, b in zip(batched.network.state_dict().values(), alone.network.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(batched.sae.state_dict().values(), alone.sae.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    dataset = make_dataset(second.data, 1)
    batched_metrics = evaluate_seed(second, batched.network, batched.sae, dataset)
    alone_metrics = evaluate_seed(second, alone.network, alone.sae, dataset)
    for name in METRIC_NAMES:
        assert batched_metrics[name] == pytest.approx(alone_metrics[name], rel=1e-3, abs=1e-5), name


def test_exported_module_matches_batched_forward():
    config = tiny_config(act="gelu")
    result = train_pass([config], [0])[0]
    assert isinstance(result.network, MLP)
    dataset = make_dataset(config.data, 0)
    state = result.network.state_dict()
    weights = [state[f"layers.{layer}.weight"].unsqueeze(0) for layer in range(5)]
    biases = [state[f"layers.{layer}.bias"].unsqueeze(0) for layer in range(5)]
    expected, hidden = mlp_forward(dataset.train_inputs.unsqueeze(0), weights, biases, "gelu")
    expected, hidden = expected[0], hidden[0]
    outputs, module_hidden = result.network.forward_with_hidden(dataset.train_inputs)
    assert torch.allclose(outputs, expected, atol=1e-6) and torch.allclose(module_hidden, hidden, atol=1e-6)
    reconstruction, latents = result.sae(hidden)
    assert reconstruction.shape == hidden.shape and latents.shape == (hidden.shape[0], config.sae.d_sae)
    standardized = (hidden - result.sae.mean) / result.sae.std
    assert torch.allclose(standardized[: dataset.train_inputs.shape[0]].mean(0), torch.zeros(12), atol=1e-5)


def test_same_config_and_seed_give_the_same_metrics():
    config = tiny_config(noise="positive_kurtosis")
    first = run_ablation(config, seeds=[0, 1]).metrics_table()
    second = run_ablation(config, seeds=[0, 1]).metrics_table()
    assert first[list(METRIC_NAMES)].equals(second[list(METRIC_NAMES)])


def test_results_have_every_metric_and_curves():
    config = tiny_config()
    result = run_ablation(config, seeds=[0, 1, 2])
    table = result.metrics_table()
    assert list(table["seed"]) == [0, 1, 2] and (table["status"] == "finished").all()
    assert table[list(METRIC_NAMES)].notna().all().all()
    figure = result.overlap_figure()
    assert len(figure.axes) >= 3  # three heatmaps (+ the shared colourbar)
    curves = result.seeds[0].curves
    assert curves["network"]["epoch"] == [10, 20, 24]
    assert curves["sae"]["epoch"] == [10, 12]
    # The last curve point is the trained network's clean train MSE, the same number as the metric.
    assert curves["network"]["train_mse"][-1] == pytest.approx(result.seeds[0].metrics["train_mse"], rel=1e-4)


def test_divergence_fails_one_model_and_spares_the_rest(tiny):
    exploding = with_network(tiny, sigma=1e30)
    results = run_ablations([tiny, exploding], seeds=[0, 1])
    healthy, diverged = results
    assert [seed.finished for seed in healthy.seeds] == [True, True]
    assert all(not seed.finished for seed in diverged.seeds)
    assert diverged.seeds[0].failure.startswith("network loss became inf at epoch 0")
    assert diverged.metrics_table()["status"].tolist() == ["failed", "failed"]
    alone = run_ablation(tiny, seeds=[0, 1])
    for name in ("train_mse", "macs", "interference"):
        assert healthy.seeds[1].metrics[name] == pytest.approx(alone.seeds[1].metrics[name], rel=1e-4)


def test_checkpoint_round_trip_reproduces_metrics(tmp_path):
    config = tiny_config(reg="l2", l2_form="penalty")
    seed = run_ablation(config, seeds=[3]).seeds[0]
    path = tmp_path / "seed.pt"
    torch.save(checkpoint(config, seed.seed, seed.network, seed.sae), path)
    loaded = torch.load(path, weights_only=True)
    assert reevaluate(loaded) == seed.metrics


def test_shared_pass_and_separate_passes_agree():
    configs = [tiny_config(), tiny_config(init="orthogonal", act="gelu")]
    shared = run_ablations(configs, seeds=[0], share_passes=True)
    separate = run_ablations(configs, seeds=[0], share_passes=False)
    for a, b in zip(shared, separate, strict=True):
        assert a.seeds[0].metrics["val_mse"] == pytest.approx(b.seeds[0].metrics["val_mse"], rel=1e-4)


def test_regularization_forms_follow_their_definitions():
    # λ = 0.5 makes each form's footprint large. Every trained model must match the independent nn/autograd/
    # torch.optim.Adam reference of its form (docs/science.md §1.2), and the forms must end far apart compared with
    # that tolerance, so matching one form's reference rules out the neighbouring readings (L1 or L2 on
    # biases too, decay on weights only).
    base = reference_config(lambda_reg=0.5, lr=1e-3)
    forms = {
        "l1": with_network(base, reg="l1"),
        "l2_decay": with_network(base, reg="l2", l2_form="decay"),
        "l2_penalty": with_network(base, reg="l2", l2_form="penalty"),
        "none": with_network(base, reg="none"),
    }
    results = train_pass(list(forms.values()), [0] * len(forms))
    final_parameters = {}
    for (name, config), result in zip(forms.items(), results, strict=True):
        layers, curves = reference_training(config, 0)
        assert_matches_reference(result, layers, curves)
        final_parameters[name] = torch.cat(
            [parameter.detach().flatten() for parameter in layers.parameters()]
        )
    for first, second in itertools.combinations(final_parameters, 2):
        gap = (final_parameters[first] - final_parameters[second]).abs().max().item()
        assert gap > 100 * PARAMETER_TOLERANCE, (first, second)
    norms = {
        name: sum(weight.square().sum().item() for weight in result.network.weight_matrices())
        for name, result in zip(forms, results, strict=True)
    }
    assert norms["l2_decay"] < norms["none"] and norms["l2_penalty"] < norms["none"]


def test_pass_rejects_incompatible_configs():
    config = tiny_config()
    other = dataclasses.replace(config, sae=dataclasses.replace(config.sae, d_sae=8))
    with pytest.raises(ValueError, match="share data, widths"):
        train_pass([config, other], [0, 0])


def test_every_default_metric_is_finite_for_a_default_shape():
    result = run_ablation(AblationConfig(network=tiny_config().network, sae=tiny_config().sae), seeds=[0])
    assert all(math.isfinite(result.seeds[0].metrics[name]) for name in METRIC_NAMES)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the batched engine's GPU path (issue 13, item 6; "
    "bench/gpu.py) is checked only where one is present",
)
def test_a_pass_on_the_gpu_matches_the_same_pass_on_the_cpu():
    """Random draws happen on the CPU whatever the device, so a pass on the GPU trains the same models:
    their curves agree with the CPU's to float rounding (GPU kernels sum in other orders)."""
    from pipeline.config import preset_configs

    configs = preset_configs("factorial", tiny_config())
    seeds = [seed for _ in configs for seed in (0, 1)]
    configs = [config for config in configs for _ in (0, 1)]
    on_cpu = train_pass(configs, seeds, device="cpu")
    on_gpu = train_pass(configs, seeds, device="cuda")
    for cpu_result, gpu_result in zip(on_cpu, on_gpu, strict=True):
        assert cpu_result.finished and gpu_result.finished
        for stage, curves in cpu_result.curves.items():
            for name, values in curves.items():
                np.testing.assert_allclose(
                    gpu_result.curves[stage][name], values, rtol=2e-3, atol=1e-6, err_msg=f"{stage} {name}"
                )
