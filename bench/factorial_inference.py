"""Which test of a factorial effect holds its error rate on this study's design? A simulation.

    python bench/factorial_inference.py                      # 2000 nulls (MixedLM on the first 300)
    python bench/factorial_inference.py --seeds 5 --simulations 5000 --mixed 0

Data come from `pipeline.stats.simulate_seed_shared_factorial`: a 2^4 factorial where each seed's cells
share a seed component, an init-level component (the network initialization, correlated −0.5 across the two
levels) and a noise-kind component, as the study's common random numbers do. Three tests of every effect:

- pooled OLS/ANOVA: every run treated as independent (what the report printed before);
- MixedLM: statsmodels' linear mixed model with a random intercept per seed (REML, Wald z-test);
- seed-blocked: per-seed contrasts, one-sample t across seeds, df = seeds − 1 (`seed_blocked_effects`).

Printed: the false-positive rate at α = 0.05 of each test per effect under the null (all effects zero),
then the power of each at a planted init effect of --planted. The last line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import stats  # noqa: E402

ALPHA = 0.05


def _mixed_model_pvalues(values: np.ndarray) -> np.ndarray:
    """Wald p-values of the 15 effects from a random-intercept-per-seed MixedLM, one simulated data set."""
    import statsmodels.formula.api as smf

    seeds, cells = values.shape
    k = int(np.log2(cells))
    codes = np.array(list(np.ndindex(*([2] * k)))) * 2 - 1.0
    frame = pd.DataFrame(np.tile(codes, (seeds, 1)), columns=[f"x{i}" for i in range(k)])
    frame["seed"] = np.repeat(np.arange(seeds), cells)
    frame["y"] = values.reshape(-1)
    terms = [":".join(f"x{i}" for i in combo) for combo in stats._effect_combinations(k, range(k))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("y ~ " + " + ".join(terms), frame, groups=frame["seed"]).fit(reml=True)
    return np.array([fit.pvalues[term] for term in terms])


def _rates(pvalues: np.ndarray) -> np.ndarray:
    return (pvalues < ALPHA).mean(axis=0)


@click.command()
@click.option("--seeds", type=click.IntRange(min=3), default=10, show_default=True)
@click.option("--simulations", type=click.IntRange(min=100), default=2000, show_default=True)
@click.option(
    "--mixed", type=click.IntRange(min=0), default=300, show_default=True, help="MixedLM fits (slow)."
)
@click.option(
    "--planted", type=float, default=1.0, show_default=True, help="True init effect for the power run."
)
def main(seeds: int, simulations: int, mixed: int, planted: float) -> None:
    names = stats.factorial_effect_names(["init", "noise", "reg", "act"])
    results: dict[str, dict] = {}
    for label, effects in (("null", None), ("planted_init", {0: planted})):
        values = stats.simulate_seed_shared_factorial(simulations, seeds, effects=effects, random_state=7)
        started = time.perf_counter()
        tests = {
            "pooled_ols": stats.pooled_ols_effect_pvalues(values),
            "seed_blocked": stats.seed_blocked_effects(values)["p"],
        }
        if mixed:
            tests["mixed_lm"] = np.array([_mixed_model_pvalues(one) for one in values[:mixed]])
        results[label] = {name: _rates(p).round(4).tolist() for name, p in tests.items()}
        click.echo(
            f"\n{label} ({seeds} seeds; {simulations} simulations, MixedLM on {mixed}; "
            f"{time.perf_counter() - started:.1f} s): rejection rate at α = {ALPHA}"
        )
        table = pd.DataFrame({name: _rates(p) for name, p in tests.items()}, index=names)
        click.echo(table.round(3).to_string())
    null = results["null"]
    summary = {
        "seeds": seeds,
        "simulations": simulations,
        "mixed_fits": mixed,
        "null_rate_range": {name: [min(rates), max(rates)] for name, rates in null.items()},
        "power_init": {name: rates[0] for name, rates in results["planted_init"].items()},
        "planted_init_effect": planted,
    }
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
