"""Batched training: every (configuration, seed) of a pass is one slice of one batched model.

A pass trains M models at once: the MLP (docs/science.md §1.2) for `network.epochs` full-batch Adam steps, then
an SAE on each model's clean last hidden layer for `sae.epochs` steps. Models in a pass must share shapes
and schedules (data config, widths, depth, epochs, SAE config); they may differ in the four factors, σ, λ,
the L2 form, the elastic-net mix, the learning rates and the gradient-clipping norms. Each model draws its
data, init, noise and SAE init from its own generators (`pipeline.data.generator_for`), and every
operation acts on each model's slice separately, so a model's result does not depend on which other
models share its pass (up to float rounding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import sae as sae_architectures
from pipeline.config import AblationConfig, pass_key
from pipeline.data import Dataset, generator_for, make_dataset, numpy_generator_for
from pipeline.models import MLP, layer_dims, mlp_backward, mlp_forward_features, runs_of
from pipeline.models import initial_parameters as network_initial_parameters
from pipeline.runtime import retain_freed_memory

# Noise is drawn this many epochs at a time per model. Fixed (not tied to the batch) so that a model's
# noise stream is the same whether it trains alone or beside others.
NOISE_CHUNK_EPOCHS = 10

Progress = Callable[[int], None]

# Divergence (a FAILED seed, with the reason): a training loss that stops being finite, or that rises
# above DIVERGENCE_FACTOR × the same model's loss at its first epoch while also above DIVERGENCE_FLOOR. The
# floor keeps a model that starts near zero loss from failing on a harmless rise; the factor is far beyond
# any wobble of Adam on this problem (the engine's reference cases never exceed 2× their initial loss),
# while `--lr 10` climbs to 10⁶× and ends with NaN SAE metrics.
DIVERGENCE_FACTOR = 1e3
DIVERGENCE_FLOOR = 10.0
# After evaluation: the loss-like metrics must be finite, and the SAE's fraction of variance unexplained
# at most this. FVU 1 is an SAE that reconstructs nothing (the mean); we saw 2e10 when the validation
# activations left the range the SAE's train-split standardization was fitted on.
LOSS_METRICS = ("train_mse", "val_mse", "sae_mse", "sae_fvu")
SAE_FVU_LIMIT = 1e3


def metrics_failure(metrics: dict[str, float]) -> str | None:
    """Why a seed's evaluated metrics make it a failed seed (see LOSS_METRICS), or None."""
    for name in LOSS_METRICS:
        value = metrics.get(name)
        if value is None or math.isfinite(value):
            continue
        if name == "sae_fvu" and math.isnan(value) and math.isfinite(metrics.get("sae_mse", math.nan)):
            # FVU is 0/0 when the last hidden layer has no variance: every unit dead, a network that strong
            # regularization collapsed (L1 at λ ≥ 1e-3). The SAE did not diverge (its error is finite), so the
            # seed is a result, not a failure; the report names its NaN and leaves it out of that metric only.
            continue
        return f"{name} is {value} after training (diverged)"
    fvu = metrics.get("sae_fvu")
    if fvu is not None and fvu > SAE_FVU_LIMIT:
        return f"sae_fvu is {fvu:.3g} after training, above the limit {SAE_FVU_LIMIT:g} (the SAE diverged)"
    return None


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
    def step(
        self, active: torch.Tensor | None = None, gradients: Sequence[torch.Tensor] | None = None
    ) -> None:
        """One update. `gradients` default to each parameter's `.grad`; `active=None` means all models.

        Written with torch's `_foreach_*` kernels: one call per formula term for all parameters, which
        measured several times faster than a Python loop over ten small tensors.
        """
        self.step_count += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_root = math.sqrt(1 - beta2**self.step_count)
        parameters = self.parameters
        if gradients is None:
            gradients = [parameter.grad for parameter in parameters]
        gradients = list(gradients)
        if self.coupled_decay is not None:
            decays = [self._per_model(self.coupled_decay, parameter) for parameter in parameters]
            gradients = torch._foreach_add(gradients, torch._foreach_mul(parameters, decays))
        if active is not None:
            gradients = [
                torch.where(self._per_model(active, gradient), gradient, 0.0) for gradient in gradients
            ]
        torch._foreach_mul_(self.first_moments, beta1)
        torch._foreach_add_(self.first_moments, gradients, alpha=1 - beta1)
        torch._foreach_mul_(self.second_moments, beta2)
        torch._foreach_addcmul_(self.second_moments, gradients, gradients, value=1 - beta2)
        denominators = torch._foreach_sqrt(self.second_moments)
        torch._foreach_div_(denominators, bias_correction2_root)
        torch._foreach_add_(denominators, self.eps)
        updates = torch._foreach_div(self.first_moments, denominators)
        step_sizes = self.lr / bias_correction1
        torch._foreach_mul_(updates, [self._per_model(step_sizes, parameter) for parameter in parameters])
        torch._foreach_sub_(parameters, updates)

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None


