"""The splitting remedy for incidental polysemanticity (Lecomte et al., seed 001, discussion).

A neuron j of the tied model x̂ = ReLU(x W Wᵀ) enters the output only through the rank-one term w wᵀ of its
column w = W[:, j], since W Wᵀ = Σ_j W[:, j] W[:, j]ᵀ. Replacing w by two copies w/√2 leaves that term, hence
W Wᵀ and every output, unchanged: (w/√2)(w/√2)ᵀ + (w/√2)(w/√2)ᵀ = w wᵀ. Noise of scale ε on each copy then
breaks their symmetry (with ε = 0 the copies receive identical gradients and stay equal forever), and
training on may let each copy take one of the neuron's features. The L1 term is not unchanged: the copies'
activations sum to √2·|x·w| instead of |x·w|, so splitting raises λ·‖h‖₁ by (√2 − 1)·λ·|x·w| per split neuron.

Splitting is batched over instances that split different numbers of neurons: the first copy of neuron j
stays in column j, the second goes to column m + r for the r-th split neuron of that instance, and every
instance is padded with zero columns to the largest number of splits (`pipeline.incidental.
continue_training` keeps zero columns exactly zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.incidental import _represented, instance_generator

# Seed stream of the copies' noise (pipeline.incidental uses 0–3 for init, hidden noise, inputs, evaluation).
SPLIT_STREAM = 4

# Outcome of one split (or, without splitting, of one originally polysemantic neuron) after training on:
RESOLVED = "resolved"  # each copy carries exactly one of the neuron's former features, a different one
RECOLLIDED = "recollided"  # some copy still carries two or more features
# Neither: a copy carries no feature at unit strength (e.g. both still near 1/√2, as with ε = 0) or one
# the neuron did not carry before.
OTHER = "other"
OUTCOMES = (RESOLVED, RECOLLIDED, OTHER)
# Not exclusive with the above: every feature the neuron carried before now sits, at unit strength, on a
# monosemantic neuron of its own (a copy or any other neuron). Counts separations the copies did not make,
# e.g. a feature pushed to a third neuron by a large ε.
SEPARATED = "separated"


@dataclass
class Split:
    """Where the copies of the split neurons are.

    weights: [instance, n, m + k] with k = the largest number of splits in an instance (zero padding).
    neurons: [instance, k] int64: the original neuron j of the r-th split, −1 for padding.
    first, second: [instance, k] int64 columns of the two copies (j and m + r), −1 for padding.
    valid: [instance, k] bool, False for padding.
    features: per instance, per split, the features the neuron carried before (|W_ij| ∈ [low, high]).
    """

    weights: torch.Tensor
    neurons: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    valid: torch.Tensor
    features: list[list[list[int]]]


def _carried(weights: torch.Tensor, neurons: torch.Tensor, low: float, high: float) -> list[list[list[int]]]:
    return [
        [copy_features(weights[instance], int(neuron), low, high) for neuron in row if neuron >= 0]
        for instance, row in enumerate(neurons.tolist())
    ]


def copy_noise(seed: int, instances: list[int], n: int, m: int) -> torch.Tensor:
    """Standard normal noise for the copies: [instance, 2, n, m], from each instance's own stream.

    Entry [i, c, :, j] perturbs copy c of neuron j. It does not depend on ε or on which neurons are split,
    so every ε of a study perturbs along the same directions (common random numbers) and arms that differ
    only in ε are paired on the instance.
    """
    return torch.stack(
        [torch.randn(2, n, m, generator=instance_generator(seed, index, SPLIT_STREAM)) for index in instances]
    )


def split_neurons(
    weights: torch.Tensor,
    selected: torch.Tensor,
    epsilon: float,
    noise: torch.Tensor | None = None,
    low: float = 0.8,
    high: float = 1.2,
) -> Split:
    """Split the selected neurons of each instance into two copies w/√2 + ε·z.

    weights: [instance, n, m]; selected: [instance, m] bool (e.g. the polysemantic neurons); noise: z as
    [instance, 2, n, m] (`copy_noise`), needed when epsilon > 0. With epsilon = 0, W' W'ᵀ = W Wᵀ up to
    floating-point rounding, so the outputs are unchanged.
    """
    instances, n, m = weights.shape
    counts = selected.sum(dim=-1)
    extra = int(counts.max().item()) if instances else 0
    grown = torch.zeros(instances, n, m + extra, dtype=weights.dtype, device=weights.device)
    grown[..., :m] = weights
    neurons = torch.full((instances, extra), -1, dtype=torch.int64)
    first = neurons.clone()
    second = neurons.clone()
    scale = 1 / math.sqrt(2)
    for instance in range(instances):
        chosen = torch.nonzero(selected[instance], as_tuple=False).flatten().cpu()
        for rank, neuron in enumerate(chosen.tolist()):
            column = weights[instance, :, neuron] * scale
            copy_one, copy_two = column.clone(), column.clone()
            if epsilon > 0:
                if noise is None:
                    raise ValueError("epsilon > 0 needs the copies' noise (copy_noise)")
                copy_one = copy_one + epsilon * noise[instance, 0, :, neuron].to(weights)
                copy_two = copy_two + epsilon * noise[instance, 1, :, neuron].to(weights)
            grown[instance, :, neuron] = copy_one
            grown[instance, :, m + rank] = copy_two
            neurons[instance, rank] = neuron
            first[instance, rank] = neuron
            second[instance, rank] = m + rank
    return Split(grown, neurons, first, second, neurons >= 0, _carried(weights, neurons, low, high))


def unsplit(weights: torch.Tensor, selected: torch.Tensor, low: float = 0.8, high: float = 1.2) -> Split:
    """The baseline's bookkeeping: the same neurons, not split (each is its own "first copy", no second)."""
    instances, _, m = weights.shape
    extra = int(selected.sum(dim=-1).max().item()) if instances else 0
    neurons = torch.full((instances, extra), -1, dtype=torch.int64)
    for instance in range(instances):
        chosen = torch.nonzero(selected[instance], as_tuple=False).flatten().cpu()
        neurons[instance, : len(chosen)] = chosen
    return Split(
        weights.clone(),
        neurons,
        neurons.clone(),
        torch.full_like(neurons, -1),
        neurons >= 0,
        _carried(weights, neurons, low, high),
    )


