"""The taming study's MLP: a batched form with a leading model dimension, and an ordinary nn.Module.

Batched parameters carry a leading `model` dimension and use nn.Linear's layout
(`weights[layer]: [model, d_out, d_in]`, `biases[layer]: [model, d_out]`), so many seeds and
configurations train in one pass. Activations are kept feature-major, `[model, unit, sample]`: each layer
is then one `baddbmm(b, W, h)` whose long dimension (samples) is the GEMM's output width, which measured
1.7× faster than the sample-major `h @ W` on this project's 2-core CPUs (bench/engine.py). The backward
pass is written by hand (`mlp_backward`) rather than through autograd: the network is fixed, and skipping
graph bookkeeping removes most small per-step operations. A test checks it against autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    """One model's initial weights `[d_out, d_in]` (nn.Linear layout) and biases `[d_out]`.

    random: PyTorch's default nn.Linear init, W and b ~ U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with
        a = √5), drawn from `generator`.
    orthogonal: `nn.init.orthogonal_` with gain √2 = calculate_gain('relu'), zero biases (docs/science.md §1.2).
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
        weights.append(weight)
        biases.append(bias)
    return weights, biases


Activation = str | Sequence[tuple[str, int, int]]


def activation_runs(activation: Activation, models: int) -> list[tuple[str, int, int]]:
    """Normalise to contiguous (name, first model, end model) runs: "relu" → [("relu", 0, models)]."""
    if isinstance(activation, str):
        return [(activation, 0, models)]
    return list(activation)


def runs_of(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of equal names: ["relu", "relu", "gelu"] → [("relu", 0, 2), ("gelu", 2, 3)]."""
    runs: list[tuple[str, int, int]] = []
    for index, name in enumerate(names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], index + 1)
        else:
            runs.append((name, index, index + 1))
    return runs


def _activate(pre: torch.Tensor, runs: Sequence[tuple[str, int, int]]) -> torch.Tensor:
    # Several activations in one pass write their slices into one buffer (no concatenation copy).
    if len(runs) == 1:
        return ACTIVATION_FUNCTIONS[runs[0][0]](pre)
    out = torch.empty_like(pre)
    for name, start, stop in runs:
        if name == "relu":
            torch.clamp_min(pre[start:stop], 0.0, out=out[start:stop])
        else:
            torch.ops.aten.gelu.out(pre[start:stop], out=out[start:stop])
    return out


@dataclass
class ForwardTrace:
    """What the hand-written backward needs: the layer inputs and the hidden pre-activations.

    inputs[l]: `[model, d_in_l, sample]` (inputs[-1] is the last hidden activation, noise included);
    pre_activations[l]: `[model, hidden, sample]` for the hidden layers.
    """

    inputs: list[torch.Tensor]
    pre_activations: list[torch.Tensor]


def mlp_forward_features(
    inputs: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: Activation,
    last_hidden_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ForwardTrace]:
    """Feature-major batched forward: inputs `[model, feature, sample]` → outputs `[model, feature, sample]`.

    Noise `[model, hidden, sample]` is added to the last hidden activation, the input of the final linear
    layer (docs/science.md §1.2). `activation` is one name, or (name, start, stop) runs over the models.
    """
    runs = activation_runs(activation, inputs.shape[0])
    trace = ForwardTrace(inputs=[inputs], pre_activations=[])
    hidden = inputs
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        pre = torch.baddbmm(bias.unsqueeze(-1), weight, hidden)
        trace.pre_activations.append(pre)
        hidden = _activate(pre, runs)
        trace.inputs.append(hidden)
    if last_hidden_noise is not None:
        hidden = hidden + last_hidden_noise
        trace.inputs[-1] = hidden
    return torch.baddbmm(biases[-1].unsqueeze(-1), weights[-1], hidden), trace


def _activation_backward(
    gradient: torch.Tensor, pre: torch.Tensor, runs: Sequence[tuple[str, int, int]]
) -> torch.Tensor:
    if len(runs) == 1:
        if runs[0][0] == "relu":
            return torch.ops.aten.threshold_backward(gradient, pre, 0.0)
        return torch.ops.aten.gelu_backward(gradient, pre)
    out = torch.empty_like(gradient)
    for name, start, stop in runs:
        if name == "relu":
            torch.ops.aten.threshold_backward.grad_input(
                gradient[start:stop], pre[start:stop], 0.0, grad_input=out[start:stop]
            )
        else:
            torch.ops.aten.gelu_backward.grad_input(
                gradient[start:stop], pre[start:stop], approximate="none", grad_input=out[start:stop]
            )
    return out


def mlp_backward(
    output_gradient: torch.Tensor,
    weights: Sequence[torch.Tensor],
    trace: ForwardTrace,
    activation: Activation,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of a loss w.r.t. every weight `[model, d_out, d_in]` and bias `[model, d_out]`.

    `output_gradient: [model, feature, sample]` is ∂loss/∂outputs. Backpropagation through
    h_{l+1} = act(W_l h_l + b_l): ∂W_l = δ_l h_lᵀ, ∂b_l = Σ_samples δ_l, δ_{l−1} = act'(pre_{l−1}) ⊙ W_lᵀ δ_l.
    """
    runs = activation_runs(activation, output_gradient.shape[0])
    layers = len(weights)
    weight_gradients: list[torch.Tensor] = [None] * layers  # type: ignore[list-item]
    bias_gradients: list[torch.Tensor] = [None] * layers  # type: ignore[list-item]
    delta = output_gradient
    for layer in range(layers - 1, -1, -1):
        weight_gradients[layer] = torch.bmm(delta, trace.inputs[layer].transpose(1, 2))
        bias_gradients[layer] = delta.sum(dim=-1)
        if layer > 0:
            delta = _activation_backward(
                torch.bmm(weights[layer].transpose(1, 2), delta), trace.pre_activations[layer - 1], runs
            )
    return weight_gradients, bias_gradients


def mlp_forward(
    inputs: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activation: Activation,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-major convenience wrapper: inputs `[model, sample, feature]` → (outputs, last hidden), both
    sample-major, clean (no noise)."""
    outputs, trace = mlp_forward_features(inputs.transpose(1, 2), weights, biases, activation)
    return outputs.transpose(1, 2), trace.inputs[-1].transpose(1, 2)


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
        """Build from one model's `[d_out, d_in]` weights and `[d_out]` biases (one slice of the batch)."""
        hidden_dim, features = weights[0].shape
        module = cls(features, hidden_dim, len(weights) - 1, activation)
        with torch.no_grad():
            for layer, weight, bias in zip(module.layers, weights, biases, strict=True):
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
        return module
