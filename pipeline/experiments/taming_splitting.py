"""The splitting remedy on the taming MLP's last hidden layer (Lecomte et al., discussion; docs/science.md §1).

Lecomte et al. propose to split a polysemantic neuron into two copies and train on, hoping each copy takes
one of its features. In the taming MLP the last hidden layer h = act(W h' + b) (W: [hidden, d_in]) feeds the
output y = V h + c (V: [features, hidden]). Splitting neuron j:

    copy 1: row j of W and b (in place),  copy 2: a new row H + r (the r-th split) with the same row and bias
    V[:, j] and the new column V[:, H + r] both = V[:, j] / 2

leaves every output unchanged, since V[:, j]/2 · h_j + V[:, j]/2 · h_j = V[:, j] · h_j (halving is exact in
floating point; only the order of the sums changes, so outputs agree to rounding). Each copy's incoming row
is then perturbed by ε · ‖W[j]‖ · z with z ~ N(0, I), independent per copy, and the widened network is
fine-tuned with the loss it was trained with. Splitting doubles the copied row's share of an L1 (or L2)
penalty on W while halving V's column keeps its L1 share and halves its L2 share, so the regularized loss
is not exactly unchanged, only the function.

Which neurons: the polysemantic neurons of the last hidden layer by the project's ground-truth definition
(`pipeline.metrics.polysemantic_units` on |corr| attribution over all samples of the seed's data set, the
same data and thresholds `pipeline.evaluation` uses), so the "before" count is the logged
`neuron_polysemantic` of the seed run.

Fine-tuning (`fine_tune`): the original objective, full batch on the train split: MSE + the config's
regularization (L1 λΣ|W|, L2 as Adam's coupled decay or as λΣW², the elastic net as both penalties, none)
+ the config's noise (kind, σ) on the last hidden layer, the config's gradient clipping (a padded zero unit
adds nothing to a gradient's norm), Adam at the config's learning rate, starting from a fresh Adam state
(the checkpoint does not hold the original optimizer's moments, so the first steps move every parameter by
about lr whether it is split or not: the no-split baseline, fine-tuned the same way, absorbs that). All
networks of all arms train in one batched pass (leading model dimension, `pipeline.models`' hand-written
backward and `pipeline.train.BatchedAdam`), padded with zero units to the widest widened layer; a zero unit
has zero incoming row, bias, outgoing column and noise, so its gradients and Adam updates are exactly zero
and it stays zero. A network's result therefore does not depend on what shares its pass (up to float rounding).

Random numbers are shared where the comparison is paired: the copy perturbations z come from a stream per
seed, drawn for every neuron whether split or not, so every ε perturbs along the same directions; the
fine-tuning noise comes from a stream per (seed, noise kind), drawn for the H original units plus H
would-be second copies, so the baseline and every split arm see the same noise on their original units and
configurations sharing a seed and noise kind share it (common random numbers, as in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import metrics
from pipeline.config import AblationConfig
from pipeline.data import Dataset, make_dataset
from pipeline.models import ACTIVATION_FUNCTIONS, MLP, mlp_backward, mlp_forward_features, runs_of
from pipeline.train import (
    DIVERGENCE_FACTOR,
    DIVERGENCE_FLOOR,
    BatchedAdam,
    clip_gradient_norms_,
    fill_unit_noise,
    regularization_strengths,
)

# Seed-sequence stream ids of this study, beside pipeline.data.STREAMS (0–6): SeedSequence([seed, stream])
# and SeedSequence([seed, stream, kind]) never coincide with the training streams' [seed, stream] entropy.
COPY_NOISE_STREAM = 101
FINE_TUNE_NOISE_STREAM = 102
FINE_TUNE_NOISE_KINDS = ("bipolar", "positive_kurtosis", "gaussian")
# Fine-tuning noise is drawn this many epochs at a time per (seed, kind) stream.
NOISE_CHUNK_EPOCHS = 10
SUPPORTED_REGULARIZATIONS = ("none", "l1", "l2", "elastic")

# What became of an originally polysemantic neuron (its copies, or itself without splitting):
RESOLVED = "resolved"  # no copy polysemantic and at least one copy responsive (each live copy monosemantic)
STILL_POLYSEMANTIC = "still_polysemantic"  # some copy still polysemantic
SILENCED = "silenced"  # every copy silent (max |corr| below the responsiveness floor)

# Per-network quantities, in the order they are recorded (`SplitRecord.values`).
RECORD_FIELDS: tuple[str, ...] = (
    "split_neurons",
    "width_before",
    "width_after",
    "polysemantic_before",
    "polysemantic_fraction_before",
    "responsive_before",
    "participation_ratio_before",
    "train_mse_before",
    "val_mse_before",
    "max_output_change_at_split",
    "val_mse_at_split",
    "polysemantic_after",
    "polysemantic_fraction_after",
    "responsive_after",
    "participation_ratio_after",
    "train_mse_after",
    "val_mse_after",
    "resolved",
    "resolved_fraction",
    "separated",
    "still_polysemantic",
    "silenced",
    "new_polysemantic",
)


@dataclass(frozen=True)
class SplitSettings:
    """Thresholds of the polysemanticity definition (the defaults of `pipeline.metrics.polysemantic_units`,
    the ones every logged `neuron_polysemantic` uses)."""

    relative_threshold: float = 0.25
    min_attribution: float = 0.1


@dataclass(frozen=True)
class Arm:
    """One arm of the study: split with noise scale `epsilon`, or the no-split baseline (epsilon None)."""

    epsilon: float | None

    @property
    def split(self) -> bool:
        return self.epsilon is not None

    @property
    def label(self) -> str:
        return "baseline" if self.epsilon is None else f"ε={self.epsilon:g}"


BASELINE = Arm(None)


@dataclass
class Network:
    """One MLP as plain tensors whose last hidden layer may be wider than the others.

    weights[l]: [d_out, d_in] (nn.Linear layout), biases[l]: [d_out]; weights[-2] is the last hidden
    layer's incoming matrix W and weights[-1] the output matrix V. `copies[j]` lists the units of the last
    hidden layer that descend from original neuron j (j itself first; H + r for the r-th split neuron).
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str
    copies: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def from_mlp(cls, module: MLP) -> Network:
        weights = [layer.weight.detach().clone() for layer in module.layers]
        biases = [layer.bias.detach().clone() for layer in module.layers]
        hidden = weights[-2].shape[0]
        return cls(weights, biases, module.activation, {j: [j] for j in range(hidden)})

    @property
    def width(self) -> int:
        """Units of the last hidden layer."""
        return self.weights[-2].shape[0]

    @torch.no_grad()
    def forward_with_hidden(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs `[sample, feature]`, last hidden activation `[sample, width]`), clean (no noise); the
        same operations as `pipeline.models.MLP.forward_with_hidden`."""
        hidden = inputs
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            hidden = ACTIVATION_FUNCTIONS[self.activation](torch.nn.functional.linear(hidden, weight, bias))
        return torch.nn.functional.linear(hidden, self.weights[-1], self.biases[-1]), hidden


def copy_directions(seed: int, hidden: int, fan_in: int) -> torch.Tensor:
    """Standard normal perturbation directions `[2, hidden, fan_in]`: entry [c, j] perturbs copy c of neuron
    j. From the seed's own stream and drawn for every neuron, so they do not depend on ε, on the
    configuration or on which neurons are split (common random numbers across arms)."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, COPY_NOISE_STREAM])))
    return torch.from_numpy(generator.standard_normal((2, hidden, fan_in), dtype=np.float32))


