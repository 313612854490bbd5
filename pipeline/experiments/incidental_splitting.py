"""The splitting remedy as an experiment: train the tied model, split its polysemantic neurons, train on.

One point is one `SplittingConfig`: the base collisions point (an L1 point on basis data), a noise scale ε
for the copies and a number of extra steps; or the baseline, the same extra steps without splitting. Every
point of one base trains the same base (`run_split_point` takes it from a cache when given one), so all arms
of instance k start from the same trained model and, across ε, perturb along the same directions: arms are
paired on the instance. Nothing here writes files; `tracking.incidental` logs the point as one run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from pipeline.config_tools import ConfigError, check_integer, check_positive, config_hash, flatten
from pipeline.experiments.incidental_defaults import SPLITTING
from pipeline.incidental import (
    IncidentalConfig,
    IncidentalResult,
    continue_training,
    instance_losses,
    polysemantic_neurons,
    reconstruction,
    train_incidental,
)
from pipeline.splitting import (
    OUTCOMES,
    RESOLVED,
    SEPARATED,
    Split,
    copy_noise,
    mixed_neurons,
    outcome,
    outcome_counts,
    split_neurons,
    unsplit,
)

# Scalar metrics of a splitting point, in this order. Fractions pool the instances: outcomes summed over
# instances divided by the split neurons summed over instances (NaN when nothing was split).
SPLIT_METRICS = (
    "polysemantic_before",
    "split_neurons",
    "resolved_fraction",
    "recollided_fraction",
    "other_fraction",
    "separated_fraction",
    "polysemantic_after",
    "mixed_after",
    "loss_before",
    "loss_at_split",
    "loss_after",
    "squared_error_before",
    "squared_error_after",
    "output_change_at_split",
)


@dataclass(frozen=True)
class SplittingConfig:
    """One arm of the splitting study.

    base: the collisions point trained first (data "basis", no hidden noise: the L1 tied model).
    split: True splits every polysemantic neuron of the trained base (two copies w/√2, each + ε·z with
        z ~ N(0, 1) per weight); False is the baseline: the same extra steps on the unsplit model.
    epsilon: noise scale ε of the copies (0 for the baseline).
    extra_steps: steps trained after the split, with the base's optimizer settings and a fresh optimizer
        state in both arms (so the arms differ only by the split).
    measure_every: extra steps between recorded outcome counts (step 0 and the last step always).
    """

    base: IncidentalConfig
    split: bool = True
    epsilon: float = 0.0
    extra_steps: int = SPLITTING["extra_steps"]
    measure_every: int = SPLITTING["measure_every"]

    def __post_init__(self) -> None:
        if self.base.data != "basis" or self.base.noise != "none":
            raise ConfigError("base must be an L1 point on basis data (data 'basis', noise 'none')")
        check_positive("epsilon", self.epsilon, allow_zero=True)
        if not self.split and self.epsilon != 0:
            raise ConfigError(f"epsilon must be 0 for the baseline (split=False); got {self.epsilon!r}")
        check_integer("extra_steps", self.extra_steps, minimum=1)
        check_integer("measure_every", self.measure_every, minimum=1)
        if self.extra_steps > 1_000_000:
            raise ConfigError(f"extra_steps must be <= 1000000; got {self.extra_steps!r}")

    def label(self) -> str:
        """ "baseline (no split)" or "split ε=0.1"."""
        return f"split ε={self.epsilon:g}" if self.split else "baseline (no split)"


@dataclass
class SplitPointResult:
    """One trained arm.

    metrics: exactly SPLIT_METRICS (means over instances unless pooled, see there).
    per_instance: one row per instance: instance, polysemantic_before, split, one count per outcome at the
        end, polysemantic_after, loss_before, loss_at_split, loss_after, squared_error_before/after.
    checkpoints: one row per (instance, extra step): the outcome counts, split, polysemantic_neurons, loss.
    splits: one row per (instance, split neuron, feature it carried before): weight_before, the weights on
        the two copies right after the split (first_start, second_start) and at the end (first_after,
        second_after; second_* NaN for the baseline) and the neuron's outcome.
    curves: "step", then the pooled resolved_fraction, mean polysemantic_neurons and mean loss per step.
    """

    config: SplittingConfig
    params: dict[str, Any]
    metrics: dict[str, float]
    per_instance: pd.DataFrame
    checkpoints: pd.DataFrame
    splits: pd.DataFrame
    curves: dict[str, list[float]]
    wall_time_s: float


def splitting_points(
    base: IncidentalConfig,
    epsilons: Iterable[float] = SPLITTING["epsilons"],
    extra_steps: int = SPLITTING["extra_steps"],
    measure_every: int = SPLITTING["measure_every"],
    baseline: bool = True,
) -> list[SplittingConfig]:
    """The baseline (when asked) then one split arm per ε, all on the same base."""
    arms = [SplittingConfig(base, False, 0.0, extra_steps, measure_every)] if baseline else []
    return arms + [SplittingConfig(base, True, float(eps), extra_steps, measure_every) for eps in epsilons]


def _pooled(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    total = float(denominator.sum())
    return float(numerator.sum()) / total if total > 0 else math.nan


def run_split_point(
    config: SplittingConfig,
    *,
    base_cache: MutableMapping[str, IncidentalResult] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SplitPointResult:
    """Train (or take from base_cache) the base, split or not, train on, and measure every checkpoint."""
    started = time.perf_counter()
    key = config_hash(config.base)
    base = base_cache.get(key) if base_cache is not None else None
    if base is None:
        base = train_incidental(config.base)
        if base_cache is not None:
            base_cache[key] = base
    base_config = config.base
    low, high = base_config.polysemantic_low, base_config.polysemantic_high
    trained = base.final_weights
    polysemantic_mask = _polysemantic_mask(trained, low, high)
    if config.split:
        noise = copy_noise(base_config.seed, base.instance_indices, base_config.n, base_config.m)
        split = split_neurons(trained, polysemantic_mask, config.epsilon, noise, low, high)
    else:
        split = unsplit(trained, polysemantic_mask, low, high)
    start = split.weights.clone()
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {
        "step": [],
        "resolved_fraction": [],
        "polysemantic_neurons": [],
        "loss": [],
    }

    def measure(weights: torch.Tensor, step: int) -> None:
        weights = weights.cpu()
        counts = outcome_counts(weights, split, low, high)
        polysemantic = polysemantic_neurons(weights, low, high)
        mixed = mixed_neurons(weights)
        losses = instance_losses(weights, base_config.l1)
        for position, instance in enumerate(base.instance_indices):
            rows.append(
                {
                    "instance": instance,
                    "step": step,
                    "split": int(counts["split"][position]),
                    **{name: int(counts[name][position]) for name in (*OUTCOMES, SEPARATED)},
                    "polysemantic_neurons": int(polysemantic[position]),
                    "mixed_neurons": int(mixed[position]),
                    "loss": float(losses[position]),
                }
            )
        curves["step"].append(step)
        curves["resolved_fraction"].append(_pooled(counts[RESOLVED], counts["split"]))
        curves["polysemantic_neurons"].append(float(polysemantic.double().mean()))
        curves["loss"].append(float(losses.mean()))
        if progress is not None:
            progress(step)

    final = continue_training(
        split.weights, base_config, config.extra_steps, every=config.measure_every, measure=measure
    )
    checkpoints = pd.DataFrame(rows)
    per_instance = _per_instance(base, split, start, final, checkpoints, polysemantic_mask, config)
    splits = _splits_table(base, split, start, final, low, high)
    output_change = (reconstruction(start) - reconstruction(trained)).abs().amax(dim=(-1, -2))
    pooled = per_instance[[*OUTCOMES, SEPARATED]].sum()
    total_split = per_instance["split"].sum()
    metrics = {
        "polysemantic_before": float(per_instance["polysemantic_before"].mean()),
        "split_neurons": float(total_split),
        **{
            f"{name}_fraction": float(pooled[name] / total_split) if total_split > 0 else math.nan
            for name in (*OUTCOMES, SEPARATED)
        },
        "polysemantic_after": float(per_instance["polysemantic_after"].mean()),
        "mixed_after": float(per_instance["mixed_after"].mean()),
        "loss_before": float(per_instance["loss_before"].mean()),
        "loss_at_split": float(per_instance["loss_at_split"].mean()),
        "loss_after": float(per_instance["loss_after"].mean()),
        "squared_error_before": float(per_instance["squared_error_before"].mean()),
        "squared_error_after": float(per_instance["squared_error_after"].mean()),
        "output_change_at_split": float(output_change.max()),
    }
    return SplitPointResult(
        config=config,
        params=flatten(config),
        metrics={name: metrics[name] for name in SPLIT_METRICS},
        per_instance=per_instance,
        checkpoints=checkpoints,
        splits=splits,
        curves=curves,
        wall_time_s=time.perf_counter() - started,
    )


def _polysemantic_mask(weights: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[instance, m] bool: the neurons `polysemantic_neurons` counts."""
    magnitude = weights.abs()
    return ((magnitude >= low) & (magnitude <= high)).sum(dim=-2) >= 2


