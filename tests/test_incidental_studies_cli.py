"""`incidental cooccurrence` and `incidental splitting` end to end into temporary SQLite stores: what lands,
resuming, the report's sections and figures regenerated from the stored runs, and bad input."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import cli

TINY_COOCCURRENCE = [
    "--n", "8", "--m", "4,8,16", "--p", "0,0.05,0.3", "--instances", "3", "--steps", "300",
    "--curve-every", "100", "--batch-size", "16",
]  # fmt: skip
TINY_SPLITTING = [
    "--n", "12", "--m", "24", "--epsilon", "0,0.03", "--instances", "4", "--steps", "1200",
    "--extra-steps", "600", "--measure-every", "200",
]  # fmt: skip


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, ["incidental", *arguments], catch_exceptions=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        outputs = {}
        for command, arguments in (("cooccurrence", TINY_COOCCURRENCE), ("splitting", TINY_SPLITTING)):
            result = invoke(command, *arguments, "--tracking-uri", uri)
            assert result.exit_code == 0, result.output
            outputs[command] = result.output
    return uri, folder, outputs


def points(client: MlflowClient, command: str) -> list:
    experiment_id = client.get_experiment_by_name("incidental").experiment_id
    query = f"tags.kind = 'point' and tags.command = '{command}'"
    return client.search_runs([experiment_id], query, max_results=1000)


def test_cooccurrence_points_land_with_their_data_settings(store):
    uri, folder, outputs = store
    client = MlflowClient(uri)
    runs = points(client, "cooccurrence")
    assert sorted((int(r.data.params["m"]), float(r.data.params["p"])) for r in runs) == [
        (m, p) for m in (4, 8, 16) for p in (0.0, 0.05, 0.3)
    ]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["data"] == "bernoulli"
        assert run.data.params["batch_size"] == "16"
        assert {"data_loss", "features_per_neuron", "polysemantic_neurons_last_quarter_range"} <= set(
            run.data.metrics
        )
        assert "convergence" not in run.data.tags  # the sparsity check does not apply to these points
    assert "polysemantic_neurons" in outputs["cooccurrence"]


def test_splitting_arms_land_with_their_tables(store, tmp_path):
    uri, folder, outputs = store
    client = MlflowClient(uri)
    runs = points(client, "splitting")
    assert sorted(run.data.tags["arm"] for run in runs) == [
        "baseline (no split)",
        "split ε=0",
        "split ε=0.03",
    ]
    for run in runs:
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "per_instance.csv",
            "checkpoints.csv",
            "splits.csv",
        }
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_instance.csv", str(tmp_path)))
        assert run.data.metrics["resolved_fraction"] == pytest.approx(
            table["resolved"].sum() / table["split"].sum()
        )
        history = client.get_metric_history(run.info.run_id, "curve.resolved_fraction")
        assert sorted(point.step for point in history) == [0, 200, 400, 600]
    assert "resolved_fraction" in outputs["splitting"]


def test_rerun_reuses_every_point(store):
    uri, folder, _ = store
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = invoke("splitting", *TINY_SPLITTING, "--tracking-uri", uri)
    assert result.exit_code == 0 and "Reused 3 of 3 arm(s)" in result.output


def test_report_regenerates_both_sections_and_figures_from_the_store(store, tmp_path):
    uri, folder, _ = store
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = invoke(
            "report", "--tracking-uri", uri, "--out", str(tmp_path / "report"), "--resamples", "200"
        )
    assert result.exit_code == 0, result.output
    written = {path.name for path in (tmp_path / "report").iterdir()}
    assert {"cooccurrence.png", "splitting.png", "cooccurrence_crossover.csv", "splitting.csv"} <= written
    assert "## Co-occurring features" in result.output and "## The splitting remedy" in result.output
    arms = pd.read_csv(tmp_path / "report" / "splitting.csv")
    assert arms.loc[arms["arm"] == "baseline (no split)", "resolved_fraction"].item() == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["cooccurrence", "--p", "1.5"], "--p"),
        (["cooccurrence", "--p", "0,abc"], "--p"),
        (["cooccurrence", "--batch-size", "0"], "--batch-size"),
        (["cooccurrence", "--m", "0"], "--m"),
        (["splitting", "--epsilon", "-0.1"], "--epsilon"),
        (["splitting", "--extra-steps", "0"], "--extra-steps"),
        (["splitting", "--optimizer", "sgd", "--weight-decay", "0.01"], "--weight-decay"),
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
