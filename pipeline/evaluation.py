"""Per-seed evaluation and checkpoints of the taming study.

Metrics are always computed from the exported modules (`MLP`, `SparseAutoencoder`) and the seed's
regenerated data, never from the batched training tensors, so a checkpoint loaded later reproduces the
logged metrics exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline import metrics
from pipeline.config import AblationConfig
from pipeline.config_tools import ConfigError
from pipeline.data import Dataset, make_dataset
from pipeline.models import MLP, layer_dims
from pipeline.sae import SparseAutoencoder, architecture

METRIC_NAMES: tuple[str, ...] = ("train_mse", "val_mse", *metrics.TAMING_METRIC_NAMES)


@torch.no_grad()
def evaluate_seed(
    config: AblationConfig, network: MLP, sae: SparseAutoencoder, dataset: Dataset
) -> dict[str, float]:
    """Every metric of docs/science.md §1.4 for one trained seed.

    The network's train/val MSE are on its splits (clean forward, no noise). SAE and polysemanticity
    metrics are over all samples (train then validation), standardized with the SAE's train-split
    statistics; the question is how the SAE decomposes the network's representation of the data set.
    """
    train_outputs = network(dataset.train_inputs)
    validation_outputs = network(dataset.validation_inputs)
    inputs = dataset.inputs
    _, hidden = network.forward_with_hidden(inputs)
    standardized = sae.standardize(hidden)
    latents = sae.encode(standardized)
    reconstruction = sae.decode(latents)
    values = {
        "train_mse": float(((train_outputs - dataset.train_targets) ** 2).mean()),
        "val_mse": float(((validation_outputs - dataset.validation_targets) ** 2).mean()),
        **metrics.taming_metrics(
            decoder=sae.decoder_directions,
            latents=latents,
            reconstruction=reconstruction,
            standardized_hidden=standardized,
            hidden=hidden,
            features=inputs,
            groups=dataset.groups,
            importances=dataset.importances,
            network_weights=network.weight_matrices(),
            null_draws=config.metric_null_draws,
        ),
    }
    return {name: values[name] for name in METRIC_NAMES}


CHECKPOINT_FORMAT = "polysemanticity-lab/taming-seed/1"


class CheckpointError(RuntimeError):
    """A stored checkpoint that cannot be trusted or read, told in one sentence.

    Not an input error: the command was well formed, but what is stored for the run fails verification, the
    same outcome as metrics that do not reproduce (the CLI exits 1 for both, and 2 only for bad usage).
    """


def checkpoint(config: AblationConfig, seed: int, network: MLP, sae: SparseAutoencoder) -> dict[str, Any]:
    """A dict of plain types and tensors, loadable with `torch.load(path, weights_only=True)`."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "seed": seed,
        "network": {name: value.detach().clone() for name, value in network.state_dict().items()},
        "sae": {name: value.detach().clone() for name, value in sae.state_dict().items()},
    }


def _expected_shapes(config: AblationConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The tensor shapes `checkpoint(...)` stores for `config`: (network state, SAE state)."""
    dims = layer_dims(config.data.features, config.network.hidden_dim, config.network.hidden_layers)
    network: dict[str, tuple[int, ...]] = {}
    for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        network[f"layers.{index}.weight"] = (d_out, d_in)
        network[f"layers.{index}.bias"] = (d_out,)
    hidden = config.network.hidden_dim
    # The architecture's own initializer says which parameters it has and their shapes; it allocates only
    # the config's (already verified) SAE sizes, a few hundred floats for the study's.
    initial = architecture(config.sae.architecture).initial_parameters(
        hidden, config.sae.d_sae, config.sae, torch.Generator().manual_seed(0)
    )
    sae = {"mean": (hidden,), "std": (hidden,)}
    sae.update({f"weights.{name}": tuple(value.shape) for name, value in initial.items()})
    return network, sae


def _check_state(part: str, state: Any, expected: dict[str, tuple[int, ...]]) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"the checkpoint's {part} state is a {type(state).__name__}, not a mapping")
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        raise CheckpointError(
            f"the checkpoint's {part} state does not match its config (missing {missing or 'none'}, "
            f"unexpected {extra or 'none'})"
        )
    for name, shape in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"the checkpoint's {part} entry {name!r} is not a floating-point tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"the checkpoint's {part} entry {name!r} has shape {tuple(value.shape)} but its config "
                f"implies {shape}"
            )


def check_checkpoint(saved: Any, expected_hash: str | None = None) -> AblationConfig:
    """The checkpoint's config, once the dict is known to be safe to rebuild modules and data from.

    Checks, in an order that never allocates more than the config describes: the format marker, the config
    (valid, and hashing to `expected_hash` when given, e.g. the run's `config_hash` tag), the seed, then
    every tensor's name, dtype kind and shape against the shapes the config implies. A checkpoint edited to
    claim larger sizes than its run was trained with fails the hash check before anything is sized from it.
    Raises CheckpointError with one sentence.
    """
    if not isinstance(saved, Mapping) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointError(f"the file is not a taming seed checkpoint (format {found!r})")
    try:
        config = AblationConfig.from_dict(saved["config"])
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint's config is invalid: {error}") from None
    if expected_hash is not None and config.hash() != expected_hash:
        raise CheckpointError(
            f"the checkpoint's config hashes to {config.hash()} but the run was recorded with config_hash "
            f"{expected_hash}, so the file was edited or belongs to another run"
        )
    seed = saved.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CheckpointError(f"the checkpoint's seed is {seed!r}, not a non-negative integer")
    network_shapes, sae_shapes = _expected_shapes(config)
    _check_state("network", saved.get("network"), network_shapes)
    _check_state("SAE", saved.get("sae"), sae_shapes)
    return config


def load_checkpoint(saved: dict[str, Any]) -> tuple[AblationConfig, int, MLP, SparseAutoencoder]:
    """Rebuild (config, seed, network, sae) from `checkpoint(...)`'s dict.

    The dict is checked first (`check_checkpoint`), so a malformed one raises CheckpointError in one sentence
    instead of failing inside a module constructor.
    """
    config = check_checkpoint(saved)
    network = MLP(
        config.data.features, config.network.hidden_dim, config.network.hidden_layers, config.network.act
    )
    network.load_state_dict(saved["network"])
    sae_state = saved["sae"]
    parameters = {
        name.removeprefix("weights."): value
        for name, value in sae_state.items()
        if name.startswith("weights.")
    }
    sae = SparseAutoencoder(config.sae, parameters, sae_state["mean"], sae_state["std"])
    sae.load_state_dict(sae_state)
    return config, int(saved["seed"]), network, sae


def reevaluate(saved: dict[str, Any]) -> dict[str, float]:
    """Recompute a checkpoint's metrics from scratch (data regenerated from its config and seed)."""
    config, seed, network, sae = load_checkpoint(saved)
    return evaluate_seed(config, network, sae, make_dataset(config.data, seed))