def _per_instance(
    base: IncidentalResult,
    split: Split,
    start: torch.Tensor,
    final: torch.Tensor,
    checkpoints: pd.DataFrame,
    polysemantic_mask: torch.Tensor,
    config: SplittingConfig,
) -> pd.DataFrame:
    last = checkpoints[checkpoints["step"] == checkpoints["step"].max()].reset_index(drop=True)
    l1 = config.base.l1
    return pd.DataFrame(
        {
            "instance": base.instance_indices,
            "polysemantic_before": polysemantic_mask.sum(dim=-1).tolist(),
            "split": last["split"],
            **{name: last[name] for name in (*OUTCOMES, SEPARATED)},
            "polysemantic_after": last["polysemantic_neurons"],
            "mixed_after": last["mixed_neurons"],
            "loss_before": instance_losses(base.final_weights, l1).tolist(),
            "loss_at_split": instance_losses(start, l1).tolist(),
            "loss_after": instance_losses(final, l1).tolist(),
            "squared_error_before": instance_losses(base.final_weights, 0.0).tolist(),
            "squared_error_after": instance_losses(final, 0.0).tolist(),
        }
    )


def _splits_table(
    base: IncidentalResult, split: Split, start: torch.Tensor, final: torch.Tensor, low: float, high: float
) -> pd.DataFrame:
    rows = []
    trained = base.final_weights
    for position, instance in enumerate(base.instance_indices):
        for rank in torch.nonzero(split.valid[position], as_tuple=False).flatten().tolist():
            neuron = int(split.neurons[position, rank])
            first, second = int(split.first[position, rank]), int(split.second[position, rank])
            before = split.features[position][rank]
            result = outcome(final[position], first, second, before, low, high)
            for feature in before:
                rows.append(
                    {
                        "instance": instance,
                        "neuron": neuron,
                        "first": first,
                        "second": second,
                        "feature": feature,
                        "weight_before": float(trained[position, feature, neuron]),
                        "first_start": float(start[position, feature, first]),
                        "second_start": float(start[position, feature, second]) if second >= 0 else math.nan,
                        "first_after": float(final[position, feature, first]),
                        "second_after": float(final[position, feature, second]) if second >= 0 else math.nan,
                        "outcome": result,
                    }
                )
    columns = ["instance", "neuron", "first", "second", "feature", "weight_before", "first_start"]
    columns += ["second_start", "first_after", "second_after", "outcome"]
    return pd.DataFrame(rows, columns=columns)


def splitting_config_from_params(params: dict[str, str]) -> SplittingConfig:
    """A SplittingConfig rebuilt from a run's string params (the flattened config, "base.n" …)."""
    from pipeline.config_tools import from_dict

    hints = {item.name: item.type for item in dataclasses.fields(IncidentalConfig)}
    base: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for name, text in params.items():
        if name.startswith("base."):
            field_name = name.removeprefix("base.")
            kind = hints.get(field_name)
            if kind is None:
                continue
            base[field_name] = (
                int(text) if kind in ("int", int) else float(text) if kind in ("float", float) else text
            )
        elif name in ("epsilon",):
            top[name] = float(text)
        elif name in ("extra_steps", "measure_every"):
            top[name] = int(text)
        elif name == "split":
            top[name] = text == "True"
    return from_dict(SplittingConfig, {"base": base, **top})
