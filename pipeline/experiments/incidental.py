"""The three incidental-polysemanticity experiments (docs/science.md §2) as pure functions returning plain data.

- collisions: polysemantic neurons vs m against n²/(4m), L1 as the winner-take-all force (§2.2);
- noise: fourth norm under hidden-layer noise of negative, zero and positive excess kurtosis (§2.3);
- dynamics: the sparsification ODE against its closed-form prediction (§2.4);
- cooccurrence: polysemantic neurons when features co-occur (each on with probability p), m below and
  above n (the open question of seed 001's discussion).
The splitting remedy lives in `pipeline.experiments.incidental_splitting`.

A point is one config; `run_point` trains it and returns params (the flattened config), scalar metrics,
per-instance rows and curves, so a tracking layer can log each point as one run. Nothing here writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config_tools import flatten
from pipeline.experiments.incidental_defaults import COLLISIONS, COOCCURRENCE, DYNAMICS, NOISE
from pipeline.incidental import (
    SPARSIFICATION_MIDDLE_WINDOW,
    Convergence,
    IncidentalConfig,
    assess_convergence,
    predicted_l1_norm,
    predicted_nonzeros,
    predicted_polysemantic_neurons,
    simulate_sparsification,
    train_incidental,
)

# The scalar metrics of one trained point, in this order.
POINT_METRICS = (
    "polysemantic_neurons",
    "polysemantic_neurons_std",
    "predicted_polysemantic_neurons",
    "fourth_norm",
    "initial_collisions",
    "winner_was_initial_argmax",
    "opposite_sign_fraction",
    "final_loss",
    "encoding_sparsity_min",
    "unconverged_instances",
    "converged",
)
# Added for co-occurrence points (data "bernoulli"): the loss on their fixed evaluation inputs, the mean
# features_per_neuron and features_represented, and how much the mean count moved over the last quarter of
# training (curve points at or after 3/4 of the steps, max − min): the stability check of a point whose
# encodings may stay dense by design, so that the sparsity criterion of an L1 point does not apply.
COOCCURRENCE_METRICS = (
    "data_loss",
    "features_per_neuron",
    "features_represented",
    "polysemantic_neurons_last_quarter_range",
)


def point_metric_names(config: IncidentalConfig) -> tuple[str, ...]:
    """The scalar metrics of a point of this config, in order."""
    return POINT_METRICS + (COOCCURRENCE_METRICS if config.data == "bernoulli" else ())


@dataclass
class PointResult:
    """One trained point.

    params: the flattened config (every IncidentalConfig field).
    metrics: exactly POINT_METRICS; means over instances unless the name says otherwise.
        polysemantic_neurons_std is the sample standard deviation across instances (NaN with one instance);
        opposite_sign_fraction pools all instances (opposite-sign polysemantic neurons / polysemantic neurons,
        NaN when there are none). encoding_sparsity_min, unconverged_instances and converged (1/0) are the
        convergence check of an L1 point (`pipeline.incidental.assess_convergence`); NaN for a noise point,
        where sparsification is the outcome being measured (Gaussian noise is expected to stay dense).
    convergence: that check, None for a noise point.
    per_instance: one row per instance: "instance" (global index) and every measurement of
        `pipeline.incidental.measure_instances`.
    curves: "step", "loss", "fourth_norm", "polysemantic_neurons" (means over instances).
    initial_weights, final_weights: [instance, n, m] CPU tensors.
    """

    config: IncidentalConfig
    params: dict[str, Any]
    metrics: dict[str, float]
    per_instance: pd.DataFrame
    curves: dict[str, list[float]]
    initial_weights: torch.Tensor
    final_weights: torch.Tensor
    wall_time_s: float
    convergence: Convergence | None = None


def uses_sparsity_check(config: IncidentalConfig) -> bool:
    """Whether a point's convergence is judged by encoding sparsity (`assess_convergence`): L1 points on basis
    data. Noise points and co-occurrence points are not: whether encodings sparsify is what they measure
    (Gaussian noise and dense co-occurring features keep them spread)."""
    return config.noise == "none" and config.data == "basis"


def run_point(config: IncidentalConfig, progress: Callable[[int], None] | None = None) -> PointResult:
    """Train one config (all its instances in one batched pass) and summarise it."""
    result = train_incidental(config, progress=progress)
    per_instance = pd.DataFrame({"instance": result.instance_indices, **result.measurements})
    counts = per_instance["polysemantic_neurons"]
    polysemantic_total = counts.sum()
    metrics = {
        "polysemantic_neurons": float(counts.mean()),
        "polysemantic_neurons_std": float(counts.std(ddof=1)) if len(counts) > 1 else math.nan,
        "predicted_polysemantic_neurons": predicted_polysemantic_neurons(config.n, config.m),
        "fourth_norm": float(per_instance["fourth_norm"].mean()),
        "initial_collisions": float(per_instance["initial_collisions"].mean()),
        "winner_was_initial_argmax": float(per_instance["winner_was_initial_argmax"].mean()),
        "opposite_sign_fraction": (
            float(per_instance["opposite_sign_neurons"].sum() / polysemantic_total)
            if polysemantic_total > 0
            else math.nan
        ),
        "final_loss": float(per_instance["final_loss"].mean()),
    }
    if config.data == "bernoulli":
        steps = np.asarray(result.curves["step"])
        late = np.asarray(result.curves["polysemantic_neurons"])[steps >= 0.75 * config.steps]
        metrics |= {
            "data_loss": float(per_instance["data_loss"].mean()),
            "features_per_neuron": float(per_instance["features_per_neuron"].mean()),
            "features_represented": float(per_instance["features_represented"].mean()),
            "polysemantic_neurons_last_quarter_range": float(late.max() - late.min()),
        }
    convergence = (
        assess_convergence(per_instance["encoding_sparsity"]) if uses_sparsity_check(config) else None
    )
    metrics |= {
        "encoding_sparsity_min": convergence.lowest_sparsity if convergence else math.nan,
        "unconverged_instances": float(convergence.unconverged_instances) if convergence else math.nan,
        "converged": float(convergence.converged) if convergence else math.nan,
    }
    return PointResult(
        config=config,
        params=flatten(config),
        metrics={name: metrics[name] for name in point_metric_names(config)},
        per_instance=per_instance,
        curves=result.curves,
        initial_weights=result.initial_weights,
        final_weights=result.final_weights,
        wall_time_s=result.wall_time_s,
        convergence=convergence,
    )


# ------------------------------------------------------------------------------------------------------------
# Experiment 1: collisions and the n²/(4m) law


def collisions_points(
    n: int = COLLISIONS["n"],
    ms: Iterable[int] = COLLISIONS["ms"],
    l1_values: Iterable[float] = COLLISIONS["l1_values"],
    instances: int = COLLISIONS["instances"],
    steps: int = COLLISIONS["steps"],
    **overrides: Any,
) -> list[IncidentalConfig]:
    """Configs of the collision sweep, ordered by λ then m.

    Defaults: the published recipe (AdamW lr 1e-3, torch's weight decay 0.01, 16 instances) at n = 64, trained
    for 12 000 steps instead of the published 7500: at m = n = 64 the encodings sparsify (every instance at
    CONVERGENCE_THRESHOLD) only at 8750–9000 steps (seeds 0–3), and 7500 steps leave its count about 4 % low.
    The sweep takes about 70 s on an idle 2-core CPU. The published figure used n = 256, m = 256…4096 and
    λ ∈ {1e-3, 1e-2, 1e-1}. `overrides` go to every IncidentalConfig (seed, lr, device, …).
    """
    return [
        IncidentalConfig(n=n, m=m, l1=l1, instances=instances, steps=steps, **overrides)
        for l1 in l1_values
        for m in ms
    ]


# ------------------------------------------------------------------------------------------------------------
# Experiment 2: noise as the winner-take-all force


def noise_points(
    n: int = NOISE["n"],
    m: int = NOISE["m"],
    instances: int = NOISE["instances"],
    steps: int = NOISE["steps"],
    sigmas: Iterable[float] = NOISE["sigmas"],
    noise_types: Iterable[str] = NOISE["noise_types"],
    optimizer: str = NOISE["optimizer"],
    lr: float = NOISE["lr"],
    l1: float = NOISE["l1"],
    **overrides: Any,
) -> list[IncidentalConfig]:
    """Configs of the noise comparison, ordered by noise type then σ.

    Published run (seed 003 code): n = 8, m = 16, 5 instances, plain SGD lr 0.02, λ = 0, 100 000 steps,
    Bernoulli and Gaussian noise at σ ∈ {0.07, 0.1, 0.15}. The default here stops at 20 000 steps so all
    twelve points run in 30–45 s on a 2-core CPU; pass steps=100_000 for the published length.
    Noise is drawn per sample by default; noise_sharing="per_step" reproduces the published sharing.
    """
    weight_decay = overrides.pop("weight_decay", 0.01 if optimizer == "adamw" else 0.0)
    return [
        IncidentalConfig(
            n=n,
            m=m,
            instances=instances,
            steps=steps,
            noise=noise,
            sigma=sigma,
            optimizer=optimizer,
            lr=lr,
            l1=l1,
            weight_decay=weight_decay,
            **overrides,
        )
        for noise in noise_types
        for sigma in sigmas
    ]


# ------------------------------------------------------------------------------------------------------------
# Experiment 4: co-occurring features


def cooccurrence_points(
    n: int = COOCCURRENCE["n"],
    ms: Iterable[int] = COOCCURRENCE["ms"],
    p_values: Iterable[float] = COOCCURRENCE["p_values"],
    l1: float = COOCCURRENCE["l1"],
    instances: int = COOCCURRENCE["instances"],
    steps: int = COOCCURRENCE["steps"],
    batch_size: int = COOCCURRENCE["batch_size"],
    lr: float = COOCCURRENCE["lr"],
    **overrides: Any,
) -> list[IncidentalConfig]:
    """Configs of the co-occurrence sweep (data "bernoulli"), ordered by m then p.

    Each feature is on independently with probability p, at value 1 like a basis vector
    (`pipeline.incidental.cooccurring_inputs`); p = 0 is one feature per input. Instance k of every point
    with the same m and seed starts from the same weights and draws its inputs from the same uniforms, so
    points that differ only in p are paired on the instance; instances within a point are independent
    (their own init and input streams). `overrides` go to every IncidentalConfig (seed, device, …).
    """
    return [
        IncidentalConfig(
            n=n,
            m=m,
            l1=l1,
            instances=instances,
            steps=steps,
            lr=lr,
            data="bernoulli",
            p=p,
            batch_size=batch_size,
            **overrides,
        )
        for m in ms
        for p in p_values
    ]


# ------------------------------------------------------------------------------------------------------------
# Experiment 3: speed of sparsification


@dataclass
class DynamicsPoint:
    """One simulated encoding against the prediction.

    params: m, l1, dt, t_max, seed.
    metrics: completion_time (first t with m′ ≤ 1), completion_time_times_l1 (documented 1.6–2),
        nonzeros_ratio_median/min/max (m′ over ‖w‖₁²-prediction for t·λ in SPARSIFICATION_MIDDLE_WINDOW;
        documented 2–2.7), l1_norm_ratio_median (‖w‖₁ over its prediction, same window).
    simulation: `simulate_sparsification`'s output plus "predicted_l1_norm" and "predicted_nonzeros" arrays.
    """

    params: dict[str, Any]
    metrics: dict[str, float]
    simulation: dict[str, Any]


def dynamics(
    m: int = DYNAMICS["m"],
    l1_values: Iterable[float] = DYNAMICS["l1_values"],
    t_max_times_l1: float = DYNAMICS["t_max_times_l1"],
    dt: float = DYNAMICS["dt"],
    seed: int = DYNAMICS["seed"],
) -> list[DynamicsPoint]:
    """Simulate the sparsification ODE for each λ up to t = t_max_times_l1/λ and compare with the prediction.

    Defaults keep λ√m ≤ 0.1 (the regime the prediction assumes) and finish in about a second; the published
    simulation used m = 1e5, λ = 1e-5 and initial standard deviation 0.9/√m.
    """
    points = []
    for l1 in l1_values:
        t_max = t_max_times_l1 / l1
        simulation = simulate_sparsification(m, l1, t_max, dt=dt, seed=seed)
        times = simulation["t"]
        simulation["predicted_l1_norm"] = predicted_l1_norm(m, l1, times)
        simulation["predicted_nonzeros"] = predicted_nonzeros(m, l1, times)
        low, high = SPARSIFICATION_MIDDLE_WINDOW
        middle = (times * l1 >= low) & (times * l1 <= high)
        nonzeros_ratio = simulation["nonzeros"][middle] / simulation["predicted_nonzeros"][middle]
        l1_ratio = simulation["l1_norm"][middle] / simulation["predicted_l1_norm"][middle]
        completion = simulation["completion_time"]
        metrics = {
            "completion_time": float(completion),
            "completion_time_times_l1": float(completion * l1),
            "nonzeros_ratio_median": float(np.median(nonzeros_ratio)),
            "nonzeros_ratio_min": float(nonzeros_ratio.min()),
            "nonzeros_ratio_max": float(nonzeros_ratio.max()),
            "l1_norm_ratio_median": float(np.median(l1_ratio)),
        }
        params = {"m": m, "l1": l1, "dt": dt, "t_max": t_max, "seed": seed}
        points.append(DynamicsPoint(params=params, metrics=metrics, simulation=simulation))
    return points


# ------------------------------------------------------------------------------------------------------------
# Report: tables and figures from stored per-instance values (no tracking store here; `tracking/incidental.py`
# fetches the frames and logs the files written by `IncidentalReport.write`).
