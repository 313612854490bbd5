"""The analysis stage: pure report building on hand-made tables, and end to end from a tracking store."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from click.testing import CliRunner
from mlflow import MlflowClient
from scipy import stats as scipy_stats
from statsmodels.stats.anova import anova_lm

import cli
from pipeline.analysis import BASELINE_NAME, build_report
from pipeline.config import FACTOR_LEVELS, STRATEGIC_CONFIGURATIONS
from tracking.analysis import drop_duplicate_seeds


def synthetic_seeds(cells, seeds=4, effect_of_reg=0.0, failed=()) -> pd.DataFrame:
    """A tidy seed table: macs = 0.3 + effect·[reg == l2] + noise; `failed` lists (config, seed) FAILED rows."""
    generator = np.random.default_rng(0)
    rows = []
    for cell in cells:
        name = "·".join(cell)
        for seed in range(seeds):
            status = "FAILED" if (name, seed) in failed else "FINISHED"
            value = 0.3 + effect_of_reg * (cell[2] == "l2") + generator.normal(0, 0.01)
            rows.append(
                {
                    "config": name,
                    **dict(zip(FACTOR_LEVELS, cell, strict=True)),
                    "seed": seed,
                    "status": status,
                    "macs": value if status == "FINISHED" else np.nan,
                }
            )
    return pd.DataFrame(rows)


def test_thin_missing_and_failed_data_are_reported_honestly():
    cells = list(STRATEGIC_CONFIGURATIONS[:4])
    table = synthetic_seeds(cells, seeds=3, failed={("·".join(cells[1]), 1), ("·".join(cells[1]), 2)})
    report = build_report(table, metrics=["macs"], n_resamples=200, figures=False)
    counts = report.counts.set_index("configuration")
    assert counts.loc["·".join(cells[1]), "finished"] == 1 and counts.loc["·".join(cells[1]), "failed"] == 2
    thin = report.comparisons[report.comparisons["config_a"] == "·".join(cells[1])].iloc[0]
    assert thin["n_a"] == 1 and np.isnan(thin["p"]) and np.isnan(thin["t"])
    text = report.markdown()
    assert "Fewer than 2 finished seeds" in text and "·".join(cells[1]) in text
    assert "Missing from the strategic 8" in text and "·".join(STRATEGIC_CONFIGURATIONS[7]) in text
    assert "2 failed seed runs are counted" in text
    assert "Failed seed runs in 1 configuration(s)" in text
    assert report.factorial is None


def test_duplicate_seed_runs_are_counted_once():
    frame = pd.DataFrame(
        {
            "config_hash": ["a", "a", "a", "b", "a"],
            "seed": [0, 0, 1, 0, 0],
            "status": ["FINISHED", "FINISHED", "FINISHED", "FINISHED", "FAILED"],
            "start_time": [1, 2, 3, 4, 5],
            "macs": [0.3, 0.3, 0.2, 0.1, float("nan")],
        }
    )
    kept = drop_duplicate_seeds(frame)
    assert kept.attrs["duplicates_dropped"] == 1
    finished = kept[kept["status"] == "FINISHED"]
    assert sorted(zip(finished["config_hash"], finished["seed"], finished["start_time"], strict=True)) == [
        ("a", 0, 2),
        ("a", 1, 3),
        ("b", 0, 4),
    ]
    assert (kept["status"] == "FAILED").sum() == 1


def test_unknown_baseline_or_metric_is_a_clear_error():
    table = synthetic_seeds(STRATEGIC_CONFIGURATIONS[:2])
    with pytest.raises(ValueError, match="baseline 'nope' has no finished seeds"):
        build_report(table, metrics=["macs"], baseline="nope", figures=False)
    with pytest.raises(ValueError, match=r"metric\(s\) \['bogus'\] are not in the store"):
        build_report(table, metrics=["bogus"], figures=False)


def test_factorial_verdict_finds_the_planted_effect():
    cells = list(itertools.product(*FACTOR_LEVELS.values()))
    table = synthetic_seeds(cells, seeds=3, effect_of_reg=-0.05)
    report = build_report(table, metrics=["macs"], n_resamples=200, figures=True)
    effects = report.factorial.set_index("effect")
    assert effects.loc["reg", "estimate"] == pytest.approx(-0.05, abs=0.01)
    # Three seeds, df = 2: the per-seed contrasts of reg agree closely, but three is all the evidence.
    contrasts = [
        table[(table["seed"] == seed) & (table["reg"] == "l2")]["macs"].mean()
        - table[(table["seed"] == seed) & (table["reg"] == "l1")]["macs"].mean()
        for seed in range(3)
    ]
    assert effects.loc["reg", "p"] == pytest.approx(scipy_stats.ttest_1samp(contrasts, 0.0).pvalue)
    assert effects.loc["reg", "p_holm"] < 0.05
    reg_line = next(line for line in report.verdicts if line.startswith("**l2 vs l1**"))
    assert "less polysemantic by macs −0.0" in reg_line
    assert {"conclusions", "seeds_macs", "main_effects_macs", "interactions_macs"} <= set(report.figures)
    assert {"seeds_macs", "main_effects_macs", "interactions_macs"} <= set(report.figures)


TINY = ["--seeds", "2", "--epochs", "20", "--sae-epochs", "10", "--samples", "64", "--no-artifacts"]


def test_report_end_to_end_matches_independent_recomputation(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = CliRunner()
    result = runner.invoke(
        cli.cli, ["sweep", "--preset", "factorial", *TINY, "--tracking-uri", uri, "--experiment", "f"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = runner.invoke(
        cli.cli,
        [
            "report",
            "--tracking-uri",
            uri,
            "--experiment",
            "f",
            "--sweep-id",
            "latest",
            "--out",
            str(out),
            "--resamples",
            "200",
            "--metric",
            "macs",
            "--metric",
            "val_mse",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Factorial effects, blocked on seed" in result.output and "## Conclusions" in result.output
    for name in (
        "comparisons.csv",
        "factorial.csv",
        "conclusions.csv",
        "report.md",
        "report.html",
        "conclusions.png",
        "seeds_macs.png",
        "main_effects_macs.png",
        "interactions_val_mse.png",
    ):
        assert (out / name).exists(), name
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # Independent recomputation straight from the store's seed runs.
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("f").experiment_id
    seed_runs = client.search_runs([experiment_id], "tags.kind = 'seed' and attributes.status = 'FINISHED'")
    rows = [
        {
            **{factor: run.data.tags[factor] for factor in FACTOR_LEVELS},
            "config": run.data.tags["config_name"],
            "seed": int(run.data.tags["seed"]),
            "val_mse": run.data.metrics["val_mse"],
            "macs": run.data.metrics["macs"],
        }
        for run in seed_runs
    ]
    store_frame = pd.DataFrame(rows)
    assert len(store_frame) == 32

    # Configurations share seeds, so the comparison is the paired t-test on seed-aligned values.
    comparisons = pd.read_csv(out / "comparisons.csv")
    row = comparisons[
        (comparisons["metric"] == "val_mse") & (comparisons["config_a"] == "orthogonal·bipolar·l2·gelu")
    ].iloc[0]
    by_seed = store_frame.pivot(index="seed", columns="config", values="val_mse")
    a, b = by_seed["orthogonal·bipolar·l2·gelu"], by_seed[BASELINE_NAME]
    paired = scipy_stats.ttest_rel(a, b)
    assert row["test"] == "paired t" and row["effect_size"] == "d_z"
    assert row["t"] == pytest.approx(paired.statistic, rel=1e-9, abs=1e-9)
    assert row["p"] == pytest.approx(paired.pvalue, rel=1e-9, abs=1e-9)
    assert row["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-9, abs=1e-12)
    assert row["d"] == pytest.approx((a - b).mean() / (a - b).std(ddof=1), rel=1e-9)
    assert "d_z" in result.output and "Cohen's d with pooled SD" not in result.output

    factorial = pd.read_csv(out / "factorial.csv")
    assert len(factorial) == 30
    coded = store_frame.copy()
    for factor, (_low, high) in FACTOR_LEVELS.items():
        coded[factor] = np.where(coded[factor] == high, 1.0, -1.0)
    # Seed-blocked: the init contrast of macs within each seed, then a one-sample t across the seeds.
    contrasts = [
        rows.loc[rows["init"] == 1, "macs"].mean() - rows.loc[rows["init"] == -1, "macs"].mean()
        for _, rows in coded.groupby("seed")
    ]
    effect = factorial[(factorial["metric"] == "macs") & (factorial["effect"] == "init")].iloc[0]
    assert effect["p"] == pytest.approx(scipy_stats.ttest_1samp(contrasts, 0.0).pvalue, rel=1e-9)
    assert effect["estimate"] == pytest.approx(np.mean(contrasts), rel=1e-9)
    assert effect["contrast"] == "orthogonal vs random"
    # The pooled OLS stays only as a labelled secondary column.
    fit = smf.ols("val_mse ~ init * noise * reg * act", data=coded).fit()
    anova = anova_lm(fit, typ=2)
    pooled = factorial[(factorial["metric"] == "val_mse") & (factorial["effect"] == "reg:act")].iloc[0]
    assert pooled["p_pooled_ols"] == pytest.approx(anova.loc["reg:act", "PR(>F)"], rel=1e-9)

    analysis = client.search_runs([experiment_id], "tags.kind = 'analysis'")
    assert len(analysis) == 1 and analysis[0].info.status == "FINISHED"
    assert "tags.kind = 'seed'" in analysis[0].data.params["query"]
    logged = {artifact.path for artifact in client.list_artifacts(analysis[0].info.run_id)}
    assert {"comparisons.csv", "factorial.csv", "report.md", "report.html"} <= logged


def test_report_on_a_missing_experiment_is_a_usage_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(cli.cli, ["report", "--tracking-uri", uri, "--experiment", "nothing-here"])
    assert result.exit_code == 2 and "--experiment 'nothing-here' does not exist" in result.output


def test_a_factorial_at_two_sae_architectures_gets_the_effects_by_architecture_section():
    """The SAE × training study's report: with a complete 2⁴ factorial at each of two architectures, the
    report estimates each factor's effect per architecture and tests the difference paired on seed."""
    cells = list(itertools.product(*FACTOR_LEVELS.values()))
    frames = []
    for architecture, effect in (("leaky_relu", -0.05), ("topk", 0.0)):
        frame = synthetic_seeds(cells, seeds=4, effect_of_reg=effect)
        frame["sae.architecture"] = architecture
        frame["config"] = frame["config"] + f" · architecture={architecture}"
        frame["config_hash"] = frame["config"]  # one identity per configuration, as the store gives
        # synthetic_seeds draws the same noise every call; an architecture's SAE adds its own
        frame["macs"] += np.random.default_rng(len(frames) + 1).normal(0, 0.01, len(frame))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    report = build_report(
        table, metrics=["macs"], baseline="random·bipolar·l1·relu · architecture=leaky_relu", n_resamples=200
    )
    assert report.moderation is not None and "effects_by_architecture" in report.figures
    reg = report.moderation[report.moderation["effect"] == "reg"].set_index("level")
    assert reg.loc["leaky_relu", "reference"] == "leaky_relu"
    assert reg.loc["leaky_relu", "estimate"] == pytest.approx(-0.05, abs=0.01)
    assert reg.loc["topk", "difference"] == pytest.approx(0.05, abs=0.01)
    assert reg.loc["topk", "difference_p_holm"] < 0.05
    assert any(line.startswith("macs (4 seeds): ") for line in report.moderation_readings)
    assert "Do the training factors' effects persist" in report.markdown()


