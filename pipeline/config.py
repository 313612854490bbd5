"""Configuration of the taming ablation study (docs/science.md §1): data, network, SAE, one ablation.

Defaults equal the published code's. Every dataclass validates itself on construction, so a config that
exists is a valid config; messages name the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from pipeline.config_tools import (
    ConfigError,
    allowed_choices,
    check_choice,
    check_field_maxima,
    check_fraction,
    check_integer,
    check_positive,
    config_hash,
    from_dict,
    leaf_fields,
    leaf_values,
    setting,
    to_dict,
)

INITS = ("random", "orthogonal")
NOISES = ("none", "bipolar", "positive_kurtosis", "gaussian")
REGULARIZATIONS = ("none", "l1", "l2", "elastic")
ACTIVATIONS = ("relu", "gelu")
L2_FORMS = ("decay", "penalty")
TARGETS = ("published", "pairwise")
# What the SAE trains on: the train-split standardization (ours), or the raw activations (the published
# code, which then evaluated on standardized ones; docs/science.md §1.3 defect 2).
SAE_TRAINING_INPUTS = ("standardized", "raw")

# The four binary factors of the study and their levels in (low, high) order: low is the published
# baseline's level, so a factorial effect reads "what switching away from the baseline does".
FACTOR_LEVELS: dict[str, tuple[str, str]] = {
    "init": ("random", "orthogonal"),
    "noise": ("bipolar", "positive_kurtosis"),
    "reg": ("l1", "l2"),
    "act": ("relu", "gelu"),
}

# The published study's eight "strategic" configurations (seed 002), as (init, noise, reg, act).
STRATEGIC_CONFIGURATIONS: tuple[tuple[str, str, str, str], ...] = (
    ("random", "bipolar", "l1", "relu"),
    ("orthogonal", "bipolar", "l1", "relu"),
    ("random", "positive_kurtosis", "l1", "relu"),
    ("random", "bipolar", "l2", "gelu"),
    ("orthogonal", "bipolar", "l2", "gelu"),
    ("orthogonal", "positive_kurtosis", "l1", "relu"),
    ("random", "positive_kurtosis", "l2", "relu"),
    ("orthogonal", "positive_kurtosis", "l2", "gelu"),
)
FACTORIAL_CONFIGURATIONS: tuple[tuple[str, str, str, str], ...] = tuple(
    itertools.product(*FACTOR_LEVELS.values())  # type: ignore[arg-type]
)
PRESETS = {"strategic": STRATEGIC_CONFIGURATIONS, "factorial": FACTORIAL_CONFIGURATIONS}
BASELINE = ("random", "bipolar", "l1", "relu")
# The benchmarks' --quick: a tenth of the published epochs, enough to exercise every code path.
QUICK_EPOCHS, QUICK_SAE_EPOCHS = 200, 100


def _sae_architectures() -> tuple[str, ...]:
    # The registry in pipeline/sae.py is the only list of SAE architectures; it imports this module, so
    # it is read when a config is checked rather than when this module loads.
    from pipeline.sae import ARCHITECTURES

    return tuple(ARCHITECTURES)


def check_field_choices(config: Any, prefix: str) -> None:
    """Check every field declared with `setting(choices=...)` against its allowed values."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if callable(item.metadata.get("choices")) and value == item.default:
            # A registry read on demand (the SAE architectures) imports torch, about 0.8 s, and the sweep
            # command starts its worker processes only after its configs are checked; the default is in
            # the registry (tests/test_startup.py checks it), so it needs no look-up.
            continue
        allowed = allowed_choices(item)
        if allowed is not None:
            check_choice(f"{prefix}{item.name}", value, allowed)


