"""Incidental polysemanticity: the tied ReLU-output autoencoder of Lecomte et al. and its measurements.

Model (docs/science.md §2.1; Lecomte et al., "What causes polysemanticity?", seeds 001/003): n features, m hidden
neurons, tied weights W ∈ R^{n×m}, no biases, ReLU on the output only:

    h = x W (+ ξ),    x̂ = ReLU(h Wᵀ),    loss = Σ (x̂ − x)² + λ·Σ |x W|

trained on the n standard basis vectors, so the whole batch is the identity and h = W (+ ξ) (data "basis", the
published model), or on co-occurring features (data "bernoulli", `cooccurring_inputs`): each feature on
independently with probability p, at the same magnitude 1 as a basis vector. Every instance
is an independent model; all instances of one config share a single batched pass (`W: [instance, n, m]`), and
their losses are summed for the backward pass, which leaves each instance's gradient untouched.

Randomness is explicit and per instance: the initial weights and the hidden-layer noise of instance k come
from generators seeded by (seed, k), so instance k follows the same trajectory whether it is trained alone
(`instances=1, first_instance=k`) or in a batch, and the initial weights do not depend on the noise type.

The sparsification ODE of §2.4 (one encoding under feature benefit + L1, interference switched off) lives
here too, with its closed-form prediction.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config_tools import (  # the maxima live there so the command line shows them without torch
    DYNAMICS_MAX_M,  # noqa: F401 - part of this study's documented limits
    DYNAMICS_MAX_STEPS,  # noqa: F401
    INCIDENTAL_MAX_WEIGHTS,
    INCIDENTAL_MAXIMA,
    OVERRIDE_FLAG,
    ConfigError,
    check_choice,
    check_integer,
    check_maximum,
    check_positive,
    size_limits_active,
)
from pipeline.experiments.incidental_defaults import COOCCURRENCE_MAX_BATCH

NOISE_TYPES = ("none", "bipolar", "gaussian", "laplace", "student_t")
NOISE_SHARING = ("per_sample", "per_step")
DATA_KINDS = ("basis", "bernoulli")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("cpu", "auto", "cuda", "mps")

# Excess kurtosis κ of each noise family (Student-t: 6/(ν−4), finite only for ν > 4), docs/science.md §2.3.
NOISE_EXCESS_KURTOSIS = {"bipolar": -2.0, "gaussian": 0.0, "laplace": 3.0}

# Numerical behaviour of the sparsification ODE documented in docs/science.md §2.4: the number of non-zeros m′ runs
# 2–2.7× above the prediction ‖w‖₁² while the prediction is in its 1/(λt) regime, because the survivors are
# unequal, and the last weight is alone at t ≈ 1.6/λ to 2/λ rather than at the predicted 1/λ.
SPARSIFICATION_NONZEROS_RATIO = (2.0, 2.7)
SPARSIFICATION_COMPLETION = (1.6, 2.0)  # in units of 1/λ
# What `simulate_sparsification` must satisfy (tests): over t ∈ [0.05/λ, 1/λ] the ratio m′/prediction stays in
# [1, 3.5] (m = 1e4, λ = 1e-3 gives median 2.8, range 1.7–3.2; m′ is an integer, so the ratio jumps once only a
# few weights are left), and m′ reaches 1 by t = 2.5/λ (1.98/λ there).
SPARSIFICATION_MIDDLE_WINDOW = (0.05, 1.0)  # in units of 1/λ
SPARSIFICATION_RATIO_TOLERANCE = (1.0, 3.5)
SPARSIFICATION_COMPLETION_LIMIT = 2.5  # in units of 1/λ

# Convergence of an L1 (collisions) point: an instance has converged when its encodings have sparsified, i.e.
# the mean over features of the direction fourth norm Σ_j W_ij⁴ / (Σ_j W_ij²)² (1 for a one-hot encoding, 1/k
# spread over k neurons, ≈ 3/(m+2) at init) is at least this. Measured at n = m = 64, λ = 1e-3, AdamW lr 1e-3,
# 16 instances, seeds 0–3: the first step where every instance reaches 0.98 (8750–9000) leaves a mean
# |count − final count| of 0.06 neurons per instance; at 0.9 (7250–7500) it is 0.6–0.9, the mean count 4–6 %
# low. Trained to convergence the value is 1.000 at λ = 1e-3 … 1e-1 (the length is normalised away; the raw
# fourth norm settles at ≈ 1 − λ/2, 0.95 at λ = 0.1, which is why the raw one is not used).
CONVERGENCE_THRESHOLD = 0.98

# Seed streams: the init, the noise and the sampled inputs of one instance come from independent generators.
_INIT_STREAM = 0
_NOISE_STREAM = 1
_DATA_STREAM = 2
_EVALUATION_STREAM = 3
# Co-occurrence points measure their data loss on this many fixed inputs per instance (`evaluation_inputs`).
EVALUATION_SAMPLES = 2048
# Noise is drawn in blocks of steps, about this many numbers per instance per block; the block length depends
# only on (n, m, noise_sharing), never on the number of instances or steps, so draws are reproducible.
_NOISE_BLOCK_NUMBERS = 1 << 18


@dataclass(frozen=True)
class IncidentalConfig:
    """One point of the incidental-polysemanticity study: model, noise, optimizer and measurement settings.

    Defaults follow the published L1 experiment (AdamW lr 1e-3 with torch's default weight decay 0.01 active,
    λ = 1e-3, 7500 steps, 16 instances) at a CPU-friendly n = 64, m = 128.

    noise: distribution of ξ added to the hidden layer, scaled so its standard deviation is `sigma`
        (bipolar ±σ; gaussian N(0, σ²); laplace with scale σ/√2; student_t with ν = `nu` rescaled by
        √((ν−2)/ν)). "none" requires sigma = 0, any other type requires sigma > 0.
    noise_sharing: "per_sample" draws an independent ξ for every row of the batch (the model as written);
        "per_step" draws one ξ per step shared by the whole batch, as the published code did (the published
        code also shared it across instances; here each instance keeps its own stream).
    weight_decay: AdamW's decoupled weight decay; must be 0 with optimizer "sgd".
    first_instance: index of the first instance; instances first_instance … first_instance+instances−1 are
        trained, so a study can be extended, or one instance re-run alone, without changing the others.
    curve_every: steps between recorded curve points (step 0 and the last step are always recorded).
    polysemantic_low/high: a weight "represents" a feature when |W_ij| ∈ [low, high] (docs/science.md §2.2).
    device: "cpu", "cuda", "mps", or "auto" (cuda if available, then mps, else cpu).
    data: "basis" trains on the n basis vectors, the whole identity batch every step (the published model);
        "bernoulli" on `batch_size` fresh inputs per step from `cooccurring_inputs`: each feature on
        independently with probability p, at value 1 (the magnitude of a basis vector), empty inputs left
        out (they carry no gradient); p = 0 is the limit p → 0, exactly one feature per input. The loss is
        then normalised per feature occurrence (`occurrence_scale`) so that its p → 0 limit is the basis loss.
        Hidden-layer noise is not combined with "bernoulli".
    p: probability that a feature is on (data "bernoulli" only; 0 with "basis").
    batch_size: inputs per step with data "bernoulli" (ignored by "basis", whose batch is the identity).
    """

    n: int = 64
    m: int = 128
    instances: int = 16
    first_instance: int = 0
    steps: int = 7500
    l1: float = 1e-3
    noise: str = "none"
    sigma: float = 0.0
    nu: float = 5.0
    noise_sharing: str = "per_sample"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    curve_every: int = 100
    polysemantic_low: float = 0.8
    polysemantic_high: float = 1.2
    device: str = "cpu"
    # Added with the co-occurrence study; at their defaults they are left out of the config hash, so every
    # basis-data point keeps the identity it had before they existed.
    data: str = field(default="basis", metadata={"hash_omit_default": True})
    p: float = field(default=0.0, metadata={"hash_omit_default": True})
    batch_size: int = field(default=64, metadata={"hash_omit_default": True})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what it allows."""
        check_integer("n", self.n, minimum=1)
        check_integer("m", self.m, minimum=1)
        check_integer("instances", self.instances, minimum=1)
        check_integer("first_instance", self.first_instance, minimum=0)
        check_integer("steps", self.steps, minimum=1)
        check_integer("seed", self.seed, minimum=0)
        check_integer("curve_every", self.curve_every, minimum=1)
        check_positive("l1", self.l1, allow_zero=True)
        check_choice("noise", self.noise, NOISE_TYPES)
        check_positive("sigma", self.sigma, allow_zero=True)
        if self.noise == "none" and self.sigma != 0:
            raise ConfigError(f"sigma must be 0 when noise is 'none'; got {self.sigma!r}")
        if self.noise != "none" and self.sigma == 0:
            raise ConfigError(f"sigma must be > 0 when noise is {self.noise!r}; got {self.sigma!r}")
        check_positive("nu", self.nu)
        if self.nu <= 2:
            raise ConfigError(
                f"nu must be > 2 (Student-t variance is finite only for nu > 2); got {self.nu!r}"
            )
        check_choice("noise_sharing", self.noise_sharing, NOISE_SHARING)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.optimizer == "sgd" and self.weight_decay != 0:
            raise ConfigError(
                f"weight_decay applies to optimizer 'adamw' only; set weight_decay=0 with optimizer 'sgd'; "
                f"got {self.weight_decay!r}"
            )
        check_positive("polysemantic_low", self.polysemantic_low)
        check_positive("polysemantic_high", self.polysemantic_high)
        if self.polysemantic_high <= self.polysemantic_low:
            raise ConfigError(
                f"polysemantic_high must be > polysemantic_low ({self.polysemantic_low!r}); "
                f"got {self.polysemantic_high!r}"
            )
        check_choice("device", self.device, DEVICES)
        check_choice("data", self.data, DATA_KINDS)
        check_integer("batch_size", self.batch_size, minimum=1)
        if not (isinstance(self.p, (int, float)) and 0 <= self.p <= 1):
            raise ConfigError(f"p must lie in [0, 1]; got {self.p!r}")
        if self.data == "basis" and self.p != 0:
            raise ConfigError(
                f"p applies to data 'bernoulli' only; use p=0 with data 'basis'; got {self.p!r}"
            )
        if self.data == "bernoulli" and self.noise != "none":
            raise ConfigError(
                f"noise must be 'none' with data 'bernoulli' (hidden-layer noise is studied on basis data); "
                f"got {self.noise!r}"
            )
        check_maximum("batch_size", self.batch_size, COOCCURRENCE_MAX_BATCH)
        for name, maximum in INCIDENTAL_MAXIMA.items():
            check_maximum(name, getattr(self, name), maximum)
        weights = self.instances * self.n * self.m
        if size_limits_active() and weights > INCIDENTAL_MAX_WEIGHTS:
            raise ConfigError(
                f"the weights instances × n × m must be <= {INCIDENTAL_MAX_WEIGHTS} per point (about 3 GB with "
                f"its gradients, optimizer state and noise); got {self.instances} × {self.n} × {self.m} = "
                f"{weights} ({OVERRIDE_FLAG} lifts the limit)"
            )
        activations = self.instances * self.batch_size * max(self.n, self.m)
        if self.data == "bernoulli" and size_limits_active() and activations > INCIDENTAL_MAX_WEIGHTS:
            raise ConfigError(
                f"the activations instances × batch_size × max(n, m) must be <= {INCIDENTAL_MAX_WEIGHTS} per "
                f"point; got {self.instances} × {self.batch_size} × {max(self.n, self.m)} = {activations} "
                f"({OVERRIDE_FLAG} lifts the limit)"
            )

    def replace(self, **changes: Any) -> IncidentalConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class IncidentalResult:
    """Outcome of `train_incidental`.

    initial_weights, final_weights: [instance, n, m] float32 CPU tensors.
    curves: lists of equal length keyed "step", "loss", "fourth_norm", "polysemantic_neurons" — means over
        instances of the noise-free loss and of the measurements, after `step` updates (step 0 = init).
    measurements: one list per measurement, one entry per instance (see `measure_instances`).
    instance_indices: global index of each instance (first_instance …).
    device: the device that actually ran the training.
    """

    config: IncidentalConfig
    initial_weights: torch.Tensor
    final_weights: torch.Tensor
    curves: dict[str, list[float]]
    measurements: dict[str, list[float]]
    instance_indices: list[int]
    wall_time_s: float
    device: str