@torch.no_grad()
def split_network(
    network: Network, neurons: Sequence[int], epsilon: float, directions: torch.Tensor
) -> Network:
    """`network` with each of `neurons` (original indices of its last hidden layer) split in two.

    The first copy stays in row j, the second is appended (row H + r for the r-th split); both outgoing
    columns are V[:, j]/2. Each copy's incoming row then gets ε·‖W[j]‖·directions[c, j] added (c = 0 the
    first copy, 1 the second); biases are not perturbed. With ε = 0 the outputs equal the original's to
    rounding. `directions`: [2, H, d_in] (`copy_directions`).
    """
    incoming, bias, outgoing = network.weights[-2], network.biases[-2], network.weights[-1]
    hidden = incoming.shape[0]
    neurons = [int(j) for j in neurons]
    if len(set(neurons)) != len(neurons) or any(not 0 <= j < hidden for j in neurons):
        raise ValueError(f"neurons must be distinct indices below {hidden}; got {neurons}")
    if any(len(network.copies.get(j, [j])) != 1 for j in neurons):
        raise ValueError("a neuron can be split only once")
    index = torch.tensor(neurons, dtype=torch.long)
    halved = outgoing.clone()
    halved[:, index] = outgoing[:, index] / 2
    new_incoming = torch.cat([incoming, incoming[index]])
    new_bias = torch.cat([bias, bias[index]])
    new_outgoing = torch.cat([halved, halved[:, index]], dim=1)
    if epsilon and neurons:
        scale = epsilon * incoming[index].norm(dim=1, keepdim=True)  # [split, 1]
        new_incoming[index] += scale * directions[0, index]
        new_incoming[hidden:] += scale * directions[1, index]
    copies = {j: list(units) for j, units in network.copies.items()}
    for position, j in enumerate(neurons):
        copies[j] = [j, hidden + position]
    return Network(
        [*network.weights[:-2], new_incoming, new_outgoing],
        [*network.biases[:-2], new_bias, network.biases[-1].clone()],
        network.activation,
        copies,
    )


