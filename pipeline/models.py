"""The taming study's MLP: a batched form with a leading model dimension, and an ordinary nn.Module.

Batched parameters carry a leading `model` dimension (`weights[layer]: [model, d_in, d_out]`,
`biases[layer]: [model, d_out]`), so many seeds (and configurations) train in one pass. The forward math is
written once with broadcasting matmuls, so the same function serves one model (no leading dimension) and a
batch of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

ACTIVATION_FUNCTIONS = {"relu": torch.relu, "gelu": functional.gelu}


def layer_dims(features: int, hidden_dim: int, hidden_layers: int) -> list[int]:
    """[8, 12, 12, 12, 12, 8] for the published network: hidden_layers activations, hidden_layers+1 linears."""
    return [features, *([hidden_dim] * hidden_layers), features]


def initial_parameters(
    init: str, dims: Sequence[int], generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One model's initial weights `[d_in, d_out]` and biases `[d_out]`.

    random: PyTorch's default nn.Linear init, W and b ~ U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with
        a = √5), drawn from `generator`.
    orthogonal: `nn.init.orthogonal_` with gain √2 = calculate_gain('relu') on the [d_out, d_in] weight as
        nn.Linear stores it, zero biases (SCIENCE.md §1.2).
    """
    weights, biases = [], []
    for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
        if init == "random":
            bound = 1 / math.sqrt(fan_in)
            weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
            bias = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
        elif init == "orthogonal":
            weight = nn.init.orthogonal_(
                torch.empty(fan_out, fan_in), gain=nn.init.calculate_gain("relu"), generator=generator
            )
            bias = torch.zeros(fan_out)
        else:
            raise ValueError(f"init must be one of random, orthogonal; got {init!r}")
        weights.append(weight.t().contiguous())
        biases.append(bias)
    return weights, biases


def apply_activation(hidden: torch.Tensor, activation_groups: Sequence[tuple[str, int]]) -> torch.Tensor:
    """Apply per-model activations to `hidden: [model, sample, unit]` (or `[sample, unit]` for one model).

    `activation_groups` lists (activation, model count) for contiguous runs of models, e.g.
    [("relu", 40), ("gelu", 40)]; a single run applies one function to the whole tensor with no copy.
    """
    if len(activation_groups) == 1:
        return ACTIVATION_FUNCTIONS[activation_groups[0][0]](hidden)
    pieces, start = [], 0
    for name, count in activation_groups:
        pieces.append(ACTIVATION_FUNCTIONS[name](hidden[start : start + count]))
        start += count
    return torch.cat(pieces)


def mlp_forward(
    inputs: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation_groups: Sequence[tuple[str, int]],
    last_hidden_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass; returns (outputs, last hidden activation).

    Shapes (batched): inputs `[model, sample, feature]`, weights `[model, d_in, d_out]`, biases
    `[model, d_out]`, noise `[model, sample, hidden]`; outputs `[model, sample, feature]`. Without the
    leading model dimension the same code runs one model. Noise is added to the last hidden activation,
    the input of the final linear layer (SCIENCE.md §1.2); the returned hidden activation includes it.
    """
    hidden = inputs
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        hidden = apply_activation(torch.matmul(hidden, weight) + bias.unsqueeze(-2), activation_groups)
    if last_hidden_noise is not None:
        hidden = hidden + last_hidden_noise
    return torch.matmul(hidden, weights[-1]) + biases[-1].unsqueeze(-2), hidden


class MLP(nn.Module):
    """One trained network as an ordinary module: `MLP(8, 12, 4, "relu")(x) -> y`, x: `[sample, 8]`."""

    def __init__(self, features: int, hidden_dim: int, hidden_layers: int, activation: str) -> None:
        super().__init__()
        dims = layer_dims(features, hidden_dim, hidden_layers)
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.activation = activation

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(inputs)[0]

    def forward_with_hidden(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs `[sample, feature]`, last hidden activation `[sample, hidden]`), clean (no noise)."""
        hidden = inputs
        for layer in self.layers[:-1]:
            hidden = ACTIVATION_FUNCTIONS[self.activation](layer(hidden))
        return self.layers[-1](hidden), hidden

    def weight_matrices(self) -> list[torch.Tensor]:
        """Weight matrices in nn.Linear's `[d_out, d_in]` layout (biases excluded)."""
        return [layer.weight for layer in self.layers]

    @classmethod
    def from_parameters(
        cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], activation: str
    ) -> MLP:
        """Build from one model's `[d_in, d_out]` weights and `[d_out]` biases (the batched layout)."""
        features, hidden_dim = weights[0].shape
        module = cls(features, hidden_dim, len(weights) - 1, activation)
        with torch.no_grad():
            for layer, weight, bias in zip(module.layers, weights, biases, strict=True):
                layer.weight.copy_(weight.t())
                layer.bias.copy_(bias)
        return module
