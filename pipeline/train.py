"""Batched training: every (configuration, seed) of a pass is one slice of one batched model.

A pass trains M models at once: the MLP (SCIENCE.md §1.2) for `network.epochs` full-batch Adam steps, then
an SAE on each model's clean last hidden layer for `sae.epochs` steps. Models in a pass must share shapes
and schedules (data config, widths, depth, epochs, SAE config); they may differ in the four factors, σ, λ,
the L2 form and the learning rate. Each model draws its data, init, noise and SAE init from its own
generators (`pipeline.data.generator_for`), and every operation acts on each model's slice separately, so
a model's result does not depend on which other models share its pass (up to float rounding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipeline import sae as sae_architectures
from pipeline.config import AblationConfig
from pipeline.data import Dataset, generator_for, make_dataset
from pipeline.models import MLP, layer_dims, mlp_forward
from pipeline.models import initial_parameters as network_initial_parameters

# Noise is drawn this many epochs at a time per model. Fixed (not tied to the batch) so that a model's
# noise stream is the same whether it trains alone or beside others.
NOISE_CHUNK_EPOCHS = 10

Progress = Callable[[int], None]


class BatchedAdam:
    """Adam over parameters with a leading model dimension, with a learning rate per model.

    Matches `torch.optim.Adam` (amsgrad off) slice by slice: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
    p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε). `coupled_decay[model]` adds λ·p to the gradient first, which
    is exactly what Adam's `weight_decay=λ` does (the published L2). Models not in `active` are frozen.
    """

    def __init__(
        self,
        parameters: Sequence[torch.Tensor],
        lr: torch.Tensor,
        coupled_decay: torch.Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.parameters = list(parameters)
        self.lr = lr
        self.coupled_decay = coupled_decay
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.first_moments = [torch.zeros_like(parameter) for parameter in self.parameters]
        self.second_moments = [torch.zeros_like(parameter) for parameter in self.parameters]

    @staticmethod
    def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_root = math.sqrt(1 - beta2**self.step_count)
        for parameter, first, second in zip(
            self.parameters, self.first_moments, self.second_moments, strict=True
        ):
            gradient = parameter.grad
            if self.coupled_decay is not None:
                gradient = gradient + self._per_model(self.coupled_decay, parameter) * parameter
            if active is not None:
                gradient = torch.where(self._per_model(active, parameter), gradient, 0.0)
            first.mul_(beta1).add_(gradient, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            denominator = (second.sqrt() / bias_correction2_root).add_(self.eps)
            step_size = self._per_model(self.lr / bias_correction1, parameter)
            parameter.sub_(step_size * first / denominator)

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None


def draw_noise(kind: str, sigma: float, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Noise for the last hidden layer, `shape`, each element fresh.

    bipolar: ±σ with probability ½ each (excess kurtosis −2).
    gaussian: N(0, σ²) (excess kurtosis 0).
    positive_kurtosis: Student-t with 3 degrees of freedom times σ/√3, so its std is σ (heavy tails,
        infinite kurtosis). Built as Z/√(V/3) with V = Z₁² + Z₂² + Z₃² ~ χ²₃ from standard normals, so it
        needs only `generator`-driven draws (torch's Gamma sampler takes no generator).
    """
    if kind == "bipolar":
        return (torch.rand(shape, generator=generator) < 0.5).to(torch.float32).mul_(2 * sigma).sub_(sigma)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator).mul_(sigma)
    if kind == "positive_kurtosis":
        numerator = torch.randn(shape, generator=generator)
        chi_square = torch.randn((3, *shape), generator=generator).square_().sum(dim=0)
        return numerator.mul_(sigma).div_(chi_square.sqrt_())
    raise ValueError(f"noise must be one of bipolar, gaussian, positive_kurtosis; got {kind!r}")


@dataclass
class SeedResult:
    """One trained (configuration, seed): metrics, curves and the exportable modules.

    `failure` is None for a finished seed, else the reason (e.g. "network loss became inf at epoch 12").
    """

    config: AblationConfig
    seed: int
    failure: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    network: MLP | None = None
    sae: sae_architectures.SparseAutoencoder | None = None
    wall_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.failure is None


