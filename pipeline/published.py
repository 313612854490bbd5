"""From the published code's numbers to ours, one fix at a time (docs/science.md §1.3 defects 1 and 2, §1.4b).

The published code's SAE had two defects: its encoder was a view of the decoder's transpose (accidentally
tied, both Adam updates landing in one weight), and it trained on raw activations while its metrics were
taken on standardized ones. `published_ladder` trains four SAEs on the *same* trained networks, one per
combination of the two defects, and evaluates each with every metric of the study, so the effect of each
fix on the published metric forms can be read off directly instead of argued about.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
import torch

from pipeline.config import AblationConfig
from pipeline.data import make_dataset
from pipeline.evaluation import evaluate_seed
from pipeline.models import MLP
from pipeline.sae import SparseAutoencoder
from pipeline.tables import mean_plus_minus
from pipeline.train import train_saes_on_hidden

# (rung, SAE architecture, training inputs), in the order of the ladder: the published code first, ours last.
LADDER_RUNGS: tuple[tuple[str, str, str], ...] = (
    ("published code: tied, raw", "published_tied", "raw"),
    ("untied, raw", "leaky_relu", "raw"),
    ("tied, standardized", "published_tied", "standardized"),
    ("ours: untied, standardized", "leaky_relu", "standardized"),
)
LADDER_METRICS = (
    "macs_published_form",
    "interference_seed",
    "macs",
    "interference",
    "l0_sparsity",
    "sae_fvu",
)


def published_ladder(
    networks: Sequence[tuple[AblationConfig, int, MLP]], device: str = "cpu"
) -> pd.DataFrame:
    """Per-seed metrics of the four ladder SAEs trained on each given network.

    ``networks``: (config, seed, trained network) triples that share the data and SAE settings (e.g. the
    seed runs of one configuration, loaded from their checkpoints). Each rung trains one SAE per network,
    all networks in one batched pass, from the seed's own SAE initialization, with the config's SAE
    settings except the architecture and the training inputs. Returns one row per (rung, seed):
    ``rung, architecture, train_on, seed`` and every metric of ``pipeline.evaluation.METRIC_NAMES``.
    """
    if not networks:
        raise ValueError("published_ladder needs at least one trained network")
    configs = [config for config, _, _ in networks]
    first = configs[0]
    if any(config.data != first.data or config.sae != first.sae for config in configs):
        raise ValueError("published_ladder: the networks must share data and SAE settings")
    seeds = [seed for _, seed, _ in networks]
    datasets = [make_dataset(config.data, seed) for config, seed in zip(configs, seeds, strict=True)]
    with torch.no_grad():
        hidden = torch.stack(
            [
                network.forward_with_hidden(dataset.train_inputs)[1]
                for (_, _, network), dataset in zip(networks, datasets, strict=True)
            ]
        )  # [model, sample, hidden]
    rows = []
    for rung, architecture, train_on in LADDER_RUNGS:
        sae_config = dataclasses.replace(first.sae, architecture=architecture, train_on=train_on)
        rung_configs = [dataclasses.replace(config, sae=sae_config) for config in configs]
        _, parameters, (means, stds) = train_saes_on_hidden(rung_configs, seeds, hidden, device=device)
        for index, (_, seed, network) in enumerate(networks):
            sae = SparseAutoencoder(
                sae_config,
                {name: value[index].cpu() for name, value in parameters.items()},
                means[index].cpu(),
                stds[index].cpu(),
            )
            metrics = evaluate_seed(rung_configs[index], network, sae, datasets[index])
            rows.append(
                {"rung": rung, "architecture": architecture, "train_on": train_on, "seed": seed, **metrics}
            )
    return pd.DataFrame(rows)


def ladder_summary(per_seed: pd.DataFrame, metrics: Sequence[str] = LADDER_METRICS) -> pd.DataFrame:
    """Mean ± std over seeds per rung, and each rung's change from the published code's rung (paired on seed)."""
    rows = []
    published = per_seed[per_seed["rung"] == LADDER_RUNGS[0][0]].set_index("seed")
    for rung, _, _ in LADDER_RUNGS:
        group = per_seed[per_seed["rung"] == rung].set_index("seed")
        if group.empty:
            continue
        row: dict[str, object] = {"rung": rung, "seeds": len(group)}
        for metric in metrics:
            row[metric] = mean_plus_minus(group[metric].mean(), group[metric].std())
        for metric in metrics[:2]:
            change = (group[metric] - published[metric].reindex(group.index)).mean()
            row[f"{metric} change from published code"] = float(change)
        rows.append(row)
    return pd.DataFrame(rows)
