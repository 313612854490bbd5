"""The incidental study's tracking and CLI layer, end to end into temporary SQLite stores.

Every stored number is checked against something computed here independently: the per-instance CSV,
n²/(4m), scipy.stats.linregress on the run metrics.
"""

from __future__ import annotations

import math

import click
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
from pipeline.experiments.incidental import collisions_points, run_point
from tracking.incidental import track_points
from tracking.store import open_store

# Small enough for a few seconds per command, large enough that every m has polysemantic neurons, and long
# enough that every point converges (encoding sparsity 1.000 at m = n = 24 by step 2000, measured).
TINY_COLLISIONS = [
    "--n", "24", "--m", "24,48", "--m", "96", "--l1", "1e-2", "--instances", "4", "--steps", "2400",
    "--lr", "1e-2", "--curve-every", "200",
]  # fmt: skip
# Too short for m = n: at lr 5e-3 the encodings at m = 24 reach sparsity 0.95 by step 2000 (measured), those at
# m ≥ 96 reach 1.000 by step 1500; m = 384 ends with no polysemantic neuron at this seed.
SHORT_COLLISIONS = [
    "--n", "24", "--m", "24,96,192,384", "--l1", "1e-2", "--instances", "4", "--steps", "2000",
    "--lr", "5e-3", "--curve-every", "500",
]  # fmt: skip
TINY_NOISE = [
    "--noise", "bipolar,gaussian", "--noise", "laplace", "--sigma", "0.15", "--instances", "3",
    "--steps", "300", "--curve-every", "50",
]  # fmt: skip
TINY_DYNAMICS = ["--m", "400", "--l1", "1e-2", "--l1", "2e-2", "--t-max-times-l1", "2.5"]
POINT_METRICS = (
    "polysemantic_neurons",
    "polysemantic_neurons_std",
    "predicted_polysemantic_neurons",
    "fourth_norm",
    "initial_collisions",
    "winner_was_initial_argmax",
)


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, ["incidental", *arguments], catch_exceptions=False)