def pass_key(config: AblationConfig) -> tuple:
    """Configurations with equal keys can share one batched pass."""
    network = config.network
    return (
        config.data,
        network.hidden_dim,
        network.hidden_layers,
        network.epochs,
        config.sae,
        config.curve_every,
    )


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA if available, then Apple MPS, else CPU; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be one of auto, cpu, cuda, mps; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA device; use --device auto or cpu"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but torch sees no MPS device; use --device auto or cpu")
    return torch.device(name)


def _stack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack(list(tensors)).to(device).requires_grad_()


def _activation_groups(configs: Sequence[AblationConfig]) -> list[tuple[str, int]]:
    groups: list[tuple[str, int]] = []
    for config in configs:
        if groups and groups[-1][0] == config.network.act:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((config.network.act, 1))
    return groups


@dataclass
class _PassState:
    """Bookkeeping for failures in a pass: which models are alive, and why the others stopped."""

    models: int
    device: torch.device = torch.device("cpu")
    failures: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        self.failures = [None] * self.models

    @property
    def alive(self) -> torch.Tensor:
        return torch.tensor([failure is None for failure in self.failures], device=self.device)

    def check(self, losses: torch.Tensor, stage: str, epoch: int) -> bool:
        """Record models whose loss stopped being finite; True when any model newly failed."""
        bad = ~torch.isfinite(losses.detach())
        if not bool(bad.any()):
            return False
        newly_failed = False
        for index in torch.nonzero(bad).flatten().tolist():
            if self.failures[index] is None:
                value = losses[index].item()
                self.failures[index] = f"{stage} loss became {value} at epoch {epoch}"
                newly_failed = True
        return newly_failed


def _freeze_failed(parameters: Sequence[torch.Tensor], alive: torch.Tensor) -> None:
    """Zero the parameters of failed models so their NaN/Inf cannot reach any later computation."""
    with torch.no_grad():
        for parameter in parameters:
            parameter.masked_fill_(~alive.reshape(-1, *([1] * (parameter.dim() - 1))), 0.0)


