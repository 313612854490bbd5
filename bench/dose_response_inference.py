"""Which test of a dose–response trend or curvature holds its error rate when levels share a seed? A simulation.

    python bench/dose_response_inference.py                     # 20000 nulls per scenario, 10 seeds × 5 levels
    python bench/dose_response_inference.py --seeds 5 --levels 7 --simulations 50000

Data come from `pipeline.dose_response.simulate_seed_shared_dose`: levels λ = 1e-5, 1e-4, … (x = log10 λ)
where every level of a seed shares that seed's random numbers, in two scenarios:

- shared offset: a large per-seed offset (the data set, the initialization) plus a smooth seed × level
  wiggle, correlated 0.8 between neighbouring levels;
- seed-specific response: a small offset, but each seed has its own slope and curvature along the axis
  (zero on average), plus a weaker wiggle.

Two tests of the trend (slope on x) and of the curvature (coefficient of (x − x̄)²):

- seed-blocked: per-seed slope / quadratic coefficient, one-sample t across seeds, df = seeds − 1
  (`seed_blocked_dose_tests`, what `dose_response` reports);
- pooled OLS: one regression over all seeds × levels runs as if independent (`pooled_ols_dose_pvalues`).

Printed: the false-positive rate at α = 0.05 under the null (flat mean response), the power at a planted
curvature, and the coverage of the bootstrap CI of the minimum (`dose_response` itself, whole seeds
resampled) at a planted U with its vertex between two tested levels. The last line is one JSON object.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dose_response as dose  # noqa: E402

ALPHA = 0.05
SCENARIOS = {
    "shared offset": {"seed_sd": 2.0, "seed_by_level_sd": 1.0, "level_correlation": 0.8, "residual_sd": 0.3},
    "seed-specific response": {
        "seed_sd": 0.3,
        "seed_slope_sd": 0.3,
        "seed_curvature_sd": 0.3,
        "seed_by_level_sd": 0.2,
        "level_correlation": 0.5,
        "residual_sd": 0.2,
    },
}


def _rejection_rates(values: np.ndarray, x: np.ndarray) -> pd.DataFrame:
    blocked = dose.seed_blocked_dose_tests(values, x)
    pooled = dose.pooled_ols_dose_pvalues(values, x)
    return pd.DataFrame(
        {
            "seed_blocked": {name: float((blocked[name]["p"] < ALPHA).mean()) for name in blocked},
            "pooled_ols": {name: float((pooled[name] < ALPHA).mean()) for name in pooled},
        }
    )


def _vertex_coverage(
    x: np.ndarray, seeds: int, studies: int, curvature: float, vertex: float, resamples: int
) -> dict[str, float]:
    """Share of simulated studies whose bootstrap CI of the vertex holds the true vertex (x units)."""
    centre = x.mean()
    # Mean response curvature·(x − vertex)² = curvature·u² − 2·curvature·(vertex − x̄)·u + constant.
    values = dose.simulate_seed_shared_dose(
        studies,
        seeds,
        x,
        **SCENARIOS["shared offset"],
        curvature=curvature,
        slope=-2 * curvature * (vertex - centre),
        random_state=29,
    )
    levels = 10.0**x
    covered, widths, u_shaped = [], [], []
    for study in values:
        frame = pd.DataFrame(
            {
                "seed": np.repeat(np.arange(seeds), len(x)),
                "lambda": np.tile(levels, seeds),
                "metric": study.reshape(-1),
            }
        )
        row = dose.dose_response(frame, "lambda", "metric", n_resamples=resamples).tests.iloc[0]
        u_shaped.append(bool(row["is_u_shaped"]))
        if not math.isfinite(row["vertex_level"]):
            covered.append(False)
            continue
        low, high = math.log10(row["vertex_ci_low"]), math.log10(row["vertex_ci_high"])
        covered.append(low <= vertex <= high)
        widths.append(high - low)
    return {
        "coverage": float(np.mean(covered)),
        "median_width_decades": float(np.median(widths)) if widths else math.nan,
        "u_shaped_share": float(np.mean(u_shaped)),
    }


@click.command()
@click.option("--seeds", type=click.IntRange(min=3), default=10, show_default=True)
@click.option("--levels", type=click.IntRange(min=3), default=5, show_default=True, help="λ = 1e-5, 1e-4, …")
@click.option("--simulations", type=click.IntRange(min=100), default=20000, show_default=True)
@click.option(
    "--planted", type=float, default=0.3, show_default=True, help="True curvature for the power run."
)
@click.option(
    "--bootstrap-studies",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="Studies for the coverage of the minimum's bootstrap CI (each calls dose_response).",
)
def main(seeds: int, levels: int, simulations: int, planted: float, bootstrap_studies: int) -> None:
    x = np.arange(levels, dtype=float) - 5.0  # log10 λ: 1e-5, 1e-4, …
    summary: dict = {"seeds": seeds, "levels": levels, "simulations": simulations, "alpha": ALPHA}
    for scenario, parameters in SCENARIOS.items():
        started = time.perf_counter()
        null = _rejection_rates(dose.simulate_seed_shared_dose(simulations, seeds, x, **parameters), x)
        power = _rejection_rates(
            dose.simulate_seed_shared_dose(
                simulations, seeds, x, **parameters, curvature=planted, random_state=1
            ),
            x,
        )
        click.echo(
            f"\n{scenario} ({seeds} seeds × {levels} levels, {simulations} simulations; "
            f"{time.perf_counter() - started:.1f} s)\n  false-positive rate at α = {ALPHA} (flat mean response):"
        )
        click.echo(null.round(4).to_string())
        click.echo(
            f"  power at a planted curvature of {planted} per decade² (a test whose null rate above "
            "exceeds α buys its power with false positives):"
        )
        click.echo(power.loc[["curvature"]].round(4).to_string())
        summary[scenario] = {
            "null": null.round(4).to_dict(),
            "power_curvature": power.loc["curvature"].round(4).to_dict(),
        }
    if bootstrap_studies:
        started = time.perf_counter()
        vertex = float(x.mean()) - 0.3  # between two tested levels
        coverage = _vertex_coverage(x, seeds, bootstrap_studies, planted, vertex, resamples=1000)
        click.echo(
            f"\nbootstrap CI of the minimum ({bootstrap_studies} studies, shared-offset scenario, curvature "
            f"{planted}, true vertex λ = {10**vertex:.2g}; {time.perf_counter() - started:.1f} s): "
            f"coverage {coverage['coverage']:.3f}, median width {coverage['median_width_decades']:.2f} decades, "
            f"called U-shaped in {coverage['u_shaped_share']:.3f}"
        )
        summary["vertex_bootstrap"] = coverage
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