# ------------------------------------------------------------------------------------------------------------
# Randomness


def instance_seed(seed: int, instance: int, stream: int) -> int:
    """64-bit seed for one (config seed, instance index, stream) triple, via numpy's SeedSequence."""
    words = np.random.SeedSequence([seed, instance, stream]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def instance_generator(seed: int, instance: int, stream: int) -> torch.Generator:
    """CPU torch.Generator for one instance and stream (init or noise)."""
    return torch.Generator(device="cpu").manual_seed(instance_seed(seed, instance, stream))


def initial_weights(config: IncidentalConfig) -> torch.Tensor:
    """W_ij ~ N(0, 1/m) for each instance, from that instance's own generator: [instance, n, m] float32."""
    draws = [
        torch.randn(config.n, config.m, generator=instance_generator(config.seed, index, _INIT_STREAM))
        for index in _instance_indices(config)
    ]
    return torch.stack(draws) / math.sqrt(config.m)


def sample_noise(
    noise: str,
    sigma: float,
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    nu: float = 5.0,
    numpy_generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """I.i.d. zero-mean noise with standard deviation `sigma`, float32 CPU tensor of `shape`.

    bipolar: ±σ with equal probability (excess kurtosis −2).
    gaussian: σ·N(0, 1) (0).
    laplace: inverse CDF of a uniform, F⁻¹(p) = −b·sgn(p−½)·ln(1 − 2|p−½|) with b = σ/√2 (+3).
    student_t: Z / sqrt(χ²_ν/ν) scaled by σ·√((ν−2)/ν) (6/(ν−4) for ν > 4); for integer ν the χ²_ν is a sum
        of ν squared standard normals from `generator`, otherwise numpy's `standard_t` from `numpy_generator`.
    """
    if noise == "bipolar":
        signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
        return (signs.float() * 2 - 1) * sigma
    if noise == "gaussian":
        return torch.randn(shape, generator=generator) * sigma
    if noise == "laplace":
        centred = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        # torch.rand can return exactly 0, i.e. p − ½ = −½; keep the log argument strictly positive.
        tail = (1 - 2 * centred.abs()).clamp_min(torch.finfo(torch.float64).tiny)
        scale = sigma / math.sqrt(2)
        return (-scale * torch.sign(centred) * torch.log(tail)).float()
    if noise == "student_t":
        scale = sigma * math.sqrt((nu - 2) / nu)
        if float(nu).is_integer():
            normals = torch.randn((int(nu) + 1, *shape), generator=generator, dtype=torch.float64)
            chi_square = normals[1:].square().sum(dim=0)
            return (scale * normals[0] / torch.sqrt(chi_square / nu)).float()
        if numpy_generator is None:
            raise ValueError("non-integer nu needs a numpy_generator")
        return torch.from_numpy(scale * numpy_generator.standard_t(nu, size=shape)).float()
    raise ValueError(f"noise must be one of {', '.join(NOISE_TYPES[1:])}; got {noise!r}")


class _NoiseStream:
    """Per-instance noise, drawn a block of steps at a time: yields ξ of shape [instance, rows, m]."""

    def __init__(self, config: IncidentalConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.rows = config.n if config.noise_sharing == "per_sample" else 1
        self.block_steps = max(1, _NOISE_BLOCK_NUMBERS // (self.rows * config.m))
        indices = _instance_indices(config)
        self.generators = [instance_generator(config.seed, index, _NOISE_STREAM) for index in indices]
        self.numpy_generators = [
            np.random.default_rng(instance_seed(config.seed, index, _NOISE_STREAM)) for index in indices
        ]
        self.block: torch.Tensor | None = None

    def at(self, step: int) -> torch.Tensor:
        position = step % self.block_steps
        if position == 0 or self.block is None:
            shape = (self.block_steps, self.rows, self.config.m)
            draws = [
                sample_noise(
                    self.config.noise,
                    self.config.sigma,
                    shape,
                    generator,
                    nu=self.config.nu,
                    numpy_generator=numpy_generator,
                )
                for generator, numpy_generator in zip(self.generators, self.numpy_generators, strict=True)
            ]
            # [block, instance, rows, m], so one step's noise is a contiguous slice.
            self.block = torch.stack(draws, dim=1).to(self.device)
        return self.block[position]


def cooccurring_inputs(first_uniform: torch.Tensor, rest_uniform: torch.Tensor, p: float) -> torch.Tensor:
    """Inputs with each of n features on independently with probability p, conditioned on at least one on.

    first_uniform: [..., 1] float64 uniforms on [0, 1); rest_uniform: [..., n] uniforms. Returns [..., n]
    float32 with entries 0 or 1: an active feature has value 1, the magnitude of a basis vector.

    Exact sampler of Bernoulli(p)^n given a non-empty input, without rejection: the first active feature F
    has P(F = f) = (1 − p)^f·p / q with q = 1 − (1 − p)^n (a truncated geometric, drawn by inverse CDF:
    F = ⌊log(1 − u·q) / log(1 − p)⌋), the features before F are off and those after it are on independently
    with probability p. Empty inputs are left out because the model maps x = 0 to x̂ = ReLU(0) = 0 with zero
    loss and zero gradient: they only rescale the objective (`occurrence_scale`). p = 0 is the limit p → 0:
    F uniform over the n features and nothing else on, i.e. a uniformly drawn basis vector (small p gives
    the same inputs on the same uniforms). Drawing every p from the same uniforms couples the points of a
    sweep (common random numbers), so that they are paired on the instance.
    """
    n = rest_uniform.shape[-1]
    if p == 0:
        first = (first_uniform * n).floor()
    else:
        q = -math.expm1(n * math.log1p(-p))  # 1 − (1 − p)^n without cancellation for small p
        first = torch.floor(torch.log1p(-first_uniform * q) / math.log1p(-p))
    first = first.clamp(0, n - 1)
    index = torch.arange(n, dtype=first.dtype, device=first.device)
    after = (index > first) & (rest_uniform < p)
    return ((index == first) | after).float()


def occurrence_scale(n: int, p: float) -> float:
    """q/p with q = 1 − (1 − p)^n, the probability that a Bernoulli(p) input is non-empty; n at p = 0.

    The co-occurrence loss is (q/p)·mean over non-empty inputs = E_x[loss(x)]/p over all inputs, i.e. the
    loss per expected feature occurrence; since E_x[loss(x)] = p·Σ_i loss(e_i) + O(p²), its p → 0 limit is the
    basis loss Σ_i loss(e_i), so λ and the learning rate mean the same at every p.
    """
    if p == 0:
        return float(n)
    return -math.expm1(n * math.log1p(-p)) / p


class _InputStream:
    """Per-instance co-occurring inputs, a block of steps at a time: yields X of shape [instance, batch, n]."""

    def __init__(self, config: IncidentalConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.block_steps = max(1, _NOISE_BLOCK_NUMBERS // (config.batch_size * (config.n + 1)))
        self.generators = [
            instance_generator(config.seed, index, _DATA_STREAM) for index in _instance_indices(config)
        ]
        self.block: torch.Tensor | None = None

    def at(self, step: int) -> torch.Tensor:
        position = step % self.block_steps
        if position == 0 or self.block is None:
            draws = []
            for generator in self.generators:
                shape = (self.block_steps, self.config.batch_size)
                first = torch.rand((*shape, 1), generator=generator, dtype=torch.float64)
                rest = torch.rand((*shape, self.config.n), generator=generator)
                draws.append(cooccurring_inputs(first, rest, self.config.p))
            self.block = torch.stack(draws, dim=1).to(self.device)  # [block, instance, batch, n]
        return self.block[position]


def evaluation_inputs(config: IncidentalConfig, samples: int = EVALUATION_SAMPLES) -> torch.Tensor:
    """Fixed co-occurring inputs for measuring the data loss, [instance, samples, n], from a stream of their own."""
    draws = []
    for index in _instance_indices(config):
        generator = instance_generator(config.seed, index, _EVALUATION_STREAM)
        first = torch.rand((samples, 1), generator=generator, dtype=torch.float64)
        rest = torch.rand((samples, config.n), generator=generator)
        draws.append(cooccurring_inputs(first, rest, config.p))
    return torch.stack(draws)


# ------------------------------------------------------------------------------------------------------------
# Model and training


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's `device`: "auto" → cuda if available, then mps, else cpu.

    Raises ValueError when "cuda" or "mps" is named but torch does not see it, so a caller can refuse the
    request before any work starts instead of failing at the first step.
    """
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use auto or cpu")
    if name == "mps" and not mps_available:
        raise ValueError("device 'mps' was asked for but torch sees no MPS device; use auto or cpu")
    return torch.device(name)


def reconstruction(weights: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ = ReLU((W + ξ) Wᵀ) for the identity batch: [instance, sample, feature] from W [instance, n, m].

    noise: ξ broadcastable to W, i.e. [instance, n, m] (per sample) or [instance, 1, m] (per step).
    """
    hidden = weights if noise is None else weights + noise
    return torch.relu(hidden @ weights.transpose(-1, -2))


def instance_losses(weights: torch.Tensor, l1: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Σ (x̂ − x)² + λ·‖h‖₁ per instance, h taken without noise (for basis inputs ‖h‖₁ = Σ|W|): [instance]."""
    identity = torch.eye(weights.shape[-2], dtype=weights.dtype, device=weights.device)
    squared_error = (reconstruction(weights, noise) - identity).square().sum(dim=(-1, -2))
    return squared_error + l1 * weights.abs().sum(dim=(-1, -2))


def loss_gradient(weights: torch.Tensor, l1: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """∂/∂W of the summed `instance_losses`, written out to skip autograd's per-step overhead: [instance, n, m].

    With H = W + ξ, Y = H Wᵀ and G = ∂L/∂Y = 2·(ReLU(Y) − I)⊙1[Y > 0] (ReLU'(0) = 0, as in torch),
    ∂L/∂W = G W (through the encoder, ∂H/∂W = 1) + Gᵀ H (through the tied decoder) + λ·sign(W);
    without noise H = W and the first two terms combine into (G + Gᵀ) W. Tests check it against autograd.
    """
    hidden = weights if noise is None else weights + noise
    logits = hidden @ weights.transpose(-1, -2)
    identity = torch.eye(weights.shape[-2], dtype=weights.dtype, device=weights.device)
    upstream = 2 * (torch.relu(logits) - identity) * (logits > 0)
    if noise is None:
        gradient = (upstream + upstream.transpose(-1, -2)) @ weights
    else:
        gradient = upstream @ weights + upstream.transpose(-1, -2) @ hidden
    if l1 > 0:
        gradient = gradient + l1 * torch.sign(weights)
    return gradient


def batch_losses(weights: torch.Tensor, inputs: torch.Tensor, l1: float, scale: float = 1.0) -> torch.Tensor:
    """scale·mean over inputs of ‖ReLU(x W Wᵀ) − x‖² + λ·‖x W‖₁, per instance: [instance].

    weights: [instance, n, m]; inputs: [instance, batch, n]. With scale = `occurrence_scale(n, p)` and
    non-empty co-occurring inputs this estimates E_x[loss(x)]/p (see there).
    """
    hidden = inputs @ weights
    output = torch.relu(hidden @ weights.transpose(-1, -2))
    per_input = (output - inputs).square().sum(dim=-1) + l1 * hidden.abs().sum(dim=-1)
    return scale * per_input.mean(dim=-1)


def batch_loss_gradient(weights: torch.Tensor, inputs: torch.Tensor, l1: float, scale: float) -> torch.Tensor:
    """∂/∂W of the summed `batch_losses`, written out: [instance, n, m].

    With H = X W, Y = H Wᵀ and G = ∂L/∂Y = 2·(ReLU(Y) − X)⊙1[Y > 0]: ∂L/∂W = Xᵀ(G W + λ·sign(H)) (through the
    encoder) + Gᵀ H (through the tied decoder), times scale/batch. With X = I this is `loss_gradient`.
    Tests check it against autograd.
    """
    hidden = inputs @ weights
    logits = hidden @ weights.transpose(-1, -2)
    upstream = 2 * (torch.relu(logits) - inputs) * (logits > 0)
    through_encoder = upstream @ weights
    if l1 > 0:
        through_encoder = through_encoder + l1 * torch.sign(hidden)
    gradient = inputs.transpose(-1, -2) @ through_encoder + upstream.transpose(-1, -2) @ hidden
    return gradient * (scale / inputs.shape[-2])


def make_optimizer(weights: torch.Tensor, config: IncidentalConfig) -> torch.optim.Optimizer:
    """The config's optimizer over `weights` (a leaf tensor), fresh state."""
    if config.optimizer == "adamw":
        # torch's fused AdamW (one pass over the weights instead of a dozen foreach passes) where it
        # exists. The step's two matrix products run at 80–160 GFLOP/s on 2 cores at n = 64, m = 64…512;
        # the foreach update then took 40–60 % of the step (a step at 40–66 GFLOP/s, 19–31 % of the
        # measured 216 GFLOP/s peak); fused, a step runs at 45–95 GFLOP/s, 1.1× (m = 64) to 1.8× faster.
        return torch.optim.AdamW(
            [weights],
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=True if weights.device.type in ("cpu", "cuda") else None,
        )
    return torch.optim.SGD([weights], lr=config.lr)


def continue_training(
    weights: torch.Tensor,
    config: IncidentalConfig,
    steps: int,
    *,
    every: int,
    measure: Callable[[torch.Tensor, int], None],
) -> torch.Tensor:
    """Train given weights [instance, n, m'] on the basis data of `config` (its λ and optimizer, fresh
    optimizer state, no hidden noise) for `steps` more steps; returns the final weights on the CPU.

    measure(weights, step) is called with the detached weights at step 0, every `every` steps and at the
    end. Any width m' works: the splitting remedy trains models grown by the split copies. Columns that are
    exactly zero stay zero (their gradient (G + Gᵀ)·0 and sign(0) are 0, and AdamW's decay keeps 0), so
    instances of one batch may be padded with zero columns.
    """
    device = resolve_device(config.device)
    current = weights.detach().clone().to(device).requires_grad_(True)
    optimizer = make_optimizer(current, config)
    measure(current.detach(), 0)
    for step in range(steps):
        with torch.no_grad():
            current.grad = loss_gradient(current, config.l1)
        optimizer.step()
        done = step + 1
        if done % every == 0 or done == steps:
            measure(current.detach(), done)
    return current.detach().cpu().clone()


def train_incidental(
    config: IncidentalConfig, progress: Callable[[int], None] | None = None
) -> IncidentalResult:
    """Train all instances of `config` in one batched pass and measure them.

    progress: called with the number of steps done at every curve point (about steps/curve_every calls).
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    start = initial_weights(config)
    weights = start.clone().to(device).requires_grad_(True)
    optimizer = make_optimizer(weights, config)
    noise = _NoiseStream(config, device) if config.noise != "none" else None
    sampled = config.data == "bernoulli"
    inputs = _InputStream(config, device) if sampled else None
    scale = occurrence_scale(config.n, config.p)
    evaluation = evaluation_inputs(config).to(device) if sampled else None

    curves: dict[str, list[float]] = {"step": [], "loss": [], "fourth_norm": [], "polysemantic_neurons": []}
    if sampled:
        curves["data_loss"] = []

    def record(step: int) -> None:
        with torch.no_grad():
            current = weights.detach()
            curves["step"].append(step)
            curves["loss"].append(instance_losses(current, config.l1).mean().item())
            curves["fourth_norm"].append(fourth_norm(current).mean().item())
            count = polysemantic_neurons(current, config.polysemantic_low, config.polysemantic_high)
            curves["polysemantic_neurons"].append(count.float().mean().item())
            if evaluation is not None:
                curves["data_loss"].append(batch_losses(current, evaluation, config.l1, scale).mean().item())

    record(0)
    for step in range(config.steps):
        with torch.no_grad():
            if inputs is not None:
                weights.grad = batch_loss_gradient(weights, inputs.at(step), config.l1, scale)
            else:
                weights.grad = loss_gradient(
                    weights, config.l1, noise.at(step) if noise is not None else None
                )
        optimizer.step()
        done = step + 1
        if done % config.curve_every == 0 or done == config.steps:
            record(done)
            if progress is not None:
                progress(done)

    final = weights.detach().cpu().clone()
    return IncidentalResult(
        config=config,
        initial_weights=start,
        final_weights=final,
        curves=curves,
        measurements=measure_instances(
            start, final, config, evaluation.cpu() if evaluation is not None else None
        ),
        instance_indices=_instance_indices(config),
        wall_time_s=time.perf_counter() - started,
        device=str(device),
    )


def measure_instances(
    initial: torch.Tensor,
    final: torch.Tensor,
    config: IncidentalConfig,
    evaluation: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """Every per-instance measurement of a trained batch, as plain lists (one entry per instance).

    initial, final: [instance, n, m]. evaluation: fixed co-occurring inputs [instance, samples, n]
    (`evaluation_inputs`), given for data "bernoulli": adds data_loss, the co-occurrence loss on them.
    """
    low, high = config.polysemantic_low, config.polysemantic_high
    measured = {
        "polysemantic_neurons": polysemantic_neurons(final, low, high),
        "opposite_sign_neurons": opposite_sign_polysemantic_neurons(final, low, high),
        "opposite_sign_fraction": polysemantic_sign_structure(final, low, high),
        "fourth_norm": fourth_norm(final),
        "fourth_norm_initial": fourth_norm(initial),
        "encoding_sparsity": encoding_sparsity(final),
        "initial_collisions": initial_collisions(initial),
        "initial_colliding_pairs": initial_colliding_pairs(initial),
        "initial_benign_pairs": initial_colliding_pairs(initial, opposite_signs=True),
        "winner_was_initial_argmax": winner_was_initial_argmax(initial, final),
        "final_loss": instance_losses(final, config.l1),
        "features_represented": features_represented(final),
        "features_per_neuron": features_per_neuron(final),
    }
    if evaluation is not None:
        measured["data_loss"] = batch_losses(
            final, evaluation, config.l1, occurrence_scale(config.n, config.p)
        )
    return {name: [float(value) for value in values.tolist()] for name, values in measured.items()}


def _instance_indices(config: IncidentalConfig) -> list[int]:
    return list(range(config.first_instance, config.first_instance + config.instances))


# ------------------------------------------------------------------------------------------------------------
# Measurements. Each takes one instance W: [n, m] or a batch [..., n, m] and returns a tensor over the leading
# dimensions (0-d for a single instance).


def _represented(weights: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """|W_ij| ∈ [low, high]: feature i is carried by neuron j at about unit strength. [..., n, m] bool."""
    magnitude = weights.abs()
    return (magnitude >= low) & (magnitude <= high)


def polysemantic_neurons(weights: torch.Tensor, low: float = 0.8, high: float = 1.2) -> torch.Tensor:
    """Number of neurons j with at least two features i having |W_ij| ∈ [low, high] (closed interval).

    Source: Lecomte et al. (seed 001), the count behind the n²/(4m) figure; docs/science.md §2.2.
    """
    return (_represented(weights, low, high).sum(dim=-2) >= 2).sum(dim=-1)


def monosemantic_neurons(weights: torch.Tensor, low: float = 0.8, high: float = 1.2) -> torch.Tensor:
    """[..., m] bool: neuron j carries exactly one feature at about unit strength (|W_ij| ∈ [low, high])."""
    return _represented(weights, low, high).sum(dim=-2) == 1


def features_represented(weights: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Number of features whose encoding has squared length ‖W_i‖² ≥ threshold: [..., n, m] → [...].

    A feature the model drops (as it must when dense features outnumber the neurons) has ‖W_i‖² → 0; one it
    reconstructs has ‖W_i‖² ≈ 1 (x̂_i = ‖W_i‖² for a lone feature), whether one-hot or spread over neurons.
    """
    return (weights.square().sum(dim=-1) >= threshold).sum(dim=-1)


def features_per_neuron(weights: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Mean over used neurons of the participation ratio (Σ_i W_ij²)² / Σ_i W_ij⁴: [..., n, m] → [...].

    The effective number of features a neuron answers to, without a threshold on single weights: 1 for a
    monosemantic neuron, 2 for a neuron holding two features at equal strength, k for k equal features, and
    large for the dense rotated encodings of co-occurring features, whose weights all lie below the [0.8, 1.2]
    window of `polysemantic_neurons`. A neuron is used when Σ_i W_ij² ≥ threshold; NaN without used neurons.
    """
    squared = weights.square().sum(dim=-2)
    fourth = weights.pow(4).sum(dim=-2)
    used = squared >= threshold
    ratio = squared.square() / fourth.clamp_min(torch.finfo(weights.dtype).tiny)
    total = torch.where(used, ratio, torch.zeros_like(ratio)).sum(dim=-1)
    count = used.sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def opposite_sign_polysemantic_neurons(
    weights: torch.Tensor, low: float = 0.8, high: float = 1.2
) -> torch.Tensor:
    """Polysemantic neurons whose qualifying weights (|W_ij| ∈ [low, high]) include both signs."""
    represented = _represented(weights, low, high)
    polysemantic = represented.sum(dim=-2) >= 2
    positive = (represented & (weights > 0)).any(dim=-2)
    negative = (represented & (weights < 0)).any(dim=-2)
    return (polysemantic & positive & negative).sum(dim=-1)


def polysemantic_sign_structure(weights: torch.Tensor, low: float = 0.8, high: float = 1.2) -> torch.Tensor:
    """Fraction of polysemantic neurons whose qualifying weights have opposite signs; NaN if there are none.

    Theory (seed 001, "benign and malign collisions"): a same-sign pair interferes through the output ReLU and
    one weight is driven to 0, an opposite-sign pair is clipped by the ReLU and survives, so the fraction
    should be 1.
    """
    total = polysemantic_neurons(weights, low, high).double()
    opposite = opposite_sign_polysemantic_neurons(weights, low, high).double()
    return torch.where(total > 0, opposite / total.clamp_min(1), torch.full_like(total, math.nan))


def _initial_argmax(weights: torch.Tensor) -> torch.Tensor:
    """argmax_j |W_ij| for every feature: [..., n] int64."""
    return weights.abs().argmax(dim=-1)


def _shared_argmax(weights: torch.Tensor) -> torch.Tensor:
    """[..., n, n] bool: features i ≠ k whose largest-|W| neuron is the same."""
    winners = _initial_argmax(weights)
    same = winners.unsqueeze(-1) == winners.unsqueeze(-2)
    return same & ~torch.eye(winners.shape[-1], dtype=torch.bool, device=weights.device)


def initial_collisions(weights: torch.Tensor) -> torch.Tensor:
    """Number of features i with argmax_j |W_ij| = argmax_j |W_kj| for some other feature k ≠ i.

    Applied to the initial weights this counts the features whose most-correlated neuron is contested;
    expectation n·(1 − (1 − 1/m)^{n−1}) for i.i.d. Gaussian init.
    """
    return _shared_argmax(weights).any(dim=-1).sum(dim=-1)


def initial_colliding_pairs(weights: torch.Tensor, *, opposite_signs: bool = False) -> torch.Tensor:
    """Number of unordered feature pairs {i, k} sharing their largest-|W| neuron j.

    This is the paper's count of collisions (seed 001: a three-way collision counts as three), expectation
    C(n, 2)/m. With opposite_signs, only pairs whose weights on that neuron have opposite signs — the benign
    collisions, expectation C(n, 2)/(2m) ≈ n²/(4m), which the polysemantic count is predicted to match.
    """
    shared = _shared_argmax(weights)
    if opposite_signs:
        winners = _initial_argmax(weights)
        winning_sign = torch.sign(torch.gather(weights, -1, winners.unsqueeze(-1)).squeeze(-1))
        shared = shared & (winning_sign.unsqueeze(-1) * winning_sign.unsqueeze(-2) < 0)
    return shared.sum(dim=(-1, -2)) // 2


def winner_was_initial_argmax(initial: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Fraction of features whose final largest-|W| neuron is the neuron that was largest at initialization.

    The winner-take-all story (seed 001) predicts most features are won by their initial argmax.
    """
    return (_initial_argmax(initial) == _initial_argmax(final)).double().mean(dim=-1)


def fourth_norm(weights: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
    """Mean over features of Σ_j W_ij⁴ (the published "fourth norm"; seed 003, docs/science.md §2.3).

    For a unit-length encoding this is the inverse participation ratio: 1 for a one-hot vector, 1/k for a
    vector spread equally over k neurons. Closed forms: E Σ_j W_ij⁴ = 3/m exactly at the N(0, 1/m) init,
    and 3/(m+2) for a uniformly random unit vector — the level a trained, unit-length but rotation-invariant
    (Gaussian-noise) encoding sits at. normalized=True divides each feature by ‖W_i‖₂⁴, giving the
    participation ratio of the direction alone (E = 3/(m+2) at init too; zero rows give NaN).
    """
    fourth = weights.pow(4).sum(dim=-1)
    if normalized:
        fourth = fourth / weights.square().sum(dim=-1).square()
    return fourth.mean(dim=-1)


def encoding_sparsity(weights: torch.Tensor) -> torch.Tensor:
    """Mean over features of the direction fourth norm Σ_j W_ij⁴ / (Σ_j W_ij²)²: [..., n, m] → [...].

    1 when every encoding is one-hot, whatever its length (a one-hot encoding of length a has raw fourth norm
    a⁴, which L1 holds below 1); 1/k for an encoding spread equally over k neurons; 3/(m+2) in expectation
    for a random direction, i.e. at init. A zero encoding counts 0: it has not sparsified onto a neuron.
    The convergence criterion of a collisions point (`assess_convergence`).
    """
    squared_length = weights.square().sum(dim=-1)
    direction_fourth = weights.pow(4).sum(dim=-1) / squared_length.square().clamp_min(
        torch.finfo(weights.dtype).tiny
    )
    return torch.where(squared_length > 0, direction_fourth, torch.zeros_like(direction_fourth)).mean(dim=-1)


@dataclass(frozen=True)
class Convergence:
    """Whether the instances of one L1 point have sparsified (`assess_convergence`).

    converged: every instance has encoding sparsity ≥ threshold.
    lowest_sparsity: the smallest per-instance encoding sparsity (NaN without instances).
    """

    converged: bool
    unconverged_instances: int
    instances: int
    lowest_sparsity: float
    threshold: float

    def reason(self) -> str:
        """Why the point is unconverged, in one phrase; "" when it has converged."""
        if self.converged:
            return ""
        return (
            f"{self.unconverged_instances} of {self.instances} instances have encoding sparsity below "
            f"{self.threshold:g} (lowest {self.lowest_sparsity:.3f}; one-hot encodings give 1)"
        )


def assess_convergence(
    sparsity: Sequence[float] | np.ndarray | torch.Tensor, threshold: float = CONVERGENCE_THRESHOLD
) -> Convergence:
    """A point has converged when every instance's encoding sparsity is ≥ threshold (CONVERGENCE_THRESHOLD).

    sparsity: per-instance `encoding_sparsity` values, [instance]. Every instance must pass because the
    polysemantic count is a mean over instances: one unsparsified instance contributes a count that is still
    rising (an encoding spread over neurons has no weight in [0.8, 1.2]). NaN values count as unconverged.
    """
    values = np.asarray(
        sparsity.detach().cpu() if isinstance(sparsity, torch.Tensor) else sparsity, dtype=np.float64
    ).ravel()
    passing = values >= threshold  # False for NaN
    return Convergence(
        converged=bool(values.size > 0 and passing.all()),
        unconverged_instances=int((~passing).sum()),
        instances=int(values.size),
        lowest_sparsity=float(np.nanmin(values)) if np.isfinite(values).any() else math.nan,
        threshold=threshold,
    )


def predicted_polysemantic_neurons(n: int, m: int) -> float:
    """n²/(4m): n²/(2m) colliding pairs of which half have opposite signs and survive (seed 001)."""
    return n * n / (4 * m)


def excess_kurtosis_of_projection(w: torch.Tensor | np.ndarray, kappa: float) -> float:
    """Excess kurtosis of w·ξ for ξ with i.i.d. zero-mean entries of excess kurtosis κ: κ·‖w‖₄⁴ / ‖w‖₂⁴.

    Cumulants of independent sums add and scale as c⁴ for the fourth and c² for the second, so
    κ₄(w·ξ)/κ₂(w·ξ)² = κ·Σ w_j⁴ / (Σ w_j²)² (seed 003, docs/science.md §2.3).
    """
    vector = np.asarray(w.detach().cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    return float(kappa * np.sum(vector**4) / np.sum(vector**2) ** 2)


def noise_excess_kurtosis(noise: str, nu: float = 5.0) -> float:
    """κ of a noise family (Student-t: 6/(ν−4), infinite for ν ≤ 4)."""
    if noise == "student_t":
        return 6.0 / (nu - 4.0) if nu > 4 else math.inf
    return NOISE_EXCESS_KURTOSIS[noise]


# ------------------------------------------------------------------------------------------------------------
# Speed of sparsification (docs/science.md §2.4)


def simulate_sparsification(
    m: int,
    l1: float,
    t_max: float,
    dt: float = 0.5,
    seed: int = 0,
    initial: np.ndarray | None = None,
    record_points: int = 400,
) -> dict[str, Any]:
    """Integrate dw/dt = (1 − ‖w‖²)·w − λ·sign(w) for one encoding w ∈ R^m (interference switched off).

    Explicit Euler with step dt from w ~ N(0, 1/m) (or `initial`). A weight that would cross zero is set to 0
    and stays there: sign(0) = 0 and (1 − ‖w‖²)·0 = 0, so zero is absorbing, which is also the exact flow of
    the ODE for a weight that reaches 0. The flow is symmetric in each weight's sign, so only the magnitudes of
    the surviving weights are integrated.

    Relation to the trained model (seed 001, footnote 7): the gradient of (‖w‖² − 1)² + λ_loss·‖w‖₁ is
    −4·[(1 − ‖w‖²)·w − (λ_loss/4)·sign(w)], so λ here is λ_loss/4 and t = 4·lr·steps under plain SGD.

    Returns numpy arrays "t", "l1_norm" (‖w‖₁), "nonzeros" (m′), "l2_norm" (‖w‖₂) recorded at t = 0 and at
    about `record_points` geometrically spaced steps up to t_max; "completion_time", the first t with m′ ≤ 1
    (NaN if not reached); and the inputs "m", "l1", "dt".
    """
    if initial is None:
        rng = np.random.default_rng(seed)
        initial = rng.normal(0.0, 1.0 / math.sqrt(m), size=m)
    magnitudes = np.abs(np.asarray(initial, dtype=np.float64))
    magnitudes = magnitudes[magnitudes > 0]
    total_steps = max(1, int(math.ceil(t_max / dt)))
    recorded = set(np.unique(np.geomspace(1, total_steps, record_points).round().astype(int)).tolist())
    recorded.add(0)

    times: list[float] = []
    l1_norms: list[float] = []
    nonzeros: list[int] = []
    l2_norms: list[float] = []
    completion_time = math.nan
    for step in range(total_steps + 1):
        squared_norm = float(np.dot(magnitudes, magnitudes))
        if math.isnan(completion_time) and magnitudes.size <= 1:
            completion_time = step * dt
        if step in recorded:
            times.append(step * dt)
            l1_norms.append(float(magnitudes.sum()))
            nonzeros.append(int(magnitudes.size))
            l2_norms.append(math.sqrt(squared_norm))
        if step == total_steps:
            break
        magnitudes = magnitudes + dt * ((1.0 - squared_norm) * magnitudes - l1)
        magnitudes = magnitudes[magnitudes > 0]

    return {
        "t": np.array(times),
        "l1_norm": np.array(l1_norms),
        "nonzeros": np.array(nonzeros),
        "l2_norm": np.array(l2_norms),
        "completion_time": completion_time,
        "m": m,
        "l1": l1,
        "dt": dt,
    }


def predicted_l1_norm(m: int, l1: float, t: np.ndarray | float) -> np.ndarray:
    """‖w‖₁ ≈ 1/(1/√m + λt) (seed 001, "How fast does it sparsify?")."""
    return 1.0 / (1.0 / math.sqrt(m) + l1 * np.asarray(t, dtype=np.float64))


def predicted_nonzeros(m: int, l1: float, t: np.ndarray | float) -> np.ndarray:
    """m′ ≈ ‖w‖₁² for a unit vector whose non-zeros are about equal; reaches 1 at t ≈ (1 − 1/√m)/λ."""
    return predicted_l1_norm(m, l1, t) ** 2