def train_pass(
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> list[SeedResult]:
    """Train one model per (configs[i], seeds[i]) in a single batched pass; results in input order.

    All configs must share `pass_key`. Random draws always happen on the CPU from per-model generators
    and are then moved to `device`, so a seed's data, init and noise are the same on every device.
    Returns a SeedResult per model with `network`, `sae` and
    `curves` set (metrics are computed by `pipeline.evaluation`).
    """
    if len(configs) != len(seeds) or not configs:
        raise ValueError("train_pass needs one seed per config and at least one model")
    keys = {pass_key(config) for config in configs}
    if len(keys) != 1:
        raise ValueError("configs in one pass must share data, widths, depth, epochs and SAE settings")
    started = time.perf_counter()
    # Group models by activation so each activation applies to one contiguous slice.
    order = sorted(range(len(configs)), key=lambda index: configs[index].network.act)
    configs = [configs[index] for index in order]
    seeds = [seeds[index] for index in order]
    models = len(configs)
    first = configs[0]
    datasets_by_seed: dict[int, Dataset] = {
        seed: make_dataset(first.data, seed) for seed in dict.fromkeys(seeds)
    }
    datasets = [datasets_by_seed[seed] for seed in seeds]

    device = resolve_device(device) if isinstance(device, str) else device
    network_curves, network, state = _train_networks(configs, seeds, datasets, progress, device)
    sae_curves, sae_parameters, standardizations = _train_saes(
        configs, seeds, datasets, network, state, progress, device
    )

    elapsed = (time.perf_counter() - started) / models
    results: list[SeedResult] = []
    weights, biases = network
    for index, (config, seed) in enumerate(zip(configs, seeds, strict=True)):
        result = SeedResult(config=config, seed=seed, failure=state.failures[index], wall_seconds=elapsed)
        result.curves = {
            "network": _curve_slice(network_curves, index),
            "sae": _curve_slice(sae_curves, index),
        }
        if result.finished:
            result.network = MLP.from_parameters(
                [weight[index].detach().cpu() for weight in weights],
                [bias[index].detach().cpu() for bias in biases],
                config.network.act,
            )
            mean, std = standardizations[0][index].cpu(), standardizations[1][index].cpu()
            one_sae = {name: value[index].detach().cpu() for name, value in sae_parameters.items()}
            result.sae = sae_architectures.SparseAutoencoder(config.sae, one_sae, mean, std)
        results.append(result)
    # Back to input order.
    restored: list[SeedResult | None] = [None] * models
    for position, index in enumerate(order):
        restored[index] = results[position]
    return restored  # type: ignore[return-value]


def _curve_slice(curves: dict[str, list], index: int) -> dict[str, list[float]]:
    return {
        name: list(values) if name == "epoch" else [float(row[index]) for row in values]
        for name, values in curves.items()
    }


def _per_model_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def _train_networks(configs, seeds, datasets, progress, device):
    first = configs[0]
    models = len(configs)
    dims = layer_dims(first.data.features, first.network.hidden_dim, first.network.hidden_layers)
    initial = [
        network_initial_parameters(config.network.init, dims, generator_for(seed, "init"))
        for config, seed in zip(configs, seeds, strict=True)
    ]
    weights = [_stack([model[0][layer] for model in initial], device) for layer in range(len(dims) - 1)]
    biases = [_stack([model[1][layer] for model in initial], device) for layer in range(len(dims) - 1)]
    parameters = weights + biases

    def coefficient(reg: str, form: str | None = None) -> torch.Tensor:
        return _per_model_tensor(
            (
                config.network.lambda_reg
                if config.network.reg == reg and (form is None or config.network.l2_form == form)
                else 0.0
                for config in configs
            ),
            device,
        )

    l1_strength = coefficient("l1")
    l2_penalty_strength = coefficient("l2", "penalty")
    optimizer = BatchedAdam(
        parameters,
        lr=_per_model_tensor((config.network.lr for config in configs), device),
        coupled_decay=coefficient("l2", "decay") if any(c.network.reg == "l2" for c in configs) else None,
    )
    use_l1 = bool((l1_strength > 0).any())
    use_l2_penalty = bool((l2_penalty_strength > 0).any())

    train_inputs = torch.stack([dataset.train_inputs for dataset in datasets]).to(device)
    train_targets = torch.stack([dataset.train_targets for dataset in datasets]).to(device)
    validation_inputs = torch.stack([dataset.validation_inputs for dataset in datasets]).to(device)
    validation_targets = torch.stack([dataset.validation_targets for dataset in datasets]).to(device)
    activation_groups = _activation_groups(configs)
    noise_generators = [generator_for(seed, "noise") for seed in seeds]
    noisy_models = [index for index, config in enumerate(configs) if config.network.noise != "none"]
    noise_shape = (train_inputs.shape[1], first.network.hidden_dim)
    noise_buffer = (
        torch.zeros(NOISE_CHUNK_EPOCHS, models, *noise_shape, device=device) if noisy_models else None
    )

    state = _PassState(models, device)
    curves: dict[str, list] = {"epoch": [], "train_mse": [], "val_mse": []}
    epochs = first.network.epochs

    def record(epoch: int) -> None:
        with torch.no_grad():
            train_outputs, _ = mlp_forward(train_inputs, weights, biases, activation_groups)
            validation_outputs, _ = mlp_forward(validation_inputs, weights, biases, activation_groups)
            curves["epoch"].append(epoch)
            curves["train_mse"].append(((train_outputs - train_targets) ** 2).mean(dim=(1, 2)).tolist())
            curves["val_mse"].append(
                ((validation_outputs - validation_targets) ** 2).mean(dim=(1, 2)).tolist()
            )

    for epoch in range(epochs):
        chunk_position = epoch % NOISE_CHUNK_EPOCHS
        if noise_buffer is not None and chunk_position == 0:
            chunk = min(NOISE_CHUNK_EPOCHS, epochs - epoch)
            for index in noisy_models:
                network = configs[index].network
                noise_buffer[:chunk, index] = draw_noise(
                    network.noise, network.sigma, (chunk, *noise_shape), noise_generators[index]
                )
        noise = noise_buffer[chunk_position] if noise_buffer is not None else None
        outputs, _ = mlp_forward(train_inputs, weights, biases, activation_groups, noise)
        losses = ((outputs - train_targets) ** 2).mean(dim=(1, 2))
        if use_l1:
            losses = losses + l1_strength * sum(weight.abs().sum(dim=(1, 2)) for weight in weights)
        if use_l2_penalty:
            losses = losses + l2_penalty_strength * sum(weight.square().sum(dim=(1, 2)) for weight in weights)
        newly_failed = state.check(losses, "network", epoch)
        alive = state.alive
        optimizer.zero_grad()
        torch.where(alive, losses, 0.0).sum().backward()
        optimizer.step(alive)
        if newly_failed:
            _freeze_failed(parameters, alive)
        if (epoch + 1) % first.curve_every == 0 or epoch + 1 == epochs:
            record(epoch + 1)
        if progress is not None:
            progress(1)
    # A model can blow up on its very last step; check the trained parameters once more.
    with torch.no_grad():
        outputs, _ = mlp_forward(train_inputs, weights, biases, activation_groups)
        if state.check(((outputs - train_targets) ** 2).mean(dim=(1, 2)), "network", epochs):
            _freeze_failed(parameters, state.alive)
    return curves, (weights, biases), state


def _train_saes(configs, seeds, datasets, network, state: _PassState, progress, device):
    first = configs[0]
    sae_config = first.sae
    architecture = sae_architectures.architecture(sae_config.architecture)
    weights, biases = network
    activation_groups = _activation_groups(configs)
    with torch.no_grad():
        train_inputs = torch.stack([dataset.train_inputs for dataset in datasets]).to(device)
        _, hidden = mlp_forward(
            train_inputs, [w.detach() for w in weights], [b.detach() for b in biases], activation_groups
        )
        mean, std = sae_architectures.standardization(hidden)
        standardized = (hidden - mean.unsqueeze(-2)) / std.unsqueeze(-2)
    hidden_dim = hidden.shape[-1]
    initial = [
        architecture.initial_parameters(hidden_dim, sae_config.d_sae, sae_config, generator_for(seed, "sae"))
        for seed in seeds
    ]
    parameters = {name: _stack([model[name] for model in initial], device) for name in initial[0]}
    optimizer = BatchedAdam(
        list(parameters.values()), lr=_per_model_tensor((c.sae.lr for c in configs), device)
    )
    curves: dict[str, list] = {"epoch": [], "sae_loss": [], "sae_l0": [], "sae_dead_fraction": []}
    for epoch in range(sae_config.epochs):
        latents = architecture.encode(parameters, standardized, sae_config)
        reconstruction = architecture.decode(parameters, latents)
        losses = ((reconstruction - standardized) ** 2).mean(dim=(1, 2)) + architecture.sparsity_penalty(
            parameters, latents, sae_config
        )
        newly_failed = state.check(losses, "sae", epoch)
        alive = state.alive
        optimizer.zero_grad()
        torch.where(alive, losses, 0.0).sum().backward()
        optimizer.step(alive)
        if newly_failed:
            _freeze_failed(list(parameters.values()), alive)
        if (epoch + 1) % first.curve_every == 0 or epoch + 1 == sae_config.epochs:
            with torch.no_grad():
                active = architecture.encode(parameters, standardized, sae_config) > 0
                curves["epoch"].append(epoch + 1)
                curves["sae_loss"].append(losses.detach().tolist())
                curves["sae_l0"].append(active.float().mean(dim=(1, 2)).tolist())
                curves["sae_dead_fraction"].append((~active.any(dim=1)).float().mean(dim=1).tolist())
        if progress is not None:
            progress(1)
    detached = {name: value.detach() for name, value in parameters.items()}
    return curves, detached, (mean, std)


def total_epochs(config: AblationConfig) -> int:
    """Progress units one model of this config takes in a pass (network epochs + SAE epochs)."""
    return config.network.epochs + config.sae.epochs
