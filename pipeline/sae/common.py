"""Pieces several SAE architectures share: reconstruction error, unit rows, encoder/decoder maps, inits."""

from __future__ import annotations

import torch

Parameters = dict[str, torch.Tensor]


def unit_decoder_and_tied_encoder(hidden: int, latents: int, generator: torch.Generator):
    # Decoder directions start as random unit vectors and the encoder as their transpose, as published;
    # here the encoder is a separate copy (defect 1 of docs/science.md §1.3: the published encoder was a view).
    decoder = torch.randn(latents, hidden, generator=generator)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    return decoder, decoder.t().clone()


def reconstruction_error(reconstruction: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """mean over samples and hidden units of (x̂ − x)²: `[..., sample, hidden]` → `[...]`."""
    return (reconstruction - inputs).square().mean(dim=(-2, -1))


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows of `[..., row, column]` scaled to unit length; a zero row (a failed model's) stays zero."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


def keep_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """`values` with all but the `count` largest entries along the last dimension set to 0."""
    kept = values.topk(count, dim=-1)
    return torch.zeros_like(values).scatter(-1, kept.indices, kept.values)


def centred_pre_activations(parameters: Parameters, inputs: torch.Tensor) -> torch.Tensor:
    """(x − b_dec)·W_enc + b_enc: `[..., sample, hidden]` → `[..., sample, latent]`."""
    centred = inputs - parameters["decoder_bias"].unsqueeze(-2)
    return torch.matmul(centred, parameters["encoder"]) + parameters["encoder_bias"].unsqueeze(-2)


def decode_with_bias(parameters: Parameters, latents: torch.Tensor) -> torch.Tensor:
    """z·W_dec + b_dec: `[..., sample, latent]` → `[..., sample, hidden]`."""
    return torch.matmul(latents, parameters["decoder"]) + parameters["decoder_bias"].unsqueeze(-2)


def unit_decoder_and_biases(hidden: int, latents: int, generator: torch.Generator) -> Parameters:
    # Encoder = decoder transpose and zero biases, as in the papers below; the decoder bias would start at the
    # inputs' mean (Gao et al.: their geometric median), which is zero for standardized inputs.
    decoder, encoder = unit_decoder_and_tied_encoder(hidden, latents, generator)
    return {
        "encoder": encoder,
        "encoder_bias": torch.zeros(latents),
        "decoder": decoder,
        "decoder_bias": torch.zeros(hidden),
    }