def regularization_strengths(
    configs: Sequence[AblationConfig],
) -> tuple[list[float], list[float], list[float]]:
    """Per model: (λ₁ of the L1 term λ₁Σ|W|, λ₂ of the penalty λ₂ΣW², λ of Adam's coupled decay).

    The penalties act on the weight matrices, the decay on every parameter (docs/science.md §1.2). The
    elastic net λ·(α·Σ|W| + (1−α)·ΣW²) (Zou & Hastie 2005) is the sum of the two penalty forms with
    λ₁ = λα and λ₂ = λ(1−α), so every engine trains it through the terms it already has; at α = 1 it is
    the L1 form and at α = 0 the L2 penalty form, number for number.
    """
    l1, l2_penalty, decay = [], [], []
    for config in configs:
        network = config.network
        strength, alpha = network.lambda_reg, network.elastic_alpha
        l1.append(strength if network.reg == "l1" else strength * alpha if network.reg == "elastic" else 0.0)
        l2_penalty.append(
            strength
            if network.reg == "l2" and network.l2_form == "penalty"
            else strength * (1 - alpha)
            if network.reg == "elastic"
            else 0.0
        )
        decay.append(strength if network.reg == "l2" and network.l2_form == "decay" else 0.0)
    return l1, l2_penalty, decay


# torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6), capped at 1.
CLIP_EPSILON = 1e-6


@torch.no_grad()
def clip_gradient_norms_(gradients: Sequence[torch.Tensor], max_norms: torch.Tensor) -> None:
    """Clip each model's gradient by its global norm, in place: what `torch.nn.utils.clip_grad_norm_`
    does to one model's parameters, for every model of a batch at once.

    gradients: tensors `[model, ...]`, together one model's whole gradient vector g per slice;
    max_norms: `[model]`, c per model, 0 for a model left unclipped. g ← g · min(1, c / (‖g‖₂ + 1e-6)).
    A model whose gradient is not finite gets a non-finite one; the optimizer's `active` mask drops it.
    """
    models = max_norms.shape[0]
    squares = sum(gradient.reshape(models, -1).square().sum(dim=1) for gradient in gradients)
    coefficients = (max_norms / (squares.sqrt() + CLIP_EPSILON)).clamp(max=1.0)
    coefficients = torch.where(max_norms > 0, coefficients, 1.0)
    for gradient in gradients:
        gradient.mul_(coefficients.reshape(-1, *([1] * (gradient.dim() - 1))))


def _student_t3_unit(count: int, generator: np.random.Generator) -> np.ndarray:
    """`count` float32 draws of t₃/√3 (Student-t, 3 degrees of freedom, scaled to unit variance).

    Bailey's polar method (Math. Comp. 62, 1994): for (U, V) uniform on the unit disc and W = U² + V²,
    T = U·√(ν(W^(−2/ν) − 1)/W) is exactly t_ν. About 2.5 uniforms per draw, measured 1.7× faster than
    Z/√(χ²₃/3) from four normals. Candidates come in blocks and accepted ones are kept in order, so the
    result depends only on `generator`. The transform runs in place over every candidate and only the
    accepted results are gathered: one gather instead of two, 1.5× faster than transforming after it.
    """
    nu = 3.0
    kept: list[np.ndarray] = []
    needed = count
    while needed > 0:
        candidates = int(needed * 1.3) + 64  # acceptance π/4 ≈ 0.785
        pairs = generator.random((2, candidates), dtype=np.float32)
        pairs *= 2
        pairs -= 1
        u, v = pairs
        radius = u * u
        radius += v * v
        accepted = np.flatnonzero((radius < 1) & (radius > 0))[:needed]
        # Rejected candidates (W = 0 or W ≥ 1) give inf or nan here and are never gathered.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            transformed = radius ** (-2 / nu)
            transformed -= 1
            transformed *= nu
            transformed /= radius
            np.sqrt(transformed, out=transformed)
            transformed *= u
        kept.append(transformed[accepted])
        needed -= accepted.size
    values = kept[0] if len(kept) == 1 else np.concatenate(kept)
    return values / np.float32(math.sqrt(nu))


