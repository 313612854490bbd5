"""The SAE registry and the trainer's entry points (see the package docstring, `pipeline.sae`)."""

from __future__ import annotations

from typing import Protocol

import torch

from pipeline.config import SAEConfig
from pipeline.sae.common import Parameters, reconstruction_error, unit_rows


class Architecture(Protocol):
    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters: ...

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor: ...

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor: ...

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor: ...


ARCHITECTURES: dict[str, Architecture] = {}


# The order of every list of allowed values (CLI choices, error messages): the published SAE and its
# variants first, then the architectures of current practice by date. A name not listed comes after these,
# in the order it was registered, so adding an architecture needs no edit here.
LISTED_ORDER = ("leaky_relu", "published_tied", "relu", "topk", "batch_topk", "jumprelu", "gated")


def register(name: str):
    def decorator(cls: type) -> type:
        ARCHITECTURES[name] = cls()
        ranked = sorted(
            ARCHITECTURES.items(),
            key=lambda item: LISTED_ORDER.index(item[0]) if item[0] in LISTED_ORDER else len(LISTED_ORDER),
        )
        ARCHITECTURES.clear()
        ARCHITECTURES.update(ranked)
        return cls

    return decorator


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"sae.architecture must be one of {', '.join(ARCHITECTURES)}; got {name!r}")
    return ARCHITECTURES[name]


# ---------------------------------------------------------------------------------------------------------
# The trainer's entry points: each falls back to the plain objective unless the architecture says otherwise.


def training_losses(
    architecture: Architecture,
    parameters: Parameters,
    inputs: torch.Tensor,
    config: SAEConfig,
    state: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The training objective per model, `[model]` (a scalar without the model dimension).

    inputs: `[model, sample, hidden]` or `[sample, hidden]`. Default: mean (x̂ − x)² + sparsity_penalty.
    """
    own = getattr(architecture, "training_losses", None)
    if own is not None:
        return own(parameters, inputs, config, state)
    latents = architecture.encode(parameters, inputs, config)
    reconstruction = architecture.decode(parameters, latents)
    return reconstruction_error(reconstruction, inputs) + architecture.sparsity_penalty(
        parameters, latents, config
    )


def trained_parameters(architecture: Architecture, parameters: Parameters) -> list[torch.Tensor]:
    """The parameters Adam updates: all but the architecture's `untrained` ones, in dict order."""
    untrained = getattr(architecture, "untrained", ())
    return [value for name, value in parameters.items() if name not in untrained]


@torch.no_grad()
def before_update(architecture: Architecture, parameters: Parameters) -> None:
    """Remove from each decoder row's gradient its component along the row (unit-norm architectures).

    The row is renormalized after the update anyway; the parallel component would only feed Adam's moments
    with a direction the projection then undoes (Gao et al. 2024, who do the same).
    """
    if not getattr(architecture, "unit_norm_decoder", False):
        return
    decoder = parameters["decoder"]
    if decoder.grad is None:
        return
    unit = unit_rows(decoder)
    decoder.grad.sub_(unit * (decoder.grad * unit).sum(dim=-1, keepdim=True))


@torch.no_grad()
def after_update(architecture: Architecture, parameters: Parameters) -> None:
    """Project decoder rows back to unit norm (unit-norm architectures; zero rows stay zero), then apply
    the architecture's own projection, if it has one (JumpReLU's θ ≥ 0)."""
    if getattr(architecture, "unit_norm_decoder", False):
        parameters["decoder"].copy_(unit_rows(parameters["decoder"]))
    own = getattr(architecture, "after_update", None)
    if own is not None:
        own(parameters)


@torch.no_grad()
def after_training(
    architecture: Architecture, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig
) -> None:
    """The architecture's last pass over the training inputs `[model, sample, hidden]`, if it has one."""
    own = getattr(architecture, "after_training", None)
    if own is not None:
        own(parameters, inputs, config)