@dataclass(frozen=True)
class DataConfig:
    """Correlated feature groups (docs/science.md §1.1)."""

    group_sizes: tuple[int, ...] = setting(
        (3, 2, 3), "Sizes of the correlated feature groups.", minimum=1, maximum=64
    )
    group_probability: float = setting(
        0.6, "Probability that a group is active in a sample.", minimum=0, maximum=1
    )
    strength_low: float = setting(0.5, "Lower bound of an active feature's strength.", minimum=0, maximum=1)
    strength_high: float = setting(1.0, "Upper bound of an active feature's strength.", minimum=0, maximum=1)
    keep_probability: float = setting(
        0.5, "Probability that a feature of an active group is kept.", minimum=0, maximum=1
    )
    # 100 000 samples: 100× the published data set; the activations of a pass grow with it.
    samples: int = setting(1024, "Data set size (80 % train, 20 % validation).", minimum=4, maximum=100_000)
    validation_fraction: float = setting(
        0.2, "Fraction of the samples held out for validation.", minimum=0, maximum=1
    )
    importance_decay: float = setting(
        0.9, "Feature importance I_i = decay^i (interference weights).", minimum=0, maximum=1
    )
    targets: str = setting(
        "published", "Task targets: the published non-linear ones, or pairwise products.", choices=TARGETS
    )

    def __post_init__(self) -> None:
        check_field_choices(self, "data.")
        if not self.group_sizes or any(
            isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in self.group_sizes
        ):
            raise ConfigError(
                f"data.group_sizes must be a non-empty list of integers >= 1; got {self.group_sizes!r}"
            )
        check_fraction("data.group_probability", self.group_probability)
        check_positive("data.strength_low", self.strength_low, allow_zero=True)
        check_positive("data.strength_high", self.strength_high, allow_zero=True)
        if not self.strength_low <= self.strength_high <= 1:
            raise ConfigError(
                "data.strength_low and data.strength_high must satisfy 0 <= low <= high <= 1; "
                f"got {self.strength_low!r}, {self.strength_high!r}"
            )
        check_fraction("data.keep_probability", self.keep_probability, open_low=True)
        check_integer("data.samples", self.samples, minimum=4)
        check_fraction("data.validation_fraction", self.validation_fraction, open_low=True, open_high=True)
        if self.validation_samples < 1 or self.train_samples < 2:
            raise ConfigError(
                f"data.samples={self.samples} with data.validation_fraction={self.validation_fraction} leaves "
                f"{self.train_samples} train and {self.validation_samples} validation samples; need >= 2 and >= 1"
            )
        check_fraction("data.importance_decay", self.importance_decay, open_low=True)
        if self.targets == "published" and self.group_sizes != (3, 2, 3):
            raise ConfigError(
                "data.targets 'published' is defined only for data.group_sizes (3, 2, 3); "
                f"got {self.group_sizes!r}: use data.targets 'pairwise' for other layouts"
            )
        # Last: the field's own checks word a fraction's or a minimum's problem better.
        check_field_maxima(self, "data.")

    @property
    def features(self) -> int:
        return sum(self.group_sizes)

    @property
    def groups(self) -> list[list[int]]:
        """Feature indices of each group, e.g. [[0, 1, 2], [3, 4], [5, 6, 7]]."""
        starts = itertools.accumulate((0, *self.group_sizes[:-1]))
        return [
            list(range(start, start + size)) for start, size in zip(starts, self.group_sizes, strict=True)
        ]

    @property
    def validation_samples(self) -> int:
        # int(), as the published code: 1024 samples give 204 validation and 820 train samples.
        return int(self.samples * self.validation_fraction)

    @property
    def train_samples(self) -> int:
        return self.samples - self.validation_samples


