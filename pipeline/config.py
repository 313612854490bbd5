"""Configuration of the taming ablation study (SCIENCE.md §1): data, network, SAE, one ablation.

Defaults equal the published code's. Every dataclass validates itself on construction, so a config that
exists is a valid config; messages name the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from pipeline.configuration import (
    ConfigError,
    check_choice,
    check_fraction,
    check_integer,
    check_positive,
    config_hash,
    from_dict,
    to_dict,
)

INITS = ("random", "orthogonal")
NOISES = ("none", "bipolar", "positive_kurtosis", "gaussian")
REGULARIZATIONS = ("none", "l1", "l2")
ACTIVATIONS = ("relu", "gelu")
L2_FORMS = ("decay", "penalty")
TARGETS = ("published", "pairwise")
SAE_ARCHITECTURES = ("leaky_relu", "relu", "published_tied")
# What the SAE trains on: the train-split standardization (ours), or the raw activations (the published
# code, which then evaluated on standardized ones; SCIENCE.md §1.3 defect 2).
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


@dataclass(frozen=True)
class DataConfig:
    """Correlated feature groups (SCIENCE.md §1.1)."""

    group_sizes: tuple[int, ...] = (3, 2, 3)
    group_probability: float = 0.6
    strength_low: float = 0.5
    strength_high: float = 1.0
    keep_probability: float = 0.5
    samples: int = 1024
    validation_fraction: float = 0.2
    importance_decay: float = 0.9
    targets: str = "published"

    def __post_init__(self) -> None:
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
        check_choice("data.targets", self.targets, TARGETS)
        if self.targets == "published" and self.group_sizes != (3, 2, 3):
            raise ConfigError(
                "data.targets 'published' is defined only for data.group_sizes (3, 2, 3); "
                f"got {self.group_sizes!r}: use data.targets 'pairwise' for other layouts"
            )

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
    """The MLP and its training (SCIENCE.md §1.2). The four study factors are init, noise, reg and act."""

    init: str = "random"
    noise: str = "bipolar"
    reg: str = "l1"
    act: str = "relu"
    hidden_dim: int = 12
    hidden_layers: int = 4
    sigma: float = 0.1
    lambda_reg: float = 1e-4
    # "decay": the published L2, Adam's coupled weight_decay on every parameter (biases included).
    # "penalty": lambda * sum W^2 over weight matrices in the loss, the same footing as the L1 penalty.
    l2_form: str = "decay"
    lr: float = 1e-3
    epochs: int = 2000

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_choice("noise", self.noise, NOISES)
        check_choice("reg", self.reg, REGULARIZATIONS)
        check_choice("act", self.act, ACTIVATIONS)
        check_integer("network.hidden_dim", self.hidden_dim, minimum=1)
        check_integer("network.hidden_layers", self.hidden_layers, minimum=1)
        check_positive("sigma", self.sigma, allow_zero=True)
        check_positive("lambda_reg", self.lambda_reg, allow_zero=True)
        check_choice("l2_form", self.l2_form, L2_FORMS)
        check_positive("lr", self.lr)
        check_integer("epochs", self.epochs, minimum=1)


@dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder on the last hidden layer (SCIENCE.md §1.3, defects fixed)."""

    architecture: str = "leaky_relu"
    d_sae: int = 16
    l1_coefficient: float = 1e-4
    lr: float = 1e-3
    epochs: int = 1000
    encoder_bias_high: float = 0.1
    leaky_slope: float = 0.01
    # Added after stores existed: left out of the config hash at its default, so old results keep their ids.
    train_on: str = field(default="standardized", metadata={"hash_omit_default": True})

    def __post_init__(self) -> None:
        check_choice("sae.architecture", self.architecture, SAE_ARCHITECTURES)
        check_choice("sae.train_on", self.train_on, SAE_TRAINING_INPUTS)
        check_integer("sae.d_sae", self.d_sae, minimum=1)
        check_positive("sae.l1_coefficient", self.l1_coefficient, allow_zero=True)
        check_positive("sae.lr", self.lr)
        check_integer("sae.epochs", self.epochs, minimum=1)
        check_positive("sae.encoder_bias_high", self.encoder_bias_high, allow_zero=True)
        check_fraction("sae.leaky_slope", self.leaky_slope)


@dataclass(frozen=True)
class AblationConfig:
    """One ablation: a point of the design, trained for several seeds."""

    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    curve_every: int = 50
    metric_null_draws: int = 200

    def __post_init__(self) -> None:
        check_integer("curve_every", self.curve_every, minimum=1)
        check_integer("metric_null_draws", self.metric_null_draws, minimum=2)

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
            + f") and {act} activations; a {self.sae.architecture} SAE with {self.sae.d_sae} latents decomposes "
            f"the last hidden layer. {contrast}"
        )


def preset_configs(preset: str, base: AblationConfig | None = None) -> list[AblationConfig]:
    """The configurations of a preset ('strategic' = the published 8, 'factorial' = all 16)."""
    check_choice("preset", preset, PRESETS)
    base = base or AblationConfig()
    return [base.with_factors(*levels) for levels in PRESETS[preset]]


def pass_key(config: AblationConfig) -> tuple:
    """Configurations with equal keys can share one batched pass (they may differ in the four factors,
    σ, λ, the L2 form and the learning rate)."""
    network = config.network
    return (
        config.data,
        network.hidden_dim,
        network.hidden_layers,
        network.epochs,
        config.sae,
        config.curve_every,
    )


def total_epochs(config: AblationConfig) -> int:
    """Progress units one model of this config takes in a pass (network epochs + SAE epochs)."""
    return config.network.epochs + config.sae.epochs
