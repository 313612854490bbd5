"""JumpReLU with straight-through estimators of the threshold and the L0 penalty (Rajamanoharan et al.
2024b)."""

from __future__ import annotations

import torch

from pipeline.config import SAEConfig
from pipeline.sae.common import (
    decode_with_bias,
    reconstruction_error,
    unit_decoder_and_biases,
)
from pipeline.sae.registry import Parameters, register


def _rectangle(values: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 for |u| < ½, else 0 (Rajamanoharan et al. 2024b, §4)."""
    return (values.abs() < 0.5).to(values.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """JumpReLU_θ(p) = p·H(p − θ), with the pseudo-derivative of "Jumping ahead" (§4):

    ∂/∂p = H(p − θ),   ∂/∂θ := −(θ/ε)·K((p − θ)/ε)
    """

    @staticmethod
    def forward(context, pre_activations, threshold, bandwidth):
        context.save_for_backward(pre_activations, threshold)
        context.bandwidth = bandwidth
        return pre_activations * (pre_activations > threshold).to(pre_activations.dtype)

    @staticmethod
    def backward(context, upstream):
        pre_activations, threshold = context.saved_tensors
        bandwidth = context.bandwidth
        pre_gradient = upstream * (pre_activations > threshold).to(upstream.dtype)
        kernel = _rectangle((pre_activations - threshold) / bandwidth)
        threshold_gradient = (upstream * -(threshold / bandwidth) * kernel).sum_to_size(threshold.shape)
        return pre_gradient, threshold_gradient, None


class _StepFunction(torch.autograd.Function):
    """The Heaviside step H(p − θ), with the pseudo-derivative of "Jumping ahead" (§4):

        ∂/∂p := 0,   ∂/∂θ := −(1/ε)·K((p − θ)/ε)

    so the L0 penalty reaches the threshold only, never the encoder (the paper's choice: its gradient
    would otherwise need the same estimator for every encoder weight).
    """

    @staticmethod
    def forward(context, pre_activations, threshold, bandwidth):
        context.save_for_backward(pre_activations, threshold)
        context.bandwidth = bandwidth
        return (pre_activations > threshold).to(pre_activations.dtype)

    @staticmethod
    def backward(context, upstream):
        pre_activations, threshold = context.saved_tensors
        bandwidth = context.bandwidth
        kernel = _rectangle((pre_activations - threshold) / bandwidth)
        threshold_gradient = (upstream * -kernel / bandwidth).sum_to_size(threshold.shape)
        return torch.zeros_like(pre_activations), threshold_gradient, None


@register("jumprelu")
class JumpReLUSAE:
    """JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping ahead", §3–4).

        p = x·W_enc + b_enc,  z = JumpReLU_θ(p) = p·H(p − θ),  x̂ = z·W_dec + b_dec
        loss = mean (x̂ − x)² + l0_coefficient · mean over samples of Σ_latents H(p − θ)

    θ `[latent]` starts at `jumprelu_initial_threshold`; both the jump and the step are trained through
    straight-through estimators with a rectangle kernel of width `jumprelu_bandwidth` (`_JumpReLUFunction`,
    `_StepFunction`). Adam trains θ itself, kept ≥ 0 by projection after each update, where the paper's
    code trains log θ: Adam moves a parameter by about lr per step, so log θ from 0.001 could at most
    grow e-fold in the published 1000 epochs at lr 1e-3 (measured: the trained L0 did not change between
    l0_coefficient 0.01 and 0.03), while θ itself can travel the O(1) range of standardized
    pre-activations. The encoder sees x itself (no b_dec subtraction, as in the paper's equations).
    Decoder rows are kept at unit norm, as in the Gated SAE the paper builds on; the L0 penalty does not
    depend on their scale, so this only fixes the parametrization. Parameters: encoder `[hidden, latent]`,
    encoder_bias `[latent]`, threshold `[latent]`, decoder `[latent, hidden]`, decoder_bias `[hidden]`.
    """

    unit_norm_decoder = True

    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters:
        parameters = unit_decoder_and_biases(hidden, latents, generator)
        parameters["threshold"] = torch.full((latents,), config.jumprelu_initial_threshold)
        return parameters

    @torch.no_grad()
    def after_update(self, parameters: Parameters) -> None:
        """θ ≥ 0: below zero the jump would let negative pre-activations through."""
        parameters["threshold"].clamp_(min=0.0)

    @staticmethod
    def pre_activations(parameters: Parameters, inputs: torch.Tensor) -> torch.Tensor:
        return torch.matmul(inputs, parameters["encoder"]) + parameters["encoder_bias"].unsqueeze(-2)

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        threshold = parameters["threshold"].unsqueeze(-2)
        return _JumpReLUFunction.apply(
            self.pre_activations(parameters, inputs), threshold, config.jumprelu_bandwidth
        )

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_bias(parameters, latents)

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """The L0 penalty's value (no gradient: training goes through `training_losses`)."""
        return config.l0_coefficient * (latents > 0).to(latents.dtype).sum(dim=-1).mean(dim=-1)

    def training_losses(
        self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig, state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        pre_activations = self.pre_activations(parameters, inputs)
        threshold = parameters["threshold"].unsqueeze(-2)
        latents = _JumpReLUFunction.apply(pre_activations, threshold, config.jumprelu_bandwidth)
        active = _StepFunction.apply(pre_activations, threshold, config.jumprelu_bandwidth)
        l0 = active.sum(dim=-1).mean(dim=-1)
        reconstruction = decode_with_bias(parameters, latents)
        return reconstruction_error(reconstruction, inputs) + config.l0_coefficient * l0