@dataclass(frozen=True)
class NetworkConfig:
    """The MLP and its training (docs/science.md §1.2). The four study factors are init, noise, reg and act.

    Fields marked per_model are taken per model by the batched engine (pipeline/train.py), so
    configurations differing only in them train in one pass.
    """

    init: str = setting("random", "Weight initialization.", per_model=True, choices=INITS)
    noise: str = setting(
        "bipolar", "Noise on the last hidden layer during training.", per_model=True, choices=NOISES
    )
    reg: str = setting(
        "l1",
        "Regularization (elastic: λ·(α·Σ|W| + (1−α)·ΣW²) over weight matrices, α = --elastic-alpha).",
        per_model=True,
        choices=REGULARIZATIONS,
    )
    act: str = setting("relu", "Hidden activation.", per_model=True, choices=ACTIVATIONS)
    # Maxima: a pass holds [model, sample, hidden_dim] activations per layer; 1024 × 64 is far past any
    # network the study needs and still fits one seed in memory at the published sample count.
    hidden_dim: int = setting(12, "Width of each hidden layer.", short="hidden", minimum=1, maximum=1024)
    hidden_layers: int = setting(
        4, "Number of hidden layers (activations).", short="layers", minimum=1, maximum=64
    )
    # No maximum: σ costs no memory or time, and a σ large enough to blow the loss up makes a FAILED seed
    # with the reason (pipeline.train's divergence check), which the engine's tests rely on.
    sigma: float = setting(
        0.1, "Noise scale σ on the last hidden layer.", per_model=True, short="σ", minimum=0
    )
    lambda_reg: float = setting(
        1e-4,
        "Regularization strength λ (L1 penalty or L2 decay/penalty).",
        per_model=True,
        short="λ",
        minimum=0,
        maximum=1000,
    )
    # "decay": the published L2, Adam's coupled weight_decay on every parameter (biases included).
    # "penalty": lambda * sum W^2 over weight matrices in the loss, the same footing as the L1 penalty.
    l2_form: str = setting(
        "decay",
        "L2 as Adam's coupled weight decay on all parameters (published) or as λ·ΣW² on weight matrices "
        "(comparable with L1).",
        per_model=True,
        choices=L2_FORMS,
    )
    # Added after stores existed, as grad_clip below: left out of the config hash at its default, so old
    # results keep their ids. The elastic net (Zou & Hastie 2005) mixes the two penalty forms on the same
    # weights as the L1 and L2-penalty forms; its L2 part is always a penalty in the loss (l2_form does not
    # apply), so α = 1 is the L1 form and α = 0 the L2 penalty form.
    elastic_alpha: float = setting(
        0.5,
        "Elastic-net mix α (reg elastic only): λ·(α·Σ|W| + (1−α)·ΣW²); 1 is L1, 0 the L2 penalty.",
        per_model=True,
        short="α",
        hash_omit_default=True,
        minimum=0,
        maximum=1,
    )
    lr: float = setting(1e-3, "Network Adam learning rate.", per_model=True, minimum=0, maximum=100)
    # Clipping by global norm (torch.nn.utils.clip_grad_norm_ on one model's parameters): the penalty forms'
    # gradients are part of the clipped vector, Adam's coupled decay (l2_form decay) is added after it, as
    # torch.optim.Adam(weight_decay=λ) does after a clip. No maximum: a large c is simply no clipping.
    grad_clip: float = setting(
        0.0,
        "Scale each model's network gradient to at most this L2 norm before each Adam step, as "
        "torch.nn.utils.clip_grad_norm_ does (0 = off).",
        per_model=True,
        short="clip",
        hash_omit_default=True,
        minimum=0,
    )
    # 100 000 epochs: 50× the published training, about an hour for one seed of a wide network on 2 cores.
    epochs: int = setting(2000, "Network training epochs (full batch).", minimum=1, maximum=100_000)

    def __post_init__(self) -> None:
        check_field_choices(self, "network.")
        check_integer("network.hidden_dim", self.hidden_dim, minimum=1)
        check_integer("network.hidden_layers", self.hidden_layers, minimum=1)
        check_positive("network.sigma", self.sigma, allow_zero=True)
        check_positive("network.lambda_reg", self.lambda_reg, allow_zero=True)
        check_fraction("network.elastic_alpha", self.elastic_alpha)
        check_positive("network.grad_clip", self.grad_clip, allow_zero=True)
        check_positive("network.lr", self.lr)
        check_integer("network.epochs", self.epochs, minimum=1)
        check_field_maxima(self, "network.")


@dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder on the last hidden layer (docs/science.md §1.3, defects fixed)."""

    architecture: str = setting(
        "leaky_relu",
        "SAE architecture (leaky_relu = the published one with its defects fixed; published_tied = "
        "bug-compatible, the encoder a view of the decoder as in the published code; relu, topk, batch_topk, "
        "jumprelu, gated: current practice, see pipeline/sae.py).",
        choices=_sae_architectures,
    )
    d_sae: int = setting(16, "SAE latents.", option="--d-sae", short="d_sae", minimum=2, maximum=4096)
    l1_coefficient: float = setting(
        1e-4, "SAE sparsity coefficient.", option="--sae-l1", short="sae λ", minimum=0, maximum=1000
    )
    lr: float = setting(1e-3, "SAE Adam learning rate.", per_model=True, minimum=0, maximum=100)
    # Added after stores existed: left out of the config hash at its default. See network.grad_clip; for
    # unit-norm architectures the clipped gradient is the one after the decoder rows' parallel component is
    # removed (pipeline.sae.before_update), the gradient Adam then sees.
    grad_clip: float = setting(
        0.0,
        "Scale each model's SAE gradient (all its trained parameters) to at most this L2 norm before each "
        "Adam step, as torch.nn.utils.clip_grad_norm_ does (0 = off).",
        per_model=True,
        short="sae clip",
        hash_omit_default=True,
        minimum=0,
    )
    epochs: int = setting(1000, "SAE training epochs.", minimum=1, maximum=100_000)
    encoder_bias_high: float = setting(
        0.1, "Encoder biases start uniform in [0, this].", minimum=0, maximum=100
    )
    leaky_slope: float = setting(0.01, "Negative slope of the LeakyReLU SAE.", minimum=0, maximum=1)
    # Added after stores existed: left out of the config hash at its default, so old results keep their ids.
    train_on: str = setting(
        "standardized",
        "What the SAE trains on: the train-split standardization, or raw activations as the published code "
        "did (it then evaluated on standardized ones). Evaluation always standardizes.",
        choices=SAE_TRAINING_INPUTS,
        hash_omit_default=True,
    )
    # The settings of the architectures of current practice (pipeline/sae.py), added after stores existed:
    # each is left out of the config hash at its default, so old results keep their ids. Each is read only
    # by the architectures named in its help.
    k: int = setting(
        4,
        "Active latents per sample: exactly (topk) or on average over the batch (batch_topk). At most d_sae.",
        hash_omit_default=True,
        minimum=1,
        maximum=4096,
    )
    # Gao et al. take a power of two near half the input width (512 for GPT-4's residual stream); 6 is half
    # the published hidden layer.
    aux_k: int = setting(
        6,
        "Dead latents that try to reconstruct the residual in the AuxK loss (topk, batch_topk).",
        hash_omit_default=True,
        minimum=1,
        maximum=4096,
    )
    aux_coefficient: float = setting(
        1 / 32,
        "Weight of the AuxK dead-latent loss (topk, batch_topk; Gao et al.: 1/32).",
        hash_omit_default=True,
        minimum=0,
        maximum=1000,
    )
    # Gao et al. count a latent dead after 10M tokens without firing; one epoch here is the whole train split
    # (full batch), so a few epochs already mean silence on every training sample several times over.
    dead_epochs: int = setting(
        10,
        "Epochs without firing on any training sample after which AuxK counts a latent dead (topk, batch_topk).",
        hash_omit_default=True,
        minimum=1,
        maximum=100_000,
    )
    # Our reconstruction error is a mean over the hidden units (the paper sums them), and a mean L0 of a
    # few latents should cost about what one latent saves in error: a few hundredths.
    l0_coefficient: float = setting(
        0.01,
        "Weight of the L0 penalty, the mean number of active latents per sample (jumprelu).",
        hash_omit_default=True,
        minimum=0,
        maximum=1000,
    )
    # The paper's 0.001 suits its activation scale; standardized inputs give pre-activations of order 1,
    # and a window of 0.001 would hold almost none of the ~800 training samples, so the threshold would
    # hardly learn.
    jumprelu_bandwidth: float = setting(
        0.05,
        "Width ε of the rectangle kernel in JumpReLU's straight-through threshold gradient (jumprelu).",
        hash_omit_default=True,
        minimum=0,
        maximum=100,
    )
    jumprelu_initial_threshold: float = setting(
        0.001,
        "Threshold θ every JumpReLU latent starts with (jumprelu; the paper's 0.001).",
        hash_omit_default=True,
        minimum=0,
        maximum=100,
    )

    def __post_init__(self) -> None:
        check_field_choices(self, "sae.")
        check_integer("sae.d_sae", self.d_sae, minimum=2)  # MACS and overlaps need two latents
        check_positive("sae.l1_coefficient", self.l1_coefficient, allow_zero=True)
        check_positive("sae.lr", self.lr)
        check_positive("sae.grad_clip", self.grad_clip, allow_zero=True)
        check_integer("sae.epochs", self.epochs, minimum=1)
        check_positive("sae.encoder_bias_high", self.encoder_bias_high, allow_zero=True)
        check_fraction("sae.leaky_slope", self.leaky_slope)
        check_integer("sae.k", self.k, minimum=1)
        if self.architecture in ("topk", "batch_topk") and self.k > self.d_sae:
            raise ConfigError(
                f"sae.k must be <= sae.d_sae ({self.d_sae}) for the {self.architecture} SAE; got {self.k!r}"
            )
        check_integer("sae.aux_k", self.aux_k, minimum=1)
        check_positive("sae.aux_coefficient", self.aux_coefficient, allow_zero=True)
        check_integer("sae.dead_epochs", self.dead_epochs, minimum=1)
        check_positive("sae.l0_coefficient", self.l0_coefficient, allow_zero=True)
        check_positive("sae.jumprelu_bandwidth", self.jumprelu_bandwidth)
        check_positive("sae.jumprelu_initial_threshold", self.jumprelu_initial_threshold)
        check_field_maxima(self, "sae.")


@dataclass(frozen=True)
class AblationConfig:
    """One ablation: a point of the design, trained for several seeds."""

    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    curve_every: int = setting(
        50, "Epochs between two points of the logged training curves.", minimum=1, maximum=100_000
    )
    # Each draw is a MACS of a random decoder, O(d_sae²): 10 000 draws is 50× the published null.
    metric_null_draws: int = setting(
        200,
        "Random decoders drawn for the calibrated-MACS null.",
        per_model=True,
        short="null draws",
        minimum=2,
        maximum=10_000,
    )

    def __post_init__(self) -> None:
        check_integer("curve_every", self.curve_every, minimum=1)
        check_integer("metric_null_draws", self.metric_null_draws, minimum=2)
        check_field_maxima(self, "")

    @property
    def factors(self) -> dict[str, str]:
        return {
            "init": self.network.init,
            "noise": self.network.noise,
            "reg": self.network.reg,
            "act": self.network.act,
        }

    @property
    def name(self) -> str:
        """Run name that says the factors, e.g. 'orthogonal·bipolar·l2·gelu'."""
        return "·".join(self.factors.values())

    def hash(self) -> str:
        return config_hash(self)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationConfig:
        return from_dict(cls, data)

    def with_factors(self, init: str, noise: str, reg: str, act: str) -> AblationConfig:
        return dataclasses.replace(
            self, network=dataclasses.replace(self.network, init=init, noise=noise, reg=reg, act=act)
        )

    def with_epochs(self, network_epochs: int, sae_epochs: int) -> AblationConfig:
        """The same configuration trained for other epoch counts (e.g. a quick look at 200 + 100)."""
        return dataclasses.replace(
            self,
            network=dataclasses.replace(self.network, epochs=network_epochs),
            sae=dataclasses.replace(self.sae, epochs=sae_epochs),
        )

    def describe(self) -> str:
        """One paragraph saying what this configuration tests, for the run's description."""
        init, noise, reg, act = self.factors.values()
        changed = [
            f"{factor} = {level}"
            for (factor, level), baseline_level in zip(self.factors.items(), BASELINE, strict=True)
            if level != baseline_level
        ]
        if not changed:
            contrast = "This is the published baseline (random·bipolar·l1·relu)."
        else:
            contrast = f"Differs from the published baseline in: {', '.join(changed)}."
        return (
            f"MLP {self.data.features}→{self.network.hidden_dim}×{self.network.hidden_layers}→{self.data.features} "
            f"with {init} init, {noise} noise (σ={self.network.sigma}) on the last hidden layer, {reg} "
            f"regularization (λ={self.network.lambda_reg}"
            + (f", form {self.network.l2_form}" if reg == "l2" else "")
            + (f", α={self.network.elastic_alpha}" if reg == "elastic" else "")
            + f") and {act} activations"
            + (f", its gradient norm clipped at {self.network.grad_clip}" if self.network.grad_clip else "")
            + f"; a {self.sae.architecture} SAE with {self.sae.d_sae} latents decomposes "
            f"the last hidden layer"
            + (f" (gradient norm clipped at {self.sae.grad_clip})" if self.sae.grad_clip else "")
            + f". {contrast}"
        )


