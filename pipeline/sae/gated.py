"""The Gated SAE (Rajamanoharan et al. 2024a): a gate path decides which latents fire, a magnitude path
how much, sharing one encoder direction per latent."""

from __future__ import annotations

import torch

from pipeline.config import SAEConfig
from pipeline.sae.common import (
    decode_with_bias,
    reconstruction_error,
    unit_decoder_and_biases,
)
from pipeline.sae.registry import Parameters, register


@register("gated")
class GatedSAE:
    """Gated SAE (Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse autoencoders").

    One encoder matrix W_gate serves two paths; the magnitude path rescales its columns, W_mag = W_gate ·
    diag(exp(r_mag)) (the paper's weight sharing):
        x̃ = x − b_dec,  π_gate = x̃·W_gate + b_gate,  π_mag = x̃·W_mag + b_mag
        z = 1[π_gate > 0] ⊙ ReLU(π_mag),  x̂ = z·W_dec + b_dec
        loss = mean (x̂ − x)² + l1_coefficient · mean over samples of Σ ReLU(π_gate)
               + mean (x̂_frozen(ReLU(π_gate)) − x)²
    where x̂_frozen decodes with copies of W_dec and b_dec that receive no gradient (the paper's auxiliary
    loss): the step 1[·] passes no gradient, so the gate path learns only from the sparsity and auxiliary
    terms, and the auxiliary term makes ReLU(π_gate) itself reconstruct x. Decoder rows at unit norm (the
    paper's constraint, which keeps the L1 penalty from being dodged by growing them). Parameters: encoder
    (W_gate) `[hidden, latent]`, encoder_bias (b_gate) `[latent]`, magnitude_log_scale (r_mag) `[latent]`,
    magnitude_bias (b_mag) `[latent]`, decoder `[latent, hidden]`, decoder_bias `[hidden]`.
    """

    unit_norm_decoder = True

    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters:
        parameters = unit_decoder_and_biases(hidden, latents, generator)
        # r_mag = 0 starts both paths with the same weights.
        parameters["magnitude_log_scale"] = torch.zeros(latents)
        parameters["magnitude_bias"] = torch.zeros(latents)
        return parameters

    @staticmethod
    def paths(parameters: Parameters, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag), each `[..., sample, latent]`."""
        centred = inputs - parameters["decoder_bias"].unsqueeze(-2)
        shared = torch.matmul(centred, parameters["encoder"])
        gate = shared + parameters["encoder_bias"].unsqueeze(-2)
        # x̃·(W_gate·diag(s)) = (x̃·W_gate)·s: the scale applies per latent column.
        magnitude = shared * parameters["magnitude_log_scale"].exp().unsqueeze(-2)
        return gate, magnitude + parameters["magnitude_bias"].unsqueeze(-2)

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        gate, magnitude = self.paths(parameters, inputs)
        return (gate > 0).to(magnitude.dtype) * torch.relu(magnitude)

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_bias(parameters, latents)

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """Zero: the L1 penalty acts on the gate pre-activations, which only `training_losses` sees."""
        return latents.new_zeros(latents.shape[:-2])

    def training_losses(
        self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig, state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        gate, magnitude = self.paths(parameters, inputs)
        latents = (gate > 0).to(magnitude.dtype) * torch.relu(magnitude)
        reconstruction = decode_with_bias(parameters, latents)
        gate_activations = torch.relu(gate)
        sparsity = gate_activations.sum(dim=-1).mean(dim=-1)
        frozen = {
            "decoder": parameters["decoder"].detach(),
            "decoder_bias": parameters["decoder_bias"].detach(),
        }
        auxiliary = reconstruction_error(decode_with_bias(frozen, gate_activations), inputs)
        return reconstruction_error(reconstruction, inputs) + config.l1_coefficient * sparsity + auxiliary
