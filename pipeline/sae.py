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

import math
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
    return _reconstruction_error(reconstruction, inputs) + architecture.sparsity_penalty(
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
    unit = _unit_rows(decoder)
    decoder.grad.sub_(unit * (decoder.grad * unit).sum(dim=-1, keepdim=True))


@torch.no_grad()
def after_update(architecture: Architecture, parameters: Parameters) -> None:
    """Project decoder rows back to unit norm (unit-norm architectures; zero rows stay zero), then apply
    the architecture's own projection, if it has one (JumpReLU's θ ≥ 0)."""
    if getattr(architecture, "unit_norm_decoder", False):
        parameters["decoder"].copy_(_unit_rows(parameters["decoder"]))
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


def _reconstruction_error(reconstruction: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """mean over samples and hidden units of (x̂ − x)²: `[..., sample, hidden]` → `[...]`."""
    return (reconstruction - inputs).square().mean(dim=(-2, -1))


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows of `[..., row, column]` scaled to unit length; a zero row (a failed model's) stays zero."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


def _keep_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """`values` with all but the `count` largest entries along the last dimension set to 0."""
    kept = values.topk(count, dim=-1)
    return torch.zeros_like(values).scatter(-1, kept.indices, kept.values)


def _centred_pre_activations(parameters: Parameters, inputs: torch.Tensor) -> torch.Tensor:
    """(x − b_dec)·W_enc + b_enc: `[..., sample, hidden]` → `[..., sample, latent]`."""
    centred = inputs - parameters["decoder_bias"].unsqueeze(-2)
    return torch.matmul(centred, parameters["encoder"]) + parameters["encoder_bias"].unsqueeze(-2)


def _decode_with_bias(parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
    """z·W_dec + b_dec: `[..., sample, latent]` → `[..., sample, hidden]`."""
    return torch.matmul(latents, parameters["decoder"]) + parameters["decoder_bias"].unsqueeze(-2)


def _unit_decoder_and_biases(hidden: int, latents: int, generator: torch.Generator) -> Parameters:
    # Encoder = decoder transpose and zero biases, as in the papers below; the decoder bias would start at the
    # inputs' mean (Gao et al.: their geometric median), which is zero for standardized inputs.
    decoder, encoder = _unit_decoder_and_tied_encoder(hidden, latents, generator)
    return {
        "encoder": encoder,
        "encoder_bias": torch.zeros(latents),
        "decoder": decoder,
        "decoder_bias": torch.zeros(hidden),
    }


# ---------------------------------------------------------------------------------------------------------
# TopK and BatchTopK with the AuxK dead-latent loss


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
    loss = _reconstruction_error(estimate, residual.detach())
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
        return _unit_decoder_and_biases(hidden, latents, generator)

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        return torch.relu(_keep_largest(_centred_pre_activations(parameters, inputs), config.k))

    def decode(self, parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
        return _decode_with_bias(parameters, latents)

    def sparsity_penalty(
        self, parameters: Parameters, latents: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """Zero: TopK is sparse by construction."""
        return latents.new_zeros(latents.shape[:-2])

    def training_latents(
        self, parameters: Parameters, pre_activations: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """The codes training uses, from pre-activations `[..., sample, latent]` (same shape)."""
        return torch.relu(_keep_largest(pre_activations, config.k))

    def training_losses(
        self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig, state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        pre_activations = _centred_pre_activations(parameters, inputs)
        latents = self.training_latents(parameters, pre_activations, config)
        reconstruction = _decode_with_bias(parameters, latents)
        dead = dead_latents_update(state, latents.detach(), config.dead_epochs)
        auxiliary = auxiliary_k_loss(parameters, pre_activations, inputs - reconstruction, dead, config.aux_k)
        return _reconstruction_error(reconstruction, inputs) + config.aux_coefficient * auxiliary


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
        return {**_unit_decoder_and_biases(hidden, latents, generator), "threshold": torch.zeros(())}

    def encode(self, parameters: Parameters, inputs: torch.Tensor, config: SAEConfig) -> torch.Tensor:
        pre_activations = _centred_pre_activations(parameters, inputs)
        threshold = parameters["threshold"][..., None, None]
        return torch.where(pre_activations >= threshold, torch.relu(pre_activations), 0.0)

    def training_latents(
        self, parameters: Parameters, pre_activations: torch.Tensor, config: SAEConfig
    ) -> torch.Tensor:
        """The batch's codes `[..., sample, latent]`; sets θ from them as a side effect."""
        flat = pre_activations.flatten(-2)  # [..., sample · latent]: the batch's budget is shared
        kept = _keep_largest(flat, config.k * pre_activations.shape[-2])
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
        self.training_latents(parameters, _centred_pre_activations(parameters, inputs), config)


# ---------------------------------------------------------------------------------------------------------
# JumpReLU with straight-through estimators


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
        parameters = _unit_decoder_and_biases(hidden, latents, generator)
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
        return _decode_with_bias(parameters, latents)

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
        reconstruction = _decode_with_bias(parameters, latents)
        return _reconstruction_error(reconstruction, inputs) + config.l0_coefficient * l0


# ---------------------------------------------------------------------------------------------------------
# Gated SAE


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
        parameters = _unit_decoder_and_biases(hidden, latents, generator)
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
        return _decode_with_bias(parameters, latents)

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
        reconstruction = _decode_with_bias(parameters, latents)
        gate_activations = torch.relu(gate)
        sparsity = gate_activations.sum(dim=-1).mean(dim=-1)
        frozen = {
            "decoder": parameters["decoder"].detach(),
            "decoder_bias": parameters["decoder_bias"].detach(),
        }
        auxiliary = _reconstruction_error(_decode_with_bias(frozen, gate_activations), inputs)
        return _reconstruction_error(reconstruction, inputs) + config.l1_coefficient * sparsity + auxiliary


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