def preset_configs(preset: str, base: AblationConfig | None = None) -> list[AblationConfig]:
    """The configurations of a preset ('strategic' = the published 8, 'factorial' = all 16), read from its
    design file (designs/<preset>.toml)."""
    from pipeline.design import load_design

    check_choice("preset", preset, PRESETS)
    return load_design(preset).configs(base)


def pass_key(config: AblationConfig) -> tuple:
    """Configurations with equal keys can share one batched pass.

    Derived from the fields: every field not declared `per_model` (pipeline.config_tools.setting) must be
    equal within a pass, because the engine reads it from the pass's first configuration. A new field is
    therefore pass-splitting until someone teaches the engine to take it per model and marks it so.
    """
    fields = leaf_fields(AblationConfig)
    return tuple(
        (path, value)
        for path, value in leaf_values(config).items()
        if not fields[path][0].metadata.get("per_model", False)
    )


def total_epochs(config: AblationConfig) -> int:
    """Progress units one model of this config takes in a pass (network epochs + SAE epochs)."""
    return config.network.epochs + config.sae.epochs


# The size of a whole sweep (configurations × seeds × what one model holds and computes), checked before
# anything trains. The per-field maxima bound one model; these bound their product. Memory counts every
# model at once, as when all configurations share one batched pass, plus the process itself and the
# largest evaluation (seeds are evaluated one at a time). bench/limits.py measures the estimate against
# peak memory (1.3–2.4× the whole process's peak on every shape there) and the rate of work: 1e10–8.5e10
# multiply-adds per second on the 2-core reference machine by shape, the slowest including a first
# compile, so 1e14 is between half an hour and three hours (the published strategic sweep is 9e11).
SWEEP_MEMORY_LIMIT_BYTES = 8 * 2**30
SWEEP_WORK_LIMIT = 1e14
# What a training process holds before any model: torch, numba's compiled engine, MLflow (measured
# 300–450 MB above the imports, bench/limits.py, rounded up).
PROCESS_BYTES = 2**30


