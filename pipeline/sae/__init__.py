"""Sparse autoencoder architectures behind a small registry, batched over models like the network.

An architecture is a class with: `initial_parameters(hidden, latents, config, generator)` for one model,
`encode(parameters, x)`, `decode(parameters, z)` and `sparsity_penalty(parameters, z)`. Parameters are a dict
of tensors; with a leading `model` dimension they describe a batch of SAEs, without it one SAE, and the same
functions serve both (broadcasting matmuls). Inputs are standardized hidden activations (docs/science.md §1.3,
defect 2 fixed: one standardization, train-split statistics, for training and evaluation alike).

One module per architecture: `leaky_relu` (the published SAE, its tied variant, a plain ReLU SAE), `topk`
(TopK with AuxK, BatchTopK), `jumprelu`, `gated`; `registry` holds the registry and the trainer's entry
points below, `common` what several architectures share. Add an architecture by writing a module with a
class like `LeakyReLUSAE` decorated with `@register("name")` and importing it here: that is all. This registry is the only list of names; `sae.architecture`'s allowed values, the CLI's
`--sae-architecture` choices and every error message are read from it. A class attribute `tied = True`
asks the trainer to keep the encoder equal to the decoder's transpose (the published code's accidental tie).

Architectures of current practice need more than a penalty on the latents, so the trainer also goes through
the module functions `training_losses`, `trained_parameters`, `before_update`, `after_update` and
`after_training`, which fall back to the plain objective (mean squared error + `sparsity_penalty`) unless
the class says otherwise:
- `training_losses(parameters, inputs, config, state)`: the objective `[model]` when it needs more than
  the latents (AuxK's dead latents, JumpReLU's straight-through threshold, the Gated auxiliary loss);
  `state` is a dict the trainer keeps for one pass, for bookkeeping that is not a parameter.
- `untrained = ("threshold", ...)`: parameters kept in the checkpoint but set by the architecture, not Adam.
- `unit_norm_decoder = True`: decoder rows are projected back to unit norm after every update, and the
  gradient's component along each row is removed before it (Gao et al. 2024).
- `after_update(parameters)`: any other projection after each update (JumpReLU's θ ≥ 0).
- `after_training(parameters, inputs, config)`: a last pass over the training inputs (BatchTopK's
  inference threshold from the final weights).

Conventions shared by every architecture here: the reconstruction error is the mean over samples AND hidden
units (the papers sum over hidden units; their coefficients are therefore `hidden` times ours), sparsity
terms are means over samples.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import SAEConfig

# One module per architecture; importing it registers it (`registry.LISTED_ORDER` fixes the listed order).
from pipeline.sae.gated import GatedSAE
from pipeline.sae.jumprelu import JumpReLUSAE
from pipeline.sae.leaky_relu import LeakyReLUSAE, PublishedTiedSAE, ReLUSAE
from pipeline.sae.registry import (
    ARCHITECTURES,
    Architecture,
    Parameters,
    after_training,
    after_update,
    architecture,
    before_update,
    register,
    trained_parameters,
    training_losses,
)
from pipeline.sae.topk import BatchTopKSAE, TopKSAE, auxiliary_k_loss, dead_latents_update

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "LeakyReLUSAE",
    "Parameters",
    "PublishedTiedSAE",
    "ReLUSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "after_training",
    "after_update",
    "architecture",
    "auxiliary_k_loss",
    "before_update",
    "dead_latents_update",
    "register",
    "standardization",
    "trained_parameters",
    "training_losses",
]


class SparseAutoencoder(nn.Module):
    """One trained SAE as an ordinary module, with its standardization kept beside it.

    `forward(hidden)` takes RAW last-hidden activations `[sample, hidden]`, standardizes them with the
    train-split statistics it was trained with, and returns (reconstruction, latents) in standardized
    space: `[sample, hidden]`, `[sample, latent]`.
    """

    def __init__(
        self, config: SAEConfig, parameters: Parameters, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        super().__init__()
        self.config = config
        self.weights = nn.ParameterDict(
            {name: nn.Parameter(value.clone()) for name, value in parameters.items()}
        )
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    @property
    def architecture(self) -> Architecture:
        return architecture(self.config.architecture)

    def standardize(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden - self.mean) / self.std

    def encode(self, standardized: torch.Tensor) -> torch.Tensor:
        return self.architecture.encode(dict(self.weights), standardized, self.config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.architecture.decode(dict(self.weights), latents)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(self.standardize(hidden))
        return self.decode(latents), latents

    @property
    def decoder_directions(self) -> torch.Tensor:
        """Decoder directions `[latent, hidden]` (rows, not normalised)."""
        return self.weights["decoder"]


def standardization(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and std over samples of `hidden: [..., sample, unit]`.

    A unit that never varies (a dead ReLU neuron) gets std 1 instead of 0, so it maps to a constant 0
    rather than to NaN.
    """
    mean = hidden.mean(dim=-2)
    std = hidden.std(dim=-2)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))
