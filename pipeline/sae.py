"""Sparse autoencoder architectures behind a small registry, batched over models like the network.

An architecture is a class with: `initial_parameters(hidden, latents, config, generator)` for one model,
`encode(parameters, x)`, `decode(parameters, z)` and `sparsity_penalty(parameters, z)`. Parameters are a dict
of tensors; with a leading `model` dimension they describe a batch of SAEs, without it one SAE, and the same
functions serve both (broadcasting matmuls). Inputs are standardized hidden activations (docs/science.md §1.3,
defect 2 fixed: one standardization, train-split statistics, for training and evaluation alike).

Add an architecture by writing a class like `LeakyReLUSAE` and decorating it with `@register("name")`:
that is all. This registry is the only list of names; `sae.architecture`'s allowed values, the CLI's
`--sae-architecture` choices and every error message are read from it. A class attribute `tied = True`
asks the trainer to keep the encoder equal to the decoder's transpose (the published code's accidental tie).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional

from pipeline.config import SAEConfig

Parameters = dict[str, torch.Tensor]


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


def register(name: str):
    def decorator(cls: type) -> type:
        ARCHITECTURES[name] = cls()
        return cls

    return decorator


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"sae.architecture must be one of {', '.join(ARCHITECTURES)}; got {name!r}")
    return ARCHITECTURES[name]


def _unit_decoder_and_tied_encoder(hidden: int, latents: int, generator: torch.Generator):
    # Decoder directions start as random unit vectors and the encoder as their transpose, as published;
    # here the encoder is a separate copy (defect 1 of docs/science.md §1.3: the published encoder was a view).
    decoder = torch.randn(latents, hidden, generator=generator)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    return decoder, decoder.t().clone()


@register("leaky_relu")
class LeakyReLUSAE:
    """The published SAE: z = LeakyReLU(x·W_enc + b_enc, slope), x̂ = z·W_dec (no decoder bias).

    Parameters: encoder `[hidden, latent]`, encoder_bias `[latent]` ~ U(0, encoder_bias_high), decoder
    `[latent, hidden]` (row k = decoder direction d_k, unit norm at init). Penalty: l1·Σ|z| summed over
    samples and latents (a sum, as published, not a mean).
    """

    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters:
        decoder, encoder = _unit_decoder_and_tied_encoder(hidden, latents, generator)
        encoder_bias = torch.rand(latents, generator=generator) * config.encoder_bias_high
        return {"encoder": encoder, "encoder_bias": encoder_bias, "decoder": decoder}

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        pre = torch.matmul(inputs, parameters["encoder"]) + parameters["encoder_bias"].unsqueeze(-2)
        return functional.leaky_relu(pre, config.leaky_slope)

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
        return torch.matmul(latents, parameters["decoder"])

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        return config.l1_coefficient * latents.abs().sum(dim=(-2, -1))

    @torch.no_grad()
    def losses_and_gradients(
        self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-model loss `[model]` and its gradients for a batch, without autograd.

        `inputs` are feature-major, `[model, hidden, sample]` (the layout whose GEMMs are fastest here, as
        for the network). With pre = W_encᵀx + b, z = LeakyReLU(pre), x̂ = W_decᵀz and
        loss = mean (x̂ − x)² + λΣ|z|: g_x̂ = 2(x̂ − x)/(hidden·samples), ∂W_dec = z g_x̂ᵀ,
        g_z = W_dec g_x̂ + λ·sign(z), g_pre = g_z ⊙ LeakyReLU'(pre), ∂W_enc = x g_preᵀ, ∂b = Σ_samples g_pre.
        An optional method: architectures without it train through autograd. Tested against autograd.
        """
        encoder, bias, decoder = parameters["encoder"], parameters["encoder_bias"], parameters["decoder"]
        pre = torch.baddbmm(bias.unsqueeze(-1), encoder.transpose(1, 2), inputs)  # [model, latent, sample]
        latents = functional.leaky_relu(pre, config.leaky_slope)
        residual = torch.bmm(decoder.transpose(1, 2), latents).sub_(inputs)  # [model, hidden, sample]
        losses = residual.square().mean(dim=(1, 2)) + config.l1_coefficient * latents.abs().sum(dim=(1, 2))
        reconstruction_gradient = residual.mul_(2.0 / (inputs.shape[1] * inputs.shape[2]))
        latent_gradient = torch.bmm(decoder, reconstruction_gradient).add_(
            latents.sign(), alpha=config.l1_coefficient
        )
        pre_gradient = torch.ops.aten.leaky_relu_backward(latent_gradient, pre, config.leaky_slope, False)
        gradients = {
            "encoder": torch.bmm(inputs, pre_gradient.transpose(1, 2)),
            "encoder_bias": pre_gradient.sum(dim=-1),
            "decoder": torch.bmm(latents, reconstruction_gradient.transpose(1, 2)),
        }
        return losses, gradients


@register("published_tied")
class PublishedTiedSAE(LeakyReLUSAE):
    """The published SAE with its tying defect, for reproducing the published code's numbers only.

    Same forward, penalty and initialization as `LeakyReLUSAE`; `tied = True` makes the trainer keep the
    encoder equal to the decoder's transpose after every step, each Adam update landing in the one shared
    weight (docs/science.md §1.3, defect 1: `encoder.weight.data = decoder.weight.data.t()` made a view).
    Combine with `sae.train_on = "raw"` for defect 2 as well.
    """

    tied = True


@register("relu")
class ReLUSAE:
    """ReLU SAE with a decoder bias and decoder-norm-weighted L1 (Anthropic, April 2024 update).

    z = ReLU((x − b_dec)·W_enc + b_enc), x̂ = z·W_dec + b_dec; penalty l1·mean over samples of
    Σ_k z_k‖d_k‖, which stops the SAE from shrinking z by growing the decoder norms.
    """

    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters:
        decoder, encoder = _unit_decoder_and_tied_encoder(hidden, latents, generator)
        encoder_bias = torch.rand(latents, generator=generator) * config.encoder_bias_high
        # Inputs are standardized, so their mean (the usual b_dec init) is zero.
        return {
            "encoder": encoder,
            "encoder_bias": encoder_bias,
            "decoder": decoder,
            "decoder_bias": torch.zeros(hidden),
        }

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        centred = inputs - parameters["decoder_bias"].unsqueeze(-2)
        return torch.relu(
            torch.matmul(centred, parameters["encoder"]) + parameters["encoder_bias"].unsqueeze(-2)
        )

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
        return torch.matmul(latents, parameters["decoder"]) + parameters["decoder_bias"].unsqueeze(-2)

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        decoder_norms = parameters["decoder"].norm(dim=-1)  # [..., latent]
        return config.l1_coefficient * (latents * decoder_norms.unsqueeze(-2)).sum(dim=-1).mean(dim=-1)


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