def evaluation_footprint(config: AblationConfig) -> tuple[float, float]:
    """(bytes, multiply-adds) of evaluating one trained seed: the metrics' null draws hold and compare
    `metric_null_draws` shuffled copies of the d_sae × d_sae latent statistics (measured 1.2 GB at
    d_sae 512 with 200 draws), and every metric reads all samples' hidden units and latents."""
    latents, samples = config.sae.d_sae, config.data.samples
    width = config.data.features + config.network.hidden_dim + latents
    floats = 6 * config.metric_null_draws * latents**2 + 8 * samples * width
    work = 2 * config.metric_null_draws * latents**2 * samples
    return 4.0 * floats, float(work)


def model_footprint(config: AblationConfig) -> tuple[float, float]:
    """(bytes, multiply-adds) of training one seed of `config`, to within a small factor.

    Parameters count five times (value, gradient, two Adam moments, the flat copy); activations three
    times per layer (forward, trace, gradient); the SAE likewise over its latents.
    """
    dims = [config.data.features, *([config.network.hidden_dim] * config.network.hidden_layers)]
    dims.append(config.data.features)
    parameters = sum(d_in * d_out + d_out for d_in, d_out in itertools.pairwise(dims))
    hidden, latents, samples = config.network.hidden_dim, config.sae.d_sae, config.data.samples
    sae_parameters = 2 * hidden * latents + hidden + latents
    floats = 5 * (parameters + sae_parameters) + samples * (
        4 * config.data.features + 3 * hidden * config.network.hidden_layers + 3 * (hidden + latents)
    )
    work = 6 * samples * (config.network.epochs * parameters + config.sae.epochs * 2 * hidden * latents)
    return 4.0 * floats, float(work)


def sweep_footprint(configs: list[AblationConfig], seeds: int) -> tuple[float, float]:
    """(bytes, multiply-adds) of a whole sweep: every model trained at once in one process, then each
    seed evaluated in turn."""
    footprints = [model_footprint(config) for config in configs]
    evaluations = [evaluation_footprint(config) for config in configs]
    memory = PROCESS_BYTES + seeds * sum(bytes_ for bytes_, _ in footprints)
    memory += max(bytes_ for bytes_, _ in evaluations)
    work = seeds * sum(work for _, work in footprints) + seeds * sum(work for _, work in evaluations)
    return memory, work


def check_sweep_size(configs: list[AblationConfig], seeds: int) -> None:
    """ConfigError when the sweep as a whole exceeds the documented memory or work limit."""
    from pipeline.config_tools import OVERRIDE_FLAG, size_limits_active

    if not size_limits_active():
        return
    memory, work = sweep_footprint(configs, seeds)
    if memory > SWEEP_MEMORY_LIMIT_BYTES or work > SWEEP_WORK_LIMIT:
        raise ConfigError(
            f"the sweep is too big: {len(configs)} configuration(s) × {seeds} seed(s) need about "
            f"{memory / 2**30:.3g} GB and {work:.2g} multiply-adds, beyond the documented limits of "
            f"{SWEEP_MEMORY_LIMIT_BYTES / 2**30:g} GB and {SWEEP_WORK_LIMIT:g} (up to about three hours on 2 cores); "
            f"use fewer configurations or seeds, fewer epochs or samples, smaller widths, or {OVERRIDE_FLAG}"
        )