def runs(client: MlflowClient, query: str, experiment: str = "incidental") -> list:
    """Runs of one experiment (the tests below share a store, each in its own experiment)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], query, max_results=1000)


def artifact_csv(client: MlflowClient, run_id: str, path: str, folder) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, path, str(folder)))


@pytest.fixture(autouse=True)
def in_temporary_folder(tmp_path, monkeypatch):
    """A SQLite store keeps artifacts under ./mlruns of the folder it was created from: keep them in tmp."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One store holding a tiny run of each command, shared by the checks below (each test that writes
    more uses its own experiment)."""
    folder = tmp_path_factory.mktemp("incidental")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    outputs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for command, arguments in (
            ("collisions", TINY_COLLISIONS),
            ("noise", TINY_NOISE),
            ("dynamics", TINY_DYNAMICS),
        ):
            result = invoke(command, *arguments, "--tracking-uri", uri)
            assert result.exit_code == 0, result.output
            outputs[command] = result.output
    return uri, outputs, folder


def test_collisions_points_land_with_documented_params_metrics_and_artifacts(study):
    uri, outputs, folder = study
    client = MlflowClient(uri)
    points = runs(client, "tags.kind = 'point' and tags.command = 'collisions'")
    assert sorted(int(run.data.params["m"]) for run in points) == [24, 48, 96]
    (sweep,) = runs(client, "tags.kind = 'sweep' and tags.command = 'collisions'")
    assert sweep.info.status == "FINISHED" and sweep.data.tags["study"] == "incidental"
    assert sweep.info.experiment_id == client.get_experiment_by_name("incidental").experiment_id
    for run in points:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["study"] == "incidental" and tags["sweep_id"] == sweep.data.tags["sweep_id"]
        assert tags["mlflow.parentRunId"] == sweep.info.run_id
        assert (params["n"], params["l1"], params["noise"], params["sigma"]) == ("24", "0.01", "none", "0.0")
        assert (params["optimizer"], params["steps"], params["instances"]) == ("adamw", "2400", "4")
        assert set(POINT_METRICS) <= set(metrics)
        m = int(params["m"])
        assert metrics["predicted_polysemantic_neurons"] == pytest.approx(24**2 / (4 * m))
        # The summary metrics are the mean and sample std of the per-instance table.
        table = artifact_csv(client, run.info.run_id, "per_instance.csv", folder)
        assert list(table["instance"]) == [0, 1, 2, 3]
        for name in (
            "polysemantic_neurons",
            "fourth_norm",
            "initial_collisions",
            "winner_was_initial_argmax",
        ):
            assert metrics[name] == pytest.approx(table[name].mean(), rel=1e-12)
        assert metrics["polysemantic_neurons_std"] == pytest.approx(table["polysemantic_neurons"].std(ddof=1))
        # Curves are step series: step 0 (init) and every 200 steps up to 2400.
        for curve in ("curve.loss", "curve.fourth_norm", "curve.polysemantic_neurons"):
            history = client.get_metric_history(run.info.run_id, curve)
            assert sorted(point.step for point in history) == list(range(0, 2401, 200))
        # Every instance sparsified: the flag on the run agrees with the per-instance table.
        assert (table["encoding_sparsity"] >= 0.98).all()
        assert metrics["converged"] == 1.0 and tags["convergence"] == "converged"
        final = max(client.get_metric_history(run.info.run_id, "curve.fourth_norm"), key=lambda p: p.step)
        assert final.value == pytest.approx(metrics["fourth_norm"], rel=1e-5)
    assert {a.path for a in client.list_artifacts(sweep.info.run_id)} == {"collisions.csv", "collisions.png"}
    summary = artifact_csv(client, sweep.info.run_id, "collisions.csv", folder)
    assert set(summary["run_id"]) == {run.info.run_id for run in points}
    # A first run reuses nothing (tests/test_incidental_resume.py covers re-runs).
    assert not summary["reused"].any() and sweep.data.metrics["points_trained"] == 3
    assert sweep.data.metrics["points_reused"] == sweep.data.metrics["points_retired"] == 0
    assert "loglog_slope" in sweep.data.metrics and "log–log slope" in outputs["collisions"]
    assert "nconverged" not in outputs["collisions"] and sweep.data.metrics["unconverged_points"] == 0


def test_noise_and_dynamics_points_land(study):
    uri, outputs, folder = study
    client = MlflowClient(uri)
    noise_points = runs(client, "tags.kind = 'point' and tags.command = 'noise'")
    assert sorted(run.data.params["noise"] for run in noise_points) == ["bipolar", "gaussian", "laplace"]
    for run in noise_points:
        assert run.info.status == "FINISHED"
        assert (run.data.params["sigma"], run.data.params["optimizer"], run.data.params["l1"]) == (
            "0.15",
            "sgd",
            "0.0",
        )
        history = client.get_metric_history(run.info.run_id, "curve.fourth_norm")
        assert sorted(point.step for point in history) == list(range(0, 301, 50))
    (noise_sweep,) = runs(client, "tags.kind = 'sweep' and tags.command = 'noise'")
    assert {a.path for a in client.list_artifacts(noise_sweep.info.run_id)} == {
        "noise.csv",
        "fourth_norm.png",
    }
    assert "laplace" in outputs["noise"]

    dynamics_points = runs(client, "tags.kind = 'point' and tags.command = 'dynamics'")
    assert sorted(float(run.data.params["l1"]) for run in dynamics_points) == [0.01, 0.02]
    for run in dynamics_points:
        l1 = float(run.data.params["l1"])
        assert run.info.status == "FINISHED" and float(run.data.params["t_max"]) == pytest.approx(2.5 / l1)
        simulation = artifact_csv(client, run.info.run_id, "simulation.csv", folder)
        expected = 1 / (1 / math.sqrt(400) + l1 * simulation["t"])
        assert np.allclose(simulation["predicted_l1_norm"], expected)
        history = client.get_metric_history(run.info.run_id, "curve.l1_norm")
        assert len(history) == len(simulation) and max(p.step for p in history) == round(2.5 / l1 / 0.5)
        assert run.data.metrics["completion_time_times_l1"] > 0
    (dynamics_sweep,) = runs(client, "tags.kind = 'sweep' and tags.command = 'dynamics'")
    assert {a.path for a in client.list_artifacts(dynamics_sweep.info.run_id)} == {
        "dynamics.csv",
        "sparsification.png",
    }


def test_report_recomputes_the_slope_from_the_run_metrics(study, tmp_path):
    uri, _, _ = study
    client = MlflowClient(uri)
    out = tmp_path / "report"
    result = invoke("report", "--tracking-uri", uri, "--out", str(out), "--resamples", "200")
    assert result.exit_code == 0, result.output

    points = runs(client, "tags.kind = 'point' and tags.command = 'collisions'")
    ms = np.array([float(run.data.params["m"]) for run in points])
    counts = np.array([run.data.metrics["polysemantic_neurons"] for run in points])
    assert (counts > 0).sum() >= 2
    converged = np.array([run.data.tags["convergence"] == "converged" for run in points])
    assert converged.all()
    keep = counts > 0
    expected = scipy.stats.linregress(np.log(ms[keep]), np.log(counts[keep]))

    (analysis,) = runs(client, "tags.kind = 'analysis'")
    assert analysis.info.status == "FINISHED" and analysis.data.tags["study"] == "incidental"
    assert analysis.data.metrics["loglog_slope"] == pytest.approx(expected.slope, rel=1e-9)
    slopes = pd.read_csv(out / "collisions_slope.csv")
    assert slopes["slope"].iloc[0] == pytest.approx(expected.slope, rel=1e-9)
    assert slopes["intercept"].iloc[0] == pytest.approx(expected.intercept, rel=1e-9)

    # The noise comparison is Welch's t-test on the per-instance fourth norms, Gaussian as baseline.
    comparisons = pd.read_csv(out / "noise_comparisons.csv")
    noise_runs = {
        run.data.params["noise"]: run
        for run in runs(client, "tags.kind = 'point' and tags.command = 'noise'")
    }
    tables = {
        noise: artifact_csv(client, run.info.run_id, "per_instance.csv", tmp_path)
        for noise, run in noise_runs.items()
        if noise in ("bipolar", "gaussian")
    }
    welch = scipy.stats.ttest_ind(
        tables["bipolar"]["fourth_norm"], tables["gaussian"]["fourth_norm"], equal_var=False
    )
    row = comparisons[(comparisons["metric"] == "fourth_norm") & (comparisons["config_a"] == "bipolar")]
    assert row["config_b"].iloc[0] == "gaussian" and row["p"].iloc[0] == pytest.approx(welch.pvalue)

    logged = {artifact.path for artifact in client.list_artifacts(analysis.info.run_id)}
    assert {"report.md", "collisions.csv", "noise_comparisons.csv", "dynamics.csv"} <= logged
    assert {"collisions.png", "fourth_norm.png", "sparsification.png"} <= logged
    assert {path.name for path in out.iterdir()} == logged
    assert "n²/(4m)" in (out / "report.md").read_text()


def test_short_training_names_unconverged_points_and_fits_without_them(study, tmp_path):
    uri = study[0]
    result = invoke("collisions", *SHORT_COLLISIONS, "--experiment", "short", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    points = {int(run.data.params["m"]): run for run in runs(client, "tags.kind = 'point'", "short")}
    # Reapply the criterion here to the stored per-instance values: every instance at sparsity ≥ 0.98.
    tables = {
        m: artifact_csv(client, run.info.run_id, "per_instance.csv", tmp_path) for m, run in points.items()
    }
    sparse = {m: bool((table["encoding_sparsity"] >= 0.98).all()) for m, table in tables.items()}
    assert not sparse[24]  # m = n sparsifies slowest (measured): most features contest their neuron
    assert sparse[96] and sparse[192]
    for m, run in points.items():
        assert run.data.metrics["converged"] == float(sparse[m])
        assert run.data.tags["convergence"].startswith("converged" if sparse[m] else "unconverged: ")
    output = result.output
    assert "Unconverged: n = 24, λ = 0.01, m = 24 after 2000 steps" in output
    assert "left out of the slope fit" in output and "rerun with more steps, e.g. --steps 12000" in output
    # The slope is fitted on the converged points with a positive count only, by scipy here.
    usable = [m for m in sorted(points) if sparse[m] and points[m].data.metrics["polysemantic_neurons"] > 0]
    assert 24 not in usable and len(usable) >= 2
    expected = scipy.stats.linregress(
        np.log(usable), np.log([points[m].data.metrics["polysemantic_neurons"] for m in usable])
    )
    (sweep,) = runs(client, "tags.kind = 'sweep'", "short")
    assert sweep.data.metrics["loglog_slope"] == pytest.approx(expected.slope, rel=1e-9)
    assert sweep.data.metrics["loglog_slope_points"] == len(usable)
    assert sweep.data.metrics["unconverged_points"] == sum(not flag for flag in sparse.values())
    assert f"log–log slope {expected.slope:.3f}" in output and "m = 24 unconverged" in output

    # The report names them too, in its markdown and in the slope table's note.
    out = tmp_path / "report"
    sweep_id = sweep.data.tags["sweep_id"]
    arguments = ["--experiment", "short", "--sweep-id", sweep_id, "--out", str(out), "--no-log"]
    report = invoke("report", *arguments, "--tracking-uri", uri)
    assert report.exit_code == 0, report.output
    markdown = (out / "report.md").read_text()
    assert "### Unconverged points" in markdown and "m = 24 after 2000 steps" in markdown
    slopes = pd.read_csv(out / "collisions_slope.csv")
    assert slopes["slope"].iloc[0] == pytest.approx(expected.slope, rel=1e-9)
    assert "m = 24 unconverged" in slopes["note"].iloc[0]


def test_slope_without_usable_points_says_why(study):
    # 200 steps leave every encoding dense: no point can enter the fit, and the command says why (exit 0).
    arguments = ["--n", "24", "--m", "24,48", "--instances", "2", "--steps", "200", "--experiment", "dense"]
    result = invoke("collisions", *arguments, "--tracking-uri", study[0])
    assert result.exit_code == 0, result.output
    assert "no log–log slope: 0 usable point(s) of 2, a fit needs 2" in result.output
    assert "m = 24, 48 unconverged" in result.output and "slope nan" not in result.output


def test_one_instance_skips_undefined_metrics(study):
    uri = study[0]
    arguments = ["--m", "12", "--instances", "1", "--steps", "200", "--experiment", "one-instance"]
    result = invoke("collisions", *arguments, "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (point,) = runs(client, "tags.kind = 'point'", "one-instance")
    assert point.info.status == "FINISHED" and "polysemantic_neurons_std" not in point.data.metrics
    assert "polysemantic_neurons" in point.data.metrics
    assert runs(client, "tags.kind = 'sweep'", "one-instance")[0].info.status == "FINISHED"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["collisions", "--m", "0"], "--m"),
        (["collisions", "--m", "64,abc"], "--m"),
        (["collisions", "--m", "64:8:8"], "--m"),
        (["collisions", "--l1", "-1e-3"], "--l1"),
        (["collisions", "--steps", "0"], "--steps"),
        (
            ["collisions", "--optimizer", "sgd", "--weight-decay", "0.01"],
            "--weight-decay: weight_decay applies to",
        ),
        (["noise", "--noise", "cauchy"], "--noise"),
        (["noise", "--noise", "bipolar,cauchy"], "--noise"),
        (["noise", "--sigma", "-0.1"], "--sigma"),
        (["noise", "--sigma", "0"], "--sigma"),
        (["noise", "--nu", "2"], "--nu"),
        (["dynamics", "--l1", "0"], "--l1"),
        (["dynamics", "--t-max-times-l1", "0.5"], "--t-max-times-l1"),
        (["report"], "no store there yet"),
    ],
)
def test_bad_input_exits_2_and_writes_no_store(tmp_path, arguments, message):
    database = tmp_path / "mlflow.db"
    result = CliRunner().invoke(
        cli.cli, ["incidental", *arguments, "--tracking-uri", f"sqlite:///{database}"]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not database.exists()


@pytest.mark.parametrize("command", ["collisions", "noise", "dynamics", "report"])
def test_unreachable_tracking_uri_exits_2(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(cli.cli, ["incidental", command, "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "--tracking-uri" in result.output and "unreachable" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_exits_2(tmp_path):
    database = tmp_path / "mlflow.db"
    result = invoke("collisions", "--device", "cuda", "--tracking-uri", f"sqlite:///{database}")
    assert result.exit_code == 2 and "--device" in result.output and not database.exists()


def test_list_option_accepts_repeats_commas_and_ranges():
    integers = cli._ListOf(click.IntRange(min=1), ranges=True)
    assert integers.convert("8:32:8", None, None) == (8, 16, 24, 32)
    assert integers.convert("64, 128", None, None) == (64, 128)
    assert cli._flat([(64, 128), (128, 256)]) == [64, 128, 256]


def test_training_failure_marks_point_and_sweep_failed(study):
    store = open_store(study[0])
    experiment_id = store.experiment_id("failure")
    configs = collisions_points(n=8, ms=(8, 16), instances=2, steps=20, curve_every=10)
    calls = {"count": 0}

    def trainer(config):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated divergence")
        return run_point(config)

    with pytest.raises(RuntimeError, match="simulated divergence"):
        track_points(store, experiment_id, "collisions", configs, trainer=trainer)
    client = store.client
    finished = runs(client, "tags.kind = 'point' and attributes.status = 'FINISHED'", "failure")
    failed = runs(client, "tags.kind = 'point' and attributes.status = 'FAILED'", "failure")
    assert len(finished) == 1 and len(failed) == 1
    assert "simulated divergence" in failed[0].data.tags["failure_reason"]
    (sweep,) = runs(client, "tags.kind = 'sweep'", "failure")
    assert sweep.info.status == "FAILED" and "simulated divergence" in sweep.data.tags["failure_reason"]
    # A FINISHED point has every artifact.
    assert [a.path for a in client.list_artifacts(finished[0].info.run_id)] == ["per_instance.csv"]


def test_mlflow_run_hands_over_the_sweep_run(study, monkeypatch, tmp_path):
    uri = study[0]
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("handed-over")
    handed = client.create_run(experiment_id).info.run_id
    client.log_param(handed, "m", "12, 24")  # `mlflow run` logs the entry point's params, as typed
    monkeypatch.setenv("MLFLOW_RUN_ID", handed)
    result = invoke("collisions", "--m", "12,24", "--instances", "2", "--steps", "100", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    (sweep,) = runs(client, "tags.kind = 'sweep'", "handed-over")
    assert sweep.info.run_id == handed and sweep.info.status == "FINISHED"
    points = runs(client, "tags.kind = 'point'", "handed-over")
    assert len(points) == 2 and all(run.data.tags["mlflow.parentRunId"] == handed for run in points)
    assert client.get_run(handed).data.params["m"] == "12, 24"
    assert len(artifact_csv(client, handed, "collisions.csv", tmp_path)) == 2