# ---------------------------------------------------------------------------------------------------------
# Measuring a network


@dataclass
class Reading:
    """The last hidden layer of one network on its data set: per-unit flags and the summary numbers.

    polysemantic, responsive: BoolTensor [width]; dominant_group: [width] (group of the unit's strongest
    feature); summary: `pipeline.metrics.polysemanticity_summary(..., "neuron")`; train_mse, val_mse: task
    loss on the splits (clean forward).
    """

    polysemantic: torch.Tensor
    responsive: torch.Tensor
    dominant_group: torch.Tensor
    summary: dict[str, float]
    train_mse: float
    val_mse: float
    outputs: torch.Tensor  # [sample, feature], all samples (train then validation)


@torch.no_grad()
def read_network(network: Network, dataset: Dataset, settings: SplitSettings = SplitSettings()) -> Reading:
    """Measure `network` on `dataset` exactly as `pipeline.evaluation.evaluate_seed` measures a seed:
    |corr| attribution of the raw last hidden activations to the input features over all samples."""
    inputs = dataset.inputs
    outputs, hidden = network.forward_with_hidden(inputs)
    attribution = metrics.attribution_matrix(hidden, inputs)
    polysemantic = metrics.polysemantic_units(
        attribution, dataset.groups, settings.relative_threshold, settings.min_attribution
    )
    responsive = metrics.responsive_units(attribution, settings.min_attribution)
    summary = metrics.polysemanticity_summary(
        hidden,
        inputs,
        dataset.groups,
        "neuron",
        relative_threshold=settings.relative_threshold,
        min_attribution=settings.min_attribution,
    )
    group_of = torch.full((inputs.shape[1],), -1, dtype=torch.long)
    for index, group in enumerate(dataset.groups):
        group_of[list(group)] = index
    split = dataset.train_inputs.shape[0]
    return Reading(
        polysemantic=polysemantic,
        responsive=responsive,
        dominant_group=group_of[attribution.argmax(dim=1)],
        summary=summary,
        train_mse=float(((outputs[:split] - dataset.train_targets) ** 2).mean()),
        val_mse=float(((outputs[split:] - dataset.validation_targets) ** 2).mean()),
        outputs=outputs,
    )


def outcomes(network: Network, reading: Reading, originally_polysemantic: Sequence[int]) -> dict[str, int]:
    """Counts of RESOLVED, STILL_POLYSEMANTIC and SILENCED over the originally polysemantic neurons, plus
    `separated` (a subset of resolved: both copies monosemantic, on different feature groups) and
    `new_polysemantic` (polysemantic units descending from a neuron that was not polysemantic)."""
    counts = {RESOLVED: 0, STILL_POLYSEMANTIC: 0, SILENCED: 0, "separated": 0}
    for j in originally_polysemantic:
        units = network.copies[j]
        if any(bool(reading.polysemantic[u]) for u in units):
            counts[STILL_POLYSEMANTIC] += 1
        elif any(bool(reading.responsive[u]) for u in units):
            counts[RESOLVED] += 1
            live = [u for u in units if bool(reading.responsive[u])]
            if len(live) == 2 and int(reading.dominant_group[live[0]]) != int(
                reading.dominant_group[live[1]]
            ):
                counts["separated"] += 1
        else:
            counts[SILENCED] += 1
    others = [
        u for j, units in network.copies.items() if j not in set(originally_polysemantic) for u in units
    ]
    counts["new_polysemantic"] = sum(bool(reading.polysemantic[u]) for u in others)
    return counts


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning, batched over networks


