"""The published LeakyReLU SAE (untied here), its bug-compatible tied variant, and a plain ReLU SAE."""

from __future__ import annotations

import torch
from torch.nn import functional

from pipeline.config import SAEConfig
from pipeline.sae.common import unit_decoder_and_tied_encoder
from pipeline.sae.registry import Parameters, register


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
        decoder, encoder = unit_decoder_and_tied_encoder(hidden, latents, generator)
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
        decoder, encoder = unit_decoder_and_tied_encoder(hidden, latents, generator)
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
