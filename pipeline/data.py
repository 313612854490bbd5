"""Synthetic correlated-feature data for the taming study (docs/science.md §1.1), and per-seed RNG streams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import DataConfig

# Independent RNG streams per seed. Data depends only on the seed, so seed k of every configuration sees
# the same data set, which is what makes a paired comparison across configurations meaningful.
# Noise has one stream per kind, so configurations sharing a seed and a noise kind share noise.
STREAMS = {
    "data": 0,
    "init": 1,
    "sae": 3,
    "noise_bipolar": 4,
    "noise_positive_kurtosis": 5,
    "noise_gaussian": 6,
}


def generator_for(seed: int, stream: str) -> torch.Generator:
    """A torch.Generator for one (seed, stream) pair; streams never overlap, whatever the seed."""
    state = np.random.SeedSequence([seed, STREAMS[stream]]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def numpy_generator_for(seed: int, stream: str) -> np.random.Generator:
    """A numpy Generator (PCG64) for one (seed, stream) pair, for draws where numpy is the faster sampler."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, STREAMS[stream]])))


@dataclass(frozen=True)
class Dataset:
    """One seed's data set. Shapes: inputs `[sample, feature]`, targets `[sample, feature]`."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    validation_inputs: torch.Tensor
    validation_targets: torch.Tensor
    importances: torch.Tensor  # [feature]
    groups: list[list[int]]

    @property
    def inputs(self) -> torch.Tensor:
        """All samples, train first: `[sample, feature]`."""
        return torch.cat([self.train_inputs, self.validation_inputs])


def correlated_features(config: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw `[samples, features]` non-negative features with within-group correlation.

    Per sample and group: active with probability p; if active, s ~ U(low, high), shared = s·N(0, 1) and each
    feature of the group gets shared + (1 − s)·N(0, 1). Then an element-wise keep mask (probability q) and a
    ReLU. Vectorized over samples and groups (the published code loops over samples).
    """
    samples, group_count = config.samples, len(config.group_sizes)
    group_of_feature = torch.repeat_interleave(torch.arange(group_count), torch.tensor(config.group_sizes))
    active = torch.rand(samples, group_count, generator=generator) < config.group_probability
    strength = config.strength_low + (config.strength_high - config.strength_low) * torch.rand(
        samples, group_count, generator=generator
    )
    shared = strength * torch.randn(samples, group_count, generator=generator)
    own = torch.randn(samples, config.features, generator=generator)
    features = shared[:, group_of_feature] + (1 - strength[:, group_of_feature]) * own
    features = features * active[:, group_of_feature]
    keep = torch.rand(samples, config.features, generator=generator) < config.keep_probability
    return torch.relu(features * keep)


def targets_for(inputs: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """Targets `[sample, feature]` before importance weighting.

    'published' (8 features, groups [0,1,2], [3,4], [5,6,7]):
        y0 = x0·x1 + 0.5·x2, y1 = sin(x0 + x2) + x1, y2 = x0² + x1·x2, y3 = x3·x4 + 0.3·x5,
        y4 = tanh(x3 + x4), y5 = x5·x6·x7, y6 = x5 + 0.7·x7, y7 = x6² + x5·x7.
    'pairwise' (any layout): y_i = x_i·x_j + 0.5·x_i with j the next feature of i's group (cyclically),
        so every target mixes features of one group only, as in the published targets.
    """
    x = inputs
    if config.targets == "published":
        columns = [
            x[:, 0] * x[:, 1] + 0.5 * x[:, 2],
            torch.sin(x[:, 0] + x[:, 2]) + x[:, 1],
            x[:, 0] ** 2 + x[:, 1] * x[:, 2],
            x[:, 3] * x[:, 4] + 0.3 * x[:, 5],
            torch.tanh(x[:, 3] + x[:, 4]),
            x[:, 5] * x[:, 6] * x[:, 7],
            x[:, 5] + 0.7 * x[:, 7],
            x[:, 6] ** 2 + x[:, 5] * x[:, 7],
        ]
        return torch.stack(columns, dim=1)
    partner = [
        group[(position + 1) % len(group)] for group in config.groups for position in range(len(group))
    ]
    return x * x[:, partner] + 0.5 * x


def importances(config: DataConfig) -> torch.Tensor:
    """Feature importances I_i = decay^i, `[feature]`."""
    return config.importance_decay ** torch.arange(config.features, dtype=torch.float32)


def make_dataset(config: DataConfig, seed: int) -> Dataset:
    """The data set of one seed: first (1 − validation_fraction) of the samples train, the rest validation."""
    inputs = correlated_features(config, generator_for(seed, "data"))
    weights = importances(config)
    targets = targets_for(inputs, config) * weights
    split = config.train_samples
    return Dataset(
        train_inputs=inputs[:split],
        train_targets=targets[:split],
        validation_inputs=inputs[split:],
        validation_targets=targets[split:],
        importances=weights,
        groups=config.groups,
    )