@dataclass
class FineTuneItem:
    """One network to fine-tune with `config`'s objective; `seed` picks its noise stream."""

    network: Network
    config: AblationConfig
    seed: int


def check_fine_tunable(config: AblationConfig) -> None:
    """Raise ValueError (one sentence) for an objective `fine_tune` does not reproduce."""
    network = config.network
    if network.reg not in SUPPORTED_REGULARIZATIONS:
        raise ValueError(
            f"fine-tuning reproduces network.reg {', '.join(SUPPORTED_REGULARIZATIONS)}; got {network.reg!r}"
        )
    if network.noise != "none" and network.noise not in FINE_TUNE_NOISE_KINDS:
        raise ValueError(f"fine-tuning has no noise stream for network.noise {network.noise!r}")


class _FineTuneNoise:
    """Noise `[model, width, sample]` per epoch: per (seed, kind) stream, unit noise for 2H rows (H original
    units, H would-be second copies) scaled by each model's σ; row 2H is zeros for padding units."""

    def __init__(self, items: Sequence[FineTuneItem], widths: int, samples: int, hidden: int) -> None:
        keys = [(item.seed, item.config.network.noise) for item in items]
        self.streams = {
            key: np.random.Generator(
                np.random.PCG64(
                    np.random.SeedSequence(
                        [key[0], FINE_TUNE_NOISE_STREAM, FINE_TUNE_NOISE_KINDS.index(key[1])]
                    )
                )
            )
            for key in dict.fromkeys(keys)
            if key[1] != "none"
        }
        self.order = list(self.streams)
        self.hidden, self.samples = hidden, samples
        rows = 2 * hidden + 1
        position = {key: index for index, key in enumerate(self.order)}
        # Each model's unit u reads row index[u] of its stream: u itself for original units, H + j for the
        # second copy of neuron j, the zero row for padding (and for every unit of a noiseless model).
        index = torch.full((len(items), widths), 2 * hidden, dtype=torch.long)
        sigmas = []
        for model, (item, key) in enumerate(zip(items, keys, strict=True)):
            stream = position.get(key, 0)
            for j, units in item.network.copies.items():
                for copy, unit in enumerate(units):
                    index[model, unit] = stream * rows + (j if copy == 0 else hidden + j)
            sigmas.append(item.config.network.sigma if key[1] != "none" else 0.0)
        self.index = index.reshape(-1)
        self.sigma = torch.tensor(sigmas, dtype=torch.float32).reshape(-1, 1, 1)
        self.models, self.widths = len(items), widths
        self.chunk: torch.Tensor | None = None

    def for_epoch(self, epoch: int, epochs: int) -> torch.Tensor | None:
        if not self.order:
            return None
        position = epoch % NOISE_CHUNK_EPOCHS
        if position == 0:
            count = min(NOISE_CHUNK_EPOCHS, epochs - epoch)
            chunk = torch.zeros(count, len(self.order), 2 * self.hidden + 1, self.samples)
            for stream, key in enumerate(self.order):
                for offset in range(count):
                    fill_unit_noise(key[1], chunk[offset, stream, : 2 * self.hidden], self.streams[key])
            self.chunk = chunk
        flat = self.chunk[position].reshape(-1, self.samples)
        noise = flat.index_select(0, self.index).reshape(self.models, self.widths, self.samples)
        return noise.mul_(self.sigma)


def _pass_shape(item: FineTuneItem, samples: int) -> tuple:
    """What items sharing a pass must share: every layer's shape but the split one's width, the number
    of original units of the split layer, and the number of training samples."""
    network = item.network
    return (
        tuple(tuple(weight.shape) for weight in network.weights[:-2]),
        network.weights[-2].shape[1],
        network.weights[-1].shape[0],
        len(network.copies),
        samples,
    )