def test_one_setting_at_two_levels_compares_means_and_paired_seed_variances():
    """The clipping study's section: per configuration, the paired t of the means and the Pitman–Morgan
    test of the seed variances, each checked against scipy (pearsonr of sums and differences)."""
    generator = np.random.default_rng(5)
    rows = []
    cells = [("random", "bipolar", "l1", "relu"), ("orthogonal", "bipolar", "l2", "gelu")]
    for cell in cells:
        for seed in range(12):
            shared = generator.normal(0, 1)  # seed k of both levels shares its random numbers
            for clip, spread in (("0.0", 1.0), ("1.0", 0.3)):
                value = 5 + shared * spread + generator.normal(0, 0.05) + (0.4 if clip == "1.0" else 0)
                name = "·".join(cell) + f" · clip={clip}"
                rows.append(
                    {
                        "config": name,
                        "config_hash": name,
                        **dict(zip(FACTOR_LEVELS, cell, strict=True)),
                        "sae.grad_clip": clip,
                        "seed": seed,
                        "status": "FINISHED",
                        "sae_fvu": value,
                    }
                )
    table = pd.DataFrame(rows)
    report = build_report(
        table,
        metrics=["sae_fvu"],
        baseline="random·bipolar·l1·relu · clip=0.0",
        n_resamples=200,
        figures=False,
    )
    assert report.two_levels is not None and len(report.two_levels) == 2
    for row in report.two_levels.itertuples():
        cell = table[table["config"].str.startswith(row.config + " ·")]
        wide = cell.pivot(index="seed", columns="sae.grad_clip", values="sae_fvu")
        x, y = wide["1.0"], wide["0.0"]
        assert row.mean_difference == pytest.approx((x - y).mean())
        assert row.variance_ratio == pytest.approx(x.var(ddof=1) / y.var(ddof=1))
        assert row.variance_p == pytest.approx(scipy_stats.pearsonr(x + y, x - y).pvalue)
        assert row.variance_ratio < 0.2 and row.variance_p_holm < 0.05
    assert "clearly narrower in 2" in report.two_levels_readings[0]
