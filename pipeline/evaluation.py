"""Per-seed evaluation and checkpoints of the taming study.

Metrics are always computed from the exported modules (`MLP`, `SparseAutoencoder`) and the seed's
regenerated data, never from the batched training tensors, so a checkpoint loaded later reproduces the
logged metrics exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline import metrics
from pipeline.config import AblationConfig
from pipeline.data import Dataset, make_dataset
from pipeline.models import MLP
from pipeline.sae import SparseAutoencoder

METRIC_NAMES: tuple[str, ...] = ("train_mse", "val_mse", *metrics.TAMING_METRIC_NAMES)


@torch.no_grad()
def evaluate_seed(
    config: AblationConfig, network: MLP, sae: SparseAutoencoder, dataset: Dataset
) -> dict[str, float]:
    """Every metric of SCIENCE.md §1.4 for one trained seed.

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


def checkpoint(config: AblationConfig, seed: int, network: MLP, sae: SparseAutoencoder) -> dict[str, Any]:
    """A dict of plain types and tensors, loadable with `torch.load(path, weights_only=True)`."""
    return {
        "format": "polysemanticity-lab/taming-seed/1",
        "config": config.to_dict(),
        "seed": seed,
        "network": {name: value.detach().clone() for name, value in network.state_dict().items()},
        "sae": {name: value.detach().clone() for name, value in sae.state_dict().items()},
    }


def load_checkpoint(saved: dict[str, Any]) -> tuple[AblationConfig, int, MLP, SparseAutoencoder]:
    """Rebuild (config, seed, network, sae) from `checkpoint(...)`'s dict."""
    config = AblationConfig.from_dict(saved["config"])
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