def fill_unit_noise(kind: str, out: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """Fill the CPU tensor `out` with unit-scale noise of `kind` (times σ for the study's noise).

    bipolar: ±1 with probability ½ each (excess kurtosis −2, the minimum), one random bit per element.
    gaussian: N(0, 1) (excess kurtosis 0).
    positive_kurtosis: Student-t with 3 degrees of freedom divided by √3 (unit variance, heavy tails,
        infinite kurtosis), as published: Student-t(3)·σ/√3.
    Draws come from a numpy Generator: its bit-level output makes bipolar noise ~15× cheaper than
    torch's uniform sampler, and noise drawing was the largest cost after the matrix products.
    """
    flat = out.numpy().reshape(-1)
    count = flat.size
    if kind == "bipolar":
        bits = np.unpackbits(generator.integers(0, 256, (count + 7) // 8, dtype=np.uint8))[:count]
        np.multiply(bits, 2, out=flat, casting="unsafe")
        flat -= 1
    elif kind == "gaussian":
        generator.standard_normal(dtype=np.float32, out=flat)
    elif kind == "positive_kurtosis":
        flat[:] = _student_t3_unit(count, generator)
    else:
        raise ValueError(f"noise must be one of bipolar, gaussian, positive_kurtosis; got {kind!r}")
    return out


def draw_noise(kind: str, sigma: float, shape: Sequence[int], generator: np.random.Generator) -> torch.Tensor:
    """A fresh tensor of noise `kind` with scale σ (see `fill_unit_noise`)."""
    return fill_unit_noise(kind, torch.empty(tuple(shape)), generator).mul_(sigma)


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
    # (title, PNG bytes) of its overlap heatmap, when a pool worker painted it (PassPool.paint_overlaps).
    overlap_picture: tuple[str, bytes] | None = None

    @property
    def finished(self) -> bool:
        return self.failure is None

    def __setattr__(self, name: str, value) -> None:
        # Metrics are assigned in one place for every executor (pipeline.experiments.taming.evaluate, in
        # this process or a worker); checking here makes a seed with diverged metrics FAILED with the
        # reason before anyone records it as FINISHED. The metrics are kept, so the reason can be checked.
        super().__setattr__(name, value)
        if name == "metrics" and value and getattr(self, "failure", None) is None:
            reason = metrics_failure(value)
            if reason is not None:
                super().__setattr__("failure", reason)


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


@dataclass
class _PassState:
    """Bookkeeping for failures in a pass: which models are alive, and why the others stopped."""

    models: int
    device: torch.device = torch.device("cpu")
    failures: list[str | None] = field(init=False)
    # Per stage ("network", "sae"): each model's first-epoch loss, and the divergence bound it sets.
    initial: dict[str, torch.Tensor] = field(init=False)
    bounds: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.failures = [None] * self.models
        self.initial, self.bounds = {}, {}

    @property
    def all_alive(self) -> bool:
        return all(failure is None for failure in self.failures)

    @property
    def alive(self) -> torch.Tensor:
        return torch.tensor([failure is None for failure in self.failures], device=self.device)

    def check(self, losses: torch.Tensor, stage: str, epoch: int) -> bool:
        """Record models whose loss stopped being finite or diverged (DIVERGENCE_FACTOR, DIVERGENCE_FLOOR);
        True when any model newly failed."""
        losses = losses.detach()
        if stage not in self.bounds:
            # A non-finite first loss gives a NaN bound; such a model fails on the finiteness test.
            self.initial[stage] = losses.clone()
            self.bounds[stage] = (losses * DIVERGENCE_FACTOR).clamp(min=DIVERGENCE_FLOOR)
        bound = self.bounds[stage]
        bad = ~torch.isfinite(losses) | (losses > bound)
        if not bool(bad.any()):
            return False
        newly_failed = False
        for index in torch.nonzero(bad).flatten().tolist():
            if self.failures[index] is None:
                value = losses[index].item()
                if math.isfinite(value):
                    initial = self.initial[stage][index].item()
                    self.failures[index] = (
                        f"{stage} loss diverged to {value:.3g} at epoch {epoch}, above {DIVERGENCE_FACTOR:g}× "
                        f"its first-epoch loss {initial:.3g} and above {DIVERGENCE_FLOOR:g}"
                    )
                else:
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

    All configs must share `pass_key`. Random draws always happen on the CPU from per-seed generators and
    are then moved to `device`, so a seed's data, init and noise are the same on every device. Returns a
    SeedResult per model with `network`, `sae` and `curves` set (metrics come from `pipeline.evaluation`).
    """
    if len(configs) != len(seeds) or not configs:
        raise ValueError("train_pass needs one seed per config and at least one model")
    if len({pass_key(config) for config in configs}) != 1:
        raise ValueError("configs in one pass must share data, widths, depth, epochs and SAE settings")
    retain_freed_memory()
    started = time.perf_counter()
    # Models sorted by activation, so each activation covers one contiguous slice of the batch.
    order = sorted(range(len(configs)), key=lambda index: configs[index].network.act)
    configs = [configs[index] for index in order]
    seeds = [seeds[index] for index in order]
    first = configs[0]
    datasets_by_seed: dict[int, Dataset] = {
        seed: make_dataset(first.data, seed) for seed in dict.fromkeys(seeds)
    }
    datasets = [datasets_by_seed[seed] for seed in seeds]
    device = resolve_device(device) if isinstance(device, str) else device
    state = _PassState(len(configs), device)
    network_curves, weights, biases = _train_networks(configs, seeds, datasets, state, progress, device)
    sae_curves, sae_parameters, (means, stds) = _train_saes(
        configs, seeds, datasets, weights, biases, state, progress, device
    )
    elapsed = (time.perf_counter() - started) / len(configs)
    results: list[SeedResult] = []
    for index, (config, seed) in enumerate(zip(configs, seeds, strict=True)):
        result = SeedResult(config=config, seed=seed, failure=state.failures[index], wall_seconds=elapsed)
        result.curves = {
            "network": _curve_slice(network_curves, index),
            "sae": _curve_slice(sae_curves, index),
        }
        if result.finished:
            result.network = MLP.from_parameters(
                [weight[index].cpu() for weight in weights],
                [bias[index].cpu() for bias in biases],
                config.network.act,
            )
            one_sae = {name: value[index].detach().cpu() for name, value in sae_parameters.items()}
            result.sae = sae_architectures.SparseAutoencoder(
                config.sae, one_sae, means[index].cpu(), stds[index].cpu()
            )
        results.append(result)
    restored: list[SeedResult] = [None] * len(results)  # type: ignore[list-item]
    for position, index in enumerate(order):
        restored[index] = results[position]
    return restored


def _curve_slice(curves: dict[str, list], index: int) -> dict[str, list[float]]:
    return {
        name: list(values) if name == "epoch" else [float(row[index]) for row in values]
        for name, values in curves.items()
    }


def _per_model_tensor(values: Iterable[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=device)


class _NoiseSource:
    """Last-hidden-layer noise for a pass, drawn NOISE_CHUNK_EPOCHS at a time.

    Unit noise is drawn once per (seed, noise kind) from that pair's own generator and scaled by each
    model's σ. Configurations that share a seed and a noise kind therefore see the same noise (common
    random numbers, which sharpen paired comparisons), a seed's noise does not depend on what else is in
    the pass, and a pass of 8 configurations draws 2 streams per seed instead of 8.
    """

    def __init__(self, configs, seeds, shape: tuple[int, int], epochs: int, device: torch.device) -> None:
        self.shape, self.epochs, self.device = shape, epochs, device
        keys = [(seed, config.network.noise) for config, seed in zip(configs, seeds, strict=True)]
        noisy = [key for key in dict.fromkeys(keys) if key[1] != "none"]
        self.enabled = bool(noisy)
        self.streams = {key: numpy_generator_for(key[0], f"noise_{key[1]}") for key in noisy}
        self.stream_order = list(self.streams)
        position = {key: index for index, key in enumerate(self.stream_order)}
        # Models without noise point at stream 0 with σ = 0.
        self.model_stream = torch.tensor([position.get(key, 0) for key in keys], device=device)
        sigmas = [config.network.sigma if config.network.noise != "none" else 0.0 for config in configs]
        self.sigma = _per_model_tensor(sigmas, device).reshape(-1, 1, 1)
        self.chunk: torch.Tensor | None = None

    def for_epoch(self, epoch: int) -> torch.Tensor | None:
        """Noise `[model, hidden, sample]` for this epoch (None when no model is noisy)."""
        if not self.enabled:
            return None
        position = epoch % NOISE_CHUNK_EPOCHS
        if position == 0:
            count = min(NOISE_CHUNK_EPOCHS, self.epochs - epoch)
            chunk = torch.empty(len(self.stream_order), count, *self.shape)  # [stream, epoch, hidden, sample]
            for index, (seed, kind) in enumerate(self.stream_order):
                fill_unit_noise(kind, chunk[index], self.streams[(seed, kind)])
            self.chunk = chunk.to(self.device)
        return self.chunk[:, position].index_select(0, self.model_stream).mul_(self.sigma)


def _flat_parameters(
    initial: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]], device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Every model's weights and biases in one `[model, parameter]` tensor: all weights (layer by layer,
    row-major) then all biases. Returns it with views `[model, d_out, d_in]` and `[model, d_out]` into it.

    One tensor makes Adam a dozen kernels per step instead of a dozen per layer and parameter kind (torch's
    CPU `_foreach_*` ops loop over their tensors); the views feed the GEMMs unchanged.
    """
    models = len(initial)
    shapes = [weight.shape for weight in initial[0][0]]
    sizes = [shape.numel() for shape in shapes] + [shape[0] for shape in shapes]
    flat = torch.empty(models, sum(sizes), device=device)
    views, start = [], 0
    for size in sizes:
        views.append(flat[:, start : start + size])
        start += size
    weights = [view.view(models, *shape) for view, shape in zip(views[: len(shapes)], shapes, strict=True)]
    biases = views[len(shapes) :]
    for layer in range(len(shapes)):
        weights[layer].copy_(torch.stack([model[0][layer] for model in initial]))
        biases[layer].copy_(torch.stack([model[1][layer] for model in initial]))
    return flat, weights, biases


def _stack_features(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-model `[sample, feature]` tensors → feature-major `[model, feature, sample]`."""
    return torch.stack(list(tensors)).transpose(1, 2).contiguous().to(device)


@torch.no_grad()
def _train_networks(configs, seeds, datasets, state: _PassState, progress, device):
    """Full-batch Adam on every model at once, with the hand-written backward of `mlp_backward`."""
    from pipeline import fused  # the fused CPU engine, when it applies (the code below is its reference)

    if fused.applies(device):
        return fused.train_networks(configs, seeds, datasets, state, progress, device)
    first = configs[0]
    activation = runs_of([config.network.act for config in configs])
    dims = layer_dims(first.data.features, first.network.hidden_dim, first.network.hidden_layers)
    initial = [
        network_initial_parameters(config.network.init, dims, generator_for(seed, "init"))
        for config, seed in zip(configs, seeds, strict=True)
    ]
    flat, weights, biases = _flat_parameters(initial, device)
    # Every weight comes before every bias in `flat`: the L1/L2 terms act on this prefix (a view that
    # follows the in-place updates) in one operation.
    flat_weights = flat[:, : sum(weight[0].numel() for weight in weights)]
    weight_count = flat_weights.shape[1]

    l1_strength, l2_penalty_strength, decay = (
        _per_model_tensor(strengths, device).reshape(-1, 1) for strengths in regularization_strengths(configs)
    )
    use_l1, use_l2_penalty = bool(l1_strength.any()), bool(l2_penalty_strength.any())
    clip = _per_model_tensor((config.network.grad_clip for config in configs), device)
    use_clip = bool(clip.any())  # without clipping not one operation more (nor a device sync per step)
    optimizer = BatchedAdam(
        [flat],
        lr=_per_model_tensor((config.network.lr for config in configs), device),
        coupled_decay=decay.flatten() if bool(decay.any()) else None,
    )
    train_inputs = _stack_features([dataset.train_inputs for dataset in datasets], device)
    train_targets = _stack_features([dataset.train_targets for dataset in datasets], device)
    validation_inputs = _stack_features([dataset.validation_inputs for dataset in datasets], device)
    validation_targets = _stack_features([dataset.validation_targets for dataset in datasets], device)
    epochs = first.network.epochs
    noise = _NoiseSource(configs, seeds, (first.network.hidden_dim, train_inputs.shape[2]), epochs, device)
    # MSE = mean over [feature, sample] per model, so ∂MSE/∂output = 2·(output − target)/count.
    output_scale = 2.0 / (train_targets.shape[1] * train_targets.shape[2])
    curves: dict[str, list] = {"epoch": [], "train_mse": [], "val_mse": []}

    def mse(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, _ = mlp_forward_features(inputs, weights, biases, activation)
        return (outputs - targets).square().mean(dim=(1, 2))

    alive = state.alive
    for epoch in range(epochs):
        outputs, trace = mlp_forward_features(
            train_inputs, weights, biases, activation, noise.for_epoch(epoch)
        )
        residual = outputs - train_targets
        losses = residual.square().mean(dim=(1, 2))
        if use_l1:
            losses = losses + l1_strength.flatten() * flat_weights.abs().sum(dim=1)
        if use_l2_penalty:
            losses = losses + l2_penalty_strength.flatten() * flat_weights.square().sum(dim=1)
        newly_failed = state.check(losses, "network", epoch)
        if newly_failed:
            alive = state.alive
        weight_gradients, bias_gradients = mlp_backward(
            residual.mul_(output_scale), weights, trace, activation
        )
        gradient = torch.cat([g.reshape(len(configs), -1) for g in weight_gradients + bias_gradients], dim=1)
        if use_l1:
            gradient[:, :weight_count].add_(l1_strength * flat_weights.sign())
        if use_l2_penalty:
            gradient[:, :weight_count].add_(2 * l2_penalty_strength * flat_weights)
        if use_clip:
            # The penalties' gradients are clipped with the rest; the coupled decay comes after, in the step.
            clip_gradient_norms_([gradient], clip)
        optimizer.step(None if state.all_alive else alive, [gradient])
        if newly_failed:
            _freeze_failed([flat], alive)
        if (epoch + 1) % first.curve_every == 0 or epoch + 1 == epochs:
            curves["epoch"].append(epoch + 1)
            curves["train_mse"].append(mse(train_inputs, train_targets).tolist())
            curves["val_mse"].append(mse(validation_inputs, validation_targets).tolist())
        if progress is not None:
            progress(1)
    # A model can blow up on its very last step; check the trained parameters once more.
    if state.check(mse(train_inputs, train_targets), "network", epochs):
        _freeze_failed([flat], state.alive)
    return curves, weights, biases


def _train_saes(configs, seeds, datasets, weights, biases, state: _PassState, progress, device):
    """The SAE of every model on its network's clean last hidden layer (train split)."""
    with torch.no_grad():
        train_inputs = _stack_features([dataset.train_inputs for dataset in datasets], device)
        _, trace = mlp_forward_features(
            train_inputs, weights, biases, runs_of([config.network.act for config in configs])
        )
        hidden = trace.inputs[-1].transpose(1, 2)  # [model, sample, hidden]: the SAE code is sample-major
    return train_saes_on_hidden(configs, seeds, hidden, state, progress, device)


def sae_starting_point(configs, seeds, hidden: torch.Tensor):
    """What both engines start an SAE pass from: (architecture, (mean, std) `[model, hidden]` of the
    train split, standardized `hidden`, the training inputs (standardized unless `sae.train_on == "raw"`),
    one initial parameter dict per seed from its "sae" generator)."""
    sae_config = configs[0].sae
    architecture = sae_architectures.architecture(sae_config.architecture)
    with torch.no_grad():
        mean, std = sae_architectures.standardization(hidden)
        standardized = ((hidden - mean.unsqueeze(-2)) / std.unsqueeze(-2)).contiguous()
        training_inputs = standardized if sae_config.train_on == "standardized" else hidden.contiguous()
    initial = [
        architecture.initial_parameters(
            hidden.shape[-1], sae_config.d_sae, sae_config, generator_for(seed, "sae")
        )
        for seed in seeds
    ]
    return architecture, (mean, std), standardized, training_inputs, initial


def train_saes_on_hidden(
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    hidden: torch.Tensor,
    state: _PassState | None = None,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
):
    """Train one SAE per model on `hidden: [model, sample, hidden]` (the train split's last hidden layer).

    The SAE settings are `configs[0].sae` for every model (one pass, one schedule); the learning rate may
    differ per model. Each SAE's initialization comes from its seed's "sae" generator, so SAEs trained here
    on stored networks start exactly where the SAEs of the original pass started. Inputs are the
    train-split standardization of `hidden` unless `sae.train_on == "raw"` (the published code's
    defect 2, kept for the bug-compatible ladder); evaluation always standardizes. Architectures with
    `tied = True` keep the encoder equal to the decoder's transpose after every step, with both Adam
    updates landing in the shared weight, as the published code's accidental view did.

    Returns (curves, parameters `{name: [model, ...]}`, (mean, std) `[model, hidden]` each).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    state = state or _PassState(len(configs), device)
    from pipeline import fused  # the fused CPU engine, when it applies (the code below is its reference)

    if fused.applies(device, configs[0].sae.architecture):
        return fused.train_saes_on_hidden(configs, seeds, hidden.detach(), state, progress, device)
    sae_config = configs[0].sae
    architecture, (mean, std), standardized, training_inputs, initial = sae_starting_point(
        configs, seeds, hidden
    )
    parameters = {name: _stack([model[name] for model in initial], device) for name in initial[0]}
    optimizer = BatchedAdam(
        sae_architectures.trained_parameters(architecture, parameters),
        lr=_per_model_tensor((c.sae.lr for c in configs), device),
    )
    clip = _per_model_tensor((c.sae.grad_clip for c in configs), device)
    use_clip = bool(clip.any())
    tied = getattr(architecture, "tied", False)
    training_state: dict[str, torch.Tensor] = {}  # the architecture's own bookkeeping (AuxK's dead latents)
    curves: dict[str, list] = {"epoch": [], "sae_loss": [], "sae_l0": [], "sae_dead_fraction": []}
    alive = state.alive
    hand_written = getattr(architecture, "losses_and_gradients", None)
    training_features = training_inputs.transpose(1, 2).contiguous() if hand_written else None
    for epoch in range(sae_config.epochs):
        if hand_written is not None:
            # No autograd graph: building one for these ops cost more than the ops themselves.
            with torch.no_grad():
                losses, gradients = hand_written(parameters, training_features, sae_config)
        else:
            losses = sae_architectures.training_losses(
                architecture, parameters, training_inputs, sae_config, training_state
            )
        newly_failed = state.check(losses, "sae", epoch)
        if newly_failed:
            alive = state.alive
        decoder_before = parameters["decoder"].detach().clone() if tied else None
        if hand_written is not None:
            gradient_list = [gradients[name] for name in parameters]
            if use_clip:
                clip_gradient_norms_(gradient_list, clip)
            optimizer.step(None if state.all_alive else alive, gradient_list)
        else:
            optimizer.zero_grad()
            (losses if state.all_alive else torch.where(alive, losses, 0.0)).sum().backward()
            sae_architectures.before_update(architecture, parameters)
            if use_clip:
                # After the unit-norm projection of the decoder's gradient: the gradient Adam is about to see.
                clip_gradient_norms_([p.grad for p in optimizer.parameters if p.grad is not None], clip)
            optimizer.step(None if state.all_alive else alive)
            sae_architectures.after_update(architecture, parameters)
        if tied:
            _tie(parameters, decoder_before)
        if newly_failed:
            _freeze_failed(list(parameters.values()), alive)
        if (epoch + 1) % configs[0].curve_every == 0 or epoch + 1 == sae_config.epochs:
            with torch.no_grad():
                active = architecture.encode(parameters, standardized, sae_config) > 0
                curves["epoch"].append(epoch + 1)
                curves["sae_loss"].append(losses.detach().tolist())
                curves["sae_l0"].append(active.float().mean(dim=(1, 2)).tolist())
                curves["sae_dead_fraction"].append((~active.any(dim=1)).float().mean(dim=1).tolist())
        if progress is not None:
            progress(1)
    sae_architectures.after_training(architecture, parameters, training_inputs, sae_config)
    detached = {name: value.detach() for name, value in parameters.items()}
    return curves, detached, (mean, std)


@torch.no_grad()
def _tie(parameters: dict[str, torch.Tensor], decoder_before: torch.Tensor) -> None:
    """Fold the two Adam updates of a tied SAE into its one shared weight.

    In the published code the encoder weight is a view of the decoder's transpose: autograd gives each
    its own gradient, Adam keeps a state for each, and each in-place update writes into the one storage.
    With separate tensors here the step moved the decoder by −u_dec and the encoder by −u_enc, so the
    shared weight is D − u_dec − u_encᵀ = decoder + encoderᵀ − D (D the weight before the step).
    """
    decoder, encoder = parameters["decoder"], parameters["encoder"]
    shared = decoder + encoder.transpose(-2, -1) - decoder_before
    decoder.copy_(shared)
    encoder.copy_(shared.transpose(-2, -1))