def copy_features(weights: torch.Tensor, column: int, low: float, high: float) -> list[int]:
    """Features carried by one column at about unit strength (|W_ij| ∈ [low, high]). weights: [n, m']."""
    if column < 0:
        return []
    return torch.nonzero(_represented(weights[:, column], low, high), as_tuple=False).flatten().tolist()


def outcome(
    weights: torch.Tensor,
    first: int,
    second: int,
    before: list[int],
    low: float = 0.8,
    high: float = 1.2,
) -> str:
    """RESOLVED, RECOLLIDED or OTHER for one split neuron of one instance (weights [n, m']).

    before: the features the neuron carried before the split. Split (second ≥ 0): resolved when each copy
    carries exactly one feature (|W_ij| ∈ [low, high]), the two differ and both are in `before`;
    recollided when a copy carries two or more; other otherwise. Not split (second = −1, the baseline):
    resolved when the neuron carries exactly one feature of `before`, recollided when two or more.
    """
    features = [copy_features(weights, column, low, high) for column in (first, second) if column >= 0]
    if any(len(carried) >= 2 for carried in features):
        return RECOLLIDED
    singles = [carried[0] for carried in features if len(carried) == 1]
    if len(singles) == len(features) and len(set(singles)) == len(singles) and set(singles) <= set(before):
        return RESOLVED
    return OTHER


def mixed_neurons(weights: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Neurons with at least two features at |W_ij| ≥ threshold: [..., n, m] → [...].

    A lenient polysemantic count: it includes copies that still hold two features at about 1/√2, which the
    [0.8, 1.2] window of `pipeline.incidental.polysemantic_neurons` misses.
    """
    return ((weights.abs() >= threshold).sum(dim=-2) >= 2).sum(dim=-1)


def separated(weights: torch.Tensor, features: list[int], low: float = 0.8, high: float = 1.2) -> bool:
    """Every feature in `features` has its largest-|W| neuron carrying it at unit strength and nothing else,
    and no two of them share that neuron. weights: [n, m']."""
    homes = []
    for feature in features:
        home = int(weights[feature].abs().argmax())
        if copy_features(weights, home, low, high) != [feature]:
            return False
        homes.append(home)
    return len(set(homes)) == len(homes)


def outcome_counts(
    weights: torch.Tensor, split: Split, low: float = 0.8, high: float = 1.2
) -> dict[str, torch.Tensor]:
    """Per instance, the number of split neurons with each outcome: {outcome: [instance] int64}, plus
    SEPARATED (not exclusive with the outcomes) and "split" (the number of split neurons).
    weights: [instance, n, m'] after training on."""
    counts = {name: torch.zeros(split.valid.shape[0], dtype=torch.int64) for name in (*OUTCOMES, SEPARATED)}
    weights = weights.detach().cpu()
    for instance in range(split.valid.shape[0]):
        for rank in torch.nonzero(split.valid[instance], as_tuple=False).flatten().tolist():
            result = outcome(
                weights[instance],
                int(split.first[instance, rank]),
                int(split.second[instance, rank]),
                split.features[instance][rank],
                low,
                high,
            )
            counts[result][instance] += 1
            counts[SEPARATED][instance] += separated(
                weights[instance], split.features[instance][rank], low, high
            )
    counts["split"] = split.valid.sum(dim=-1)
    return counts