Checkpoint = Callable[[int, dict[int, Network | str]], None]


@torch.no_grad()
def fine_tune(
    items: Sequence[FineTuneItem],
    datasets: Sequence[Dataset],
    checkpoints: Sequence[int],
    on_checkpoint: Checkpoint,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fine-tune every item on its data set's train split for max(checkpoints) epochs in batched passes.

    Items are grouped into passes by shape (depth, widths except the split layer, sample count). When a
    pass reaches an epoch count in `checkpoints` it calls on_checkpoint(epochs, results) with
    results[i] for each item i of that pass: the item's network at that point (a `Network`, copies as the
    item's), or a one-sentence reason when its loss stopped being finite or diverged (above
    DIVERGENCE_FACTOR × its first loss and DIVERGENCE_FLOOR). A caller can so record the shorter lengths
    while the pass trains on.
    """
    for item in items:
        check_fine_tunable(item.config)
    checkpoints = sorted(set(int(epoch) for epoch in checkpoints))
    if not checkpoints or checkpoints[0] < 1:
        raise ValueError("checkpoints must be positive epoch counts")
    groups: dict[tuple, list[int]] = {}
    for index, (item, dataset) in enumerate(zip(items, datasets, strict=True)):
        groups.setdefault(_pass_shape(item, dataset.train_inputs.shape[0]), []).append(index)
    for members in groups.values():
        order = sorted(members, key=lambda index: items[index].config.network.act)
        for epoch, results in _fine_tune_pass(
            [items[i] for i in order], [datasets[i] for i in order], checkpoints, progress
        ):
            on_checkpoint(epoch, dict(zip(order, results, strict=True)))


def _fine_tune_pass(items, datasets, checkpoints, progress):
    """One batched pass; yields (epoch, results) at each checkpoint."""
    models = len(items)
    widths = max(item.network.width for item in items)
    fan_in = items[0].network.weights[-2].shape[1]  # of the split layer
    hidden = len(items[0].network.copies)  # original units of the split layer (the pass key includes it)
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    layers = len(items[0].network.weights)
    for layer in range(layers):
        if layer == layers - 2:
            weight = torch.zeros(models, widths, fan_in)
            bias = torch.zeros(models, widths)
        elif layer == layers - 1:
            weight = torch.zeros(models, items[0].network.weights[-1].shape[0], widths)
            bias = torch.zeros(models, items[0].network.biases[-1].shape[0])
        else:
            weight = torch.zeros(models, *items[0].network.weights[layer].shape)
            bias = torch.zeros(models, *items[0].network.biases[layer].shape)
        for model, item in enumerate(items):
            source_weight, source_bias = item.network.weights[layer], item.network.biases[layer]
            weight[model, : source_weight.shape[0], : source_weight.shape[1]] = source_weight
            bias[model, : source_bias.shape[0]] = source_bias
        weights.append(weight)
        biases.append(bias)
    configs = [item.config for item in items]
    activation = runs_of([config.network.act for config in configs])

    def per_model(values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float32)

    l1, l2_penalty, decay = (per_model(strengths) for strengths in regularization_strengths(configs))
    clip = per_model(c.network.grad_clip for c in configs)
    use_clip = bool(clip.any())
    optimizer = BatchedAdam(
        [*weights, *biases],
        lr=per_model(c.network.lr for c in configs),
        coupled_decay=decay if bool(decay.any()) else None,
    )

    def features_major(tensors) -> torch.Tensor:
        return torch.stack(list(tensors)).transpose(1, 2).contiguous()

    train_inputs = features_major(d.train_inputs for d in datasets)
    train_targets = features_major(d.train_targets for d in datasets)
    samples = train_inputs.shape[2]
    noise = _FineTuneNoise(items, widths, samples, hidden)
    output_scale = 2.0 / (train_targets.shape[1] * samples)
    epochs = checkpoints[-1]
    failures: list[str | None] = [None] * models
    bound: torch.Tensor | None = None
    first: torch.Tensor | None = None
    alive = torch.ones(models, dtype=torch.bool)
    for epoch in range(epochs):
        outputs, trace = mlp_forward_features(
            train_inputs, weights, biases, activation, noise.for_epoch(epoch, epochs)
        )
        residual = outputs - train_targets
        losses = residual.square().mean(dim=(1, 2))
        for weight in weights:
            losses = losses + l1 * weight.abs().sum(dim=(1, 2)) + l2_penalty * weight.square().sum(dim=(1, 2))
        if bound is None:
            first = losses.clone()
            bound = (losses * DIVERGENCE_FACTOR).clamp(min=DIVERGENCE_FLOOR)
        bad = (~torch.isfinite(losses) | (losses > bound)) & alive
        for model in torch.nonzero(bad).flatten().tolist():
            failures[model] = (
                f"fine-tuning loss became {losses[model].item():.3g} at epoch {epoch} (first epoch "
                f"{first[model].item():.3g})"
            )
        if bool(bad.any()):
            alive = alive & ~bad
            for parameter in [*weights, *biases]:
                parameter.masked_fill_(~alive.reshape(-1, *([1] * (parameter.dim() - 1))), 0.0)
        weight_gradients, bias_gradients = mlp_backward(
            residual.mul_(output_scale), weights, trace, activation
        )
        for weight, gradient in zip(weights, weight_gradients, strict=True):
            gradient.add_(l1.reshape(-1, 1, 1) * weight.sign())
            gradient.add_(2 * l2_penalty.reshape(-1, 1, 1) * weight)
        if use_clip:
            clip_gradient_norms_([*weight_gradients, *bias_gradients], clip)
        optimizer.step(None if bool(alive.all()) else alive, [*weight_gradients, *bias_gradients])
        if progress is not None:
            progress(models)
        if epoch + 1 in checkpoints:
            yield (
                epoch + 1,
                [
                    _unpadded(item, weights, biases, model) if failures[model] is None else failures[model]
                    for model, item in enumerate(items)
                ],
            )


def _unpadded(item: FineTuneItem, weights, biases, model: int) -> Network | str:
    width = item.network.width
    layers = len(weights)
    unpadded_weights, unpadded_biases = [], []
    for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        if layer == layers - 2:
            unpadded_weights.append(weight[model, :width].clone())
            unpadded_biases.append(bias[model, :width].clone())
        elif layer == layers - 1:
            unpadded_weights.append(weight[model, :, :width].clone())
            unpadded_biases.append(bias[model].clone())
        else:
            unpadded_weights.append(weight[model].clone())
            unpadded_biases.append(bias[model].clone())
    if not all(bool(torch.isfinite(t).all()) for t in unpadded_weights + unpadded_biases):
        return "fine-tuning produced non-finite parameters"
    return Network(unpadded_weights, unpadded_biases, item.network.activation, item.network.copies)


# ---------------------------------------------------------------------------------------------------------
# The study: every network × arm × fine-tuning length


@dataclass
class SourceNetwork:
    """A stored network to split: `key` identifies it to the caller (e.g. its seed run id)."""

    key: Hashable
    config: AblationConfig
    seed: int
    network: MLP


@dataclass
class SplitRecord:
    """One network under one arm after `epochs` fine-tuning epochs: `values` keyed by RECORD_FIELDS, or
    `failure` (one sentence) when its fine-tuning diverged."""

    key: Hashable
    arm: Arm
    epochs: int
    values: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


def _before(source: SourceNetwork, dataset: Dataset, settings: SplitSettings):
    network = Network.from_mlp(source.network)
    reading = read_network(network, dataset, settings)
    neurons = torch.nonzero(reading.polysemantic).flatten().tolist()
    return network, reading, neurons


def run_split_study(
    sources: Sequence[SourceNetwork],
    wanted: dict[Arm, Sequence[int]],
    on_records: Callable[[Arm, int, list[SplitRecord]], None],
    settings: SplitSettings = SplitSettings(),
    progress: Callable[[int], None] | None = None,
) -> None:
    """Split (or not) every source network under every arm of `wanted` (arm → fine-tuning epoch counts),
    fine-tune all of them in one batched run to the largest epoch count, and hand each (arm, epochs)
    its records as soon as a pass reaches that point (`on_records`; one call per arm and pass, the
    records in source order).

    Arms of `wanted` are fine-tuned together, so an arm that needs only the shorter lengths still trains to
    the longest (its records at the lengths it wants are the same either way: a run to E epochs is the prefix
    of a longer one).
    """
    for source in sources:
        check_fine_tunable(source.config)
    arms = [arm for arm, epochs in wanted.items() if epochs]
    if not arms:
        return
    datasets: dict[tuple[str, int], Dataset] = {}
    starting: list[tuple[Network, Reading, list[int], Dataset]] = []
    for source in sources:
        data_key = (repr(source.config.data), source.seed)
        if data_key not in datasets:
            datasets[data_key] = make_dataset(source.config.data, source.seed)
        dataset = datasets[data_key]
        starting.append((*_before(source, dataset, settings), dataset))
    items, item_datasets, item_context = [], [], []
    for arm in arms:
        for source, (network, reading, neurons, dataset) in zip(sources, starting, strict=True):
            if arm.split:
                directions = copy_directions(source.seed, network.width, network.weights[-2].shape[1])
                start = split_network(network, neurons, arm.epsilon, directions)
            else:
                start = network
            outputs_at_split, _ = start.forward_with_hidden(dataset.inputs)
            split_at = dataset.train_inputs.shape[0]
            at_split = {
                "max_output_change_at_split": float((outputs_at_split - reading.outputs).abs().max()),
                "val_mse_at_split": float(
                    ((outputs_at_split[split_at:] - dataset.validation_targets) ** 2).mean()
                ),
            }
            items.append(FineTuneItem(start, source.config, source.seed))
            item_datasets.append(dataset)
            item_context.append((arm, source, reading, neurons, at_split))
    wanted_sets = {arm: set(int(e) for e in epochs) for arm, epochs in wanted.items()}

    def deliver(epochs: int, results: dict[int, Network | str]) -> None:
        by_arm: dict[Arm, list[SplitRecord]] = {}
        for index, result in sorted(results.items()):
            arm, source, before, neurons, at_split = item_context[index]
            if epochs not in wanted_sets[arm]:
                continue
            record = SplitRecord(source.key, arm, epochs)
            if isinstance(result, str):
                record.failure = result
            else:
                record.values = _record_values(
                    result, item_datasets[index], before, neurons, at_split, settings
                )
            by_arm.setdefault(arm, []).append(record)
        for arm, records in by_arm.items():
            on_records(arm, epochs, records)

    checkpoints = sorted({int(e) for epochs in wanted.values() for e in epochs})
    fine_tune(items, item_datasets, checkpoints, deliver, progress)


def _record_values(
    network: Network,
    dataset: Dataset,
    before: Reading,
    neurons: list[int],
    at_split: dict[str, float],
    settings: SplitSettings,
) -> dict[str, float]:
    after = read_network(network, dataset, settings)
    counts = outcomes(network, after, neurons)
    split_neurons = sum(len(units) - 1 for units in network.copies.values())
    values = {
        "split_neurons": float(split_neurons),
        "width_before": float(before.polysemantic.shape[0]),
        "width_after": float(network.width),
        "polysemantic_before": before.summary["neuron_polysemantic"],
        "polysemantic_fraction_before": before.summary["neuron_polysemantic_fraction"],
        "responsive_before": float(before.responsive.sum()),
        "participation_ratio_before": before.summary["neuron_participation_ratio"],
        "train_mse_before": before.train_mse,
        "val_mse_before": before.val_mse,
        **at_split,
        "polysemantic_after": after.summary["neuron_polysemantic"],
        "polysemantic_fraction_after": after.summary["neuron_polysemantic_fraction"],
        "responsive_after": float(after.responsive.sum()),
        "participation_ratio_after": after.summary["neuron_participation_ratio"],
        "train_mse_after": after.train_mse,
        "val_mse_after": after.val_mse,
        "resolved": float(counts[RESOLVED]),
        "resolved_fraction": counts[RESOLVED] / len(neurons) if neurons else math.nan,
        "separated": float(counts["separated"]),
        "still_polysemantic": float(counts[STILL_POLYSEMANTIC]),
        "silenced": float(counts[SILENCED]),
        "new_polysemantic": float(counts["new_polysemantic"]),
    }
    return {name: values[name] for name in RECORD_FIELDS}
