"""TopK with the AuxK dead-latent loss (Gao et al. 2024) and BatchTopK with its inference threshold
(Bussmann et al. 2024)."""

from __future__ import annotations

import math

import torch

from pipeline.config import SAEConfig
from pipeline.sae.common import (
    centred_pre_activations,
    decode_with_bias,
    keep_largest,
    reconstruction_error,
    unit_decoder_and_biases,
)
from pipeline.sae.registry import Parameters, register


def dead_latents_update(
    state: dict[str, torch.Tensor], latents: torch.Tensor, dead_epochs: int
) -> torch.Tensor:
    """Count the epochs each latent has gone without firing and return the dead mask `[..., latent]`.

    latents: `[..., sample, latent]` of one training step (here the whole train split: training is full
    batch). A latent is dead once it has not been active (z > 0) on any sample for `dead_epochs`
    consecutive steps (Gao et al. 2024: 10M tokens without firing). The count lives in
    `state["epochs_since_fired"]`, so it survives from step to step without being a parameter.
    """
    fired = (latents > 0).any(dim=-2)
    since = state.get("epochs_since_fired")
    since = torch.zeros_like(fired, dtype=torch.long) if since is None else since
    since = torch.where(fired, 0, since + 1)
    state["epochs_since_fired"] = since
    return since >= dead_epochs


def auxiliary_k_loss(
    parameters: Parameters,
    pre_activations: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
) -> torch.Tensor:
    """AuxK, Gao et al.'s loss against dead latents: the dead latents' best attempt at the live ones' residual.

        L_aux = mean over samples and hidden of (e − ê)²,  e = x − x̂ (held fixed),
        ê = W_dec z_aux,  z_aux = ReLU(TopK_{aux_k}(pre-activations of the dead latents))

    pre_activations: `[..., sample, latent]`, residual e: `[..., sample, hidden]`, dead: `[..., latent]`.
    Returns `[...]`, 0 for a model without dead latents: then there is nothing to revive, and e alone
    would only add a constant. ê has no decoder bias: b_dec is already part of x̂. The residual is
    detached, so the loss moves only the dead latents' encoder columns and decoder rows.
    """
    count = min(aux_k, pre_activations.shape[-1])
    candidates = pre_activations.masked_fill(~dead.unsqueeze(-2), -math.inf)
    chosen = candidates.topk(count, dim=-1)
    # ReLU after TopK as in the main encoder; −inf (live latents picked when fewer are dead) becomes 0.
    auxiliary_latents = torch.zeros_like(pre_activations).scatter(
        -1, chosen.indices, torch.relu(chosen.values)
    )
    estimate = torch.matmul(auxiliary_latents, parameters["decoder"])
    loss = reconstruction_error(estimate, residual.detach())
    return torch.where(dead.any(dim=-1), loss, 0.0)


@register("topk")
class TopKSAE:
    """TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

        z = ReLU(TopK_k((x − b_dec)·W_enc + b_enc)),  x̂ = z·W_dec + b_dec
        loss = mean (x̂ − x)² + aux_coefficient · L_aux   (`auxiliary_k_loss`, dead after `dead_epochs`)

    TopK_k keeps the k largest pre-activations of each sample and zeroes the rest, so at most k latents
    are active per sample (exactly k whenever the k-th largest pre-activation is positive); no sparsity
    penalty is needed. Decoder rows are kept at unit norm. Parameters: encoder `[hidden, latent]`,
    encoder_bias `[latent]`, decoder `[latent, hidden]`, decoder_bias `[hidden]`.
    """

    unit_norm_decoder = True

    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters:
        return unit_decoder_and_biases(hidden, latents, generator)

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        return torch.relu(keep_largest(centred_pre_activations(parameters, inputs), config.k))

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_bias(parameters, latents)

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """Zero: TopK is sparse by construction."""
        return latents.new_zeros(latents.shape[:-2])

    def training_latents(
        self, parameters: Parameters, pre_activations: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """The codes training uses, from pre-activations `[..., sample, latent]` (same shape)."""
        return torch.relu(keep_largest(pre_activations, config.k))

    def training_losses(
        self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig, state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        pre_activations = centred_pre_activations(parameters, inputs)
        latents = self.training_latents(parameters, pre_activations, config)
        reconstruction = decode_with_bias(parameters, latents)
        dead = dead_latents_update(state, latents.detach(), config.dead_epochs)
        auxiliary = auxiliary_k_loss(parameters, pre_activations, inputs - reconstruction, dead, config.aux_k)
        return reconstruction_error(reconstruction, inputs) + config.aux_coefficient * auxiliary


@register("batch_topk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024, "BatchTopK sparse autoencoders").

    Training: the k·B largest pre-activations of the whole batch of B samples are kept (per model), so
    samples share a budget of k active latents on average instead of exactly k each:
        z = ReLU(BatchTopK_{k·B}((x − b_dec)·W_enc + b_enc)),  x̂ = z·W_dec + b_dec,
        loss = mean (x̂ − x)² + aux_coefficient · L_aux (the AuxK loss of `TopKSAE`).
    Inference cannot depend on the batch, so it uses one threshold θ per SAE (a JumpReLU):
        z = pre · 1[pre ≥ θ],  θ = E_batches[min over the batch's kept activations z > 0]
    Training here is full batch, so the expectation is over the one batch, the train split: θ is set from
    each step's batch (for the training curves) and, finally, from the trained weights (`after_training`).
    With ≥, the inference code reproduces the training code on that batch exactly. θ: `[]` per SAE, a
    parameter Adam does not touch (`untrained`).
    """

    untrained = ("threshold",)

    def initial_parameters(
        self, hidden: int, latents: int, config: SAEConfig, generator: torch.Generator
    ) -> Parameters:
        return {**unit_decoder_and_biases(hidden, latents, generator), "threshold": torch.zeros(())}

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        pre_activations = centred_pre_activations(parameters, inputs)
        threshold = parameters["threshold"][..., None, None]
        return torch.where(pre_activations >= threshold, torch.relu(pre_activations), 0.0)

    def training_latents(
        self, parameters: Parameters, pre_activations: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """The batch's codes `[..., sample, latent]`; sets θ from them as a side effect."""
        flat = pre_activations.flatten(-2)  # [..., sample · latent]: the batch's budget is shared
        kept = keep_largest(flat, config.k * pre_activations.shape[-2])
        latents = torch.relu(kept).unflatten(-1, pre_activations.shape[-2:])
        self._set_threshold(parameters, latents.detach())
        return latents

    @staticmethod
    @torch.no_grad()
    def _set_threshold(parameters: Parameters, latents: torch.Tensor) -> None:
        """θ ← the smallest active latent of the batch `[..., sample, latent]` (kept when none is active)."""
        positive = torch.where(latents > 0, latents, math.inf).flatten(-2).amin(dim=-1)
        threshold = parameters["threshold"]
        threshold.copy_(torch.where(torch.isfinite(positive), positive, threshold))

    def after_training(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> None:
        self.training_latents(parameters, centred_pre_activations(parameters, inputs), config)
