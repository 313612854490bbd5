"""Decompose trained networks again: new SAEs on stored networks, no network retrained.

A taming seed is a network and an SAE on its last hidden layer. The network does not depend on any SAE
setting (its random streams are its own: data, "init", noise), so the network a sweep stored for
(configuration, seed) is exactly the network a new sweep with other SAE settings would train again.
`decompose_ablations` takes those stored networks and trains only the SAEs, every model of a group in one
batched pass (`pipeline.train.train_saes_on_hidden`, on the fused engine where it applies), each SAE from
its seed's own "sae" generator, as in a full pass; then evaluates every seed with the study's metrics.

A sweep over SAE settings (architecture, width, sparsity) therefore costs SAE training only, and its
results are those of the full sweep with the same settings, up to float rounding (the hidden layer is
recomputed here with the same batched forward the training pass uses).

    from pipeline.experiments.decompose import decompose_ablations
    results = decompose_ablations(configs, seeds, networks=lambda config, seed: stored[config.hash(), seed])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch

from pipeline import sae as sae_architectures
from pipeline.config import AblationConfig
from pipeline.config_tools import leaf_fields, leaf_values
from pipeline.data import make_dataset
from pipeline.experiments.pool import PassPool
from pipeline.experiments.taming import AblationResult, evaluate
from pipeline.models import MLP, mlp_forward_features, runs_of
from pipeline.train import (
    Progress,
    SeedResult,
    _curve_slice,
    _PassState,
    _stack_features,
    resolve_device,
    train_saes_on_hidden,
)

# What a network returns for a (configuration, seed) it has no trained network for: the reason, which the
# seed then fails with (a source seed that diverged, or was recorded without its checkpoint).
NetworkSource = Callable[[AblationConfig, int], "MLP | str"]


def decomposition_key(config: AblationConfig) -> tuple:
    """Configurations with equal keys share one SAE pass: the same data, last hidden width and SAE
    settings (every SAE field not taken per model; the SAE learning rate is)."""
    fields = leaf_fields(AblationConfig)
    values = leaf_values(config)
    shared = tuple(
        (path, value)
        for path, value in values.items()
        if path.startswith(("sae.", "data.")) and not fields[path][0].metadata.get("per_model", False)
    )
    return (*shared, ("network.hidden_dim", config.network.hidden_dim), ("curve_every", config.curve_every))


@torch.no_grad()
def last_hidden(networks: Sequence[MLP], configs: Sequence[AblationConfig], seeds: Sequence[int], device):
    """The clean last hidden layer of each network on its seed's train split: `[model, sample, hidden]`.

    Computed with the batched forward of the training pass (the same GEMMs on the same stacked weights), so
    an SAE trained here sees what the SAE of the original pass saw.
    """
    datasets = {seed: make_dataset(configs[0].data, seed) for seed in dict.fromkeys(seeds)}
    inputs = _stack_features([datasets[seed].train_inputs for seed in seeds], device)
    layers = len(networks[0].layers)
    weights = [
        torch.stack([network.layers[layer].weight for network in networks]).to(device)
        for layer in range(layers)
    ]
    biases = [
        torch.stack([network.layers[layer].bias for network in networks]).to(device)
        for layer in range(layers)
    ]
    _, trace = mlp_forward_features(
        inputs, weights, biases, runs_of([network.activation for network in networks])
    )
    return trace.inputs[-1].transpose(1, 2)


def decompose_pass(
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    networks: Sequence[MLP],
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> list[SeedResult]:
    """Train one SAE per (configs[i], seeds[i]) on `networks[i]` in one batched pass; results in order.

    Every config must share `decomposition_key`. The networks are used as given (not copied): each
    SeedResult's `network` is its input network. Models are ordered by activation inside the pass, as in
    `pipeline.train.train_pass`, so one activation covers a contiguous slice of the batch.
    """
    if not (len(configs) == len(seeds) == len(networks)) or not configs:
        raise ValueError("decompose_pass needs one seed and one network per config, and at least one model")
    if len({decomposition_key(config) for config in configs}) != 1:
        raise ValueError("configs in one decomposition pass must share data, hidden width and SAE settings")
    started = time.perf_counter()
    device = resolve_device(device) if isinstance(device, str) else device
    order = sorted(range(len(configs)), key=lambda index: networks[index].activation)
    ordered_configs = [configs[index] for index in order]
    ordered_seeds = [seeds[index] for index in order]
    ordered_networks = [networks[index] for index in order]
    hidden = last_hidden(ordered_networks, ordered_configs, ordered_seeds, device)
    state = _PassState(len(order), device)
    curves, parameters, (means, stds) = train_saes_on_hidden(
        ordered_configs, ordered_seeds, hidden, state, progress, device
    )
    elapsed = (time.perf_counter() - started) / len(order)
    results: list[SeedResult] = [None] * len(order)  # type: ignore[list-item]
    for position, index in enumerate(order):
        config, seed, network = ordered_configs[position], ordered_seeds[position], ordered_networks[position]
        result = SeedResult(config=config, seed=seed, failure=state.failures[position], wall_seconds=elapsed)
        result.curves = {"sae": _curve_slice(curves, position)}
        if result.finished:
            result.network = network
            result.sae = sae_architectures.SparseAutoencoder(
                config.sae,
                {name: value[position].detach().cpu() for name, value in parameters.items()},
                means[position].cpu(),
                stds[position].cpu(),
            )
        results[index] = result
    return results


def _decompose_and_evaluate(configs, seeds, networks, progress, device) -> list[SeedResult]:
    """One decomposition pass, every seed evaluated. `progress` counts SAE-epochs: a pass's epoch trains
    all of its models."""
    models = len(configs)
    counted = None if progress is None else lambda count: progress(count * models)
    return [evaluate(result) for result in decompose_pass(configs, seeds, networks, counted, device)]


def _decompose_chunk(configs, seeds, networks, device) -> list[SeedResult]:
    """In a worker process of a `PassPool`: one decomposition pass over a chunk, evaluated."""
    from pipeline.experiments.pool import worker_progress

    progress, flush = worker_progress()
    results = _decompose_and_evaluate(configs, seeds, networks, progress, device)
    flush()
    return results


def decompose_ablations(
    configs: Sequence[AblationConfig],
    seeds: Iterable[int],
    *,
    networks: NetworkSource,
    progress: Progress | None = None,
    device: str = "cpu",
    on_seed: Callable[[int, SeedResult], None] | None = None,
    pool: PassPool | None = None,
) -> list[AblationResult]:
    """Decompose every (configuration, seed) from its stored network; one AblationResult per config.

    `networks(config, seed)` returns the trained network of that configuration's network settings and
    seed, or a one-sentence reason there is none (the seed then fails with it, untrained). Seeds are
    evaluated and handed to `on_seed(config index, seed result)` as each pass finishes, like
    `pipeline.experiments.taming.run_ablations`. `progress(count)` counts SAE-epochs (one model, one epoch).
    With a `pool`, each pass is split by seed over its workers, which train and evaluate their chunks in
    parallel (evaluation costs as much as SAE training here, and one process would do it alone).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    results = [AblationResult(config) for config in configs]

    def deliver(config_index: int, seed_result: SeedResult) -> None:
        results[config_index].seeds.append(seed_result)
        if on_seed is not None:
            on_seed(config_index, seed_result)

    passes: dict[tuple, list[tuple[int, int, MLP]]] = {}
    for config_index, config in enumerate(configs):
        for seed in seeds:
            network = networks(config, seed)
            if isinstance(network, str):
                deliver(config_index, SeedResult(config=config, seed=seed, failure=network))
                continue
            passes.setdefault(decomposition_key(config), []).append((config_index, seed, network))
    if pool is not None:
        _decompose_in_pool(pool, configs, list(passes.values()), deliver, progress, device)
    else:
        for members in passes.values():
            evaluated = _decompose_and_evaluate(
                [configs[index] for index, _, _ in members],
                [seed for _, seed, _ in members],
                [network for _, _, network in members],
                progress,
                device,
            )
            for (config_index, _, _), seed_result in zip(members, evaluated, strict=True):
                deliver(config_index, seed_result)
    for result in results:
        result.seeds.sort(key=lambda seed_result: seed_result.seed)
    return results


def _decompose_in_pool(pool, configs, passes, deliver, progress, device) -> None:
    """Every pass split by seed over the pool's workers; each chunk handed to `deliver` when it is done."""
    from pipeline.experiments.pool import chunk_work, collect_chunks, pool_chunks

    futures = {}
    for members in passes:
        network_of = {(index, seed): network for index, seed, network in members}
        for chunk in pool_chunks([(index, seed) for index, seed, _ in members], pool.workers):
            future = pool.submit_task(
                _decompose_chunk, *chunk_work(configs, chunk), [network_of[key] for key in chunk], device
            )
            futures[future] = chunk
    collect_chunks(pool, futures, deliver, progress)
