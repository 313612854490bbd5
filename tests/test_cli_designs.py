"""Designs through the CLI: a grid over any setting, names, params on every run, a report that compares
every configuration and reads the numeric axis as a dose."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import cli
from orchestration.report import ReportRequest, build_and_log_report

TINY = ["--epochs", "20", "--sae-epochs", "10", "--samples", "64"]
LAMBDAS = ("1e-5", "1e-4", "1e-3")


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, list(arguments), catch_exceptions=False)


def runs_of_kind(client: MlflowClient, kind: str) -> list:
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiments, f"tags.kind = '{kind}'", max_results=1000)


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = CliRunner().invoke(
            cli.cli,
            [
                "sweep",
                "--grid",
                f"network.lambda_reg={','.join(LAMBDAS)}",
                "--grid",
                "network.reg=l1,l2",
                "--seeds",
                "3",
                *TINY,
                "--tracking-uri",
                uri,
                "--no-artifacts",
            ],
        )
    assert result.exit_code == 0, result.output
    return uri, folder


def test_grid_sweep_names_every_configuration_and_nests_its_seeds(grid_store):
    uri, _ = grid_store
    client = MlflowClient(uri)
    ablations = runs_of_kind(client, "ablation")
    names = sorted(run.info.run_name for run in ablations)
    expected = sorted(
        f"random·bipolar·{reg}·relu · λ={float(value):g}" for value in LAMBDAS for reg in ("l1", "l2")
    )
    assert names == expected
    seeds = runs_of_kind(client, "seed")
    for ablation in ablations:
        children = [run for run in seeds if run.data.tags[MLFLOW_PARENT_RUN_ID] == ablation.info.run_id]
        assert sorted(int(run.data.params["seed"]) for run in children) == [0, 1, 2]
        # A tag per axis, with the value the run was trained at.
        assert ablation.data.tags["network.lambda_reg"] == ablation.data.params["network.lambda_reg"]
        assert ablation.data.tags["network.reg"] in ("l1", "l2")
    assert client.get_experiment(ablations[0].info.experiment_id).name == "taming"


def test_search_runs_filters_on_any_setting(grid_store):
    uri, _ = grid_store
    mlflow.set_tracking_uri(uri)
    try:
        frame = mlflow.search_runs(
            experiment_names=["taming"], filter_string="params.`network.lambda_reg` = '0.001'"
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(frame["tags.kind"]) == ["ablation"] * 2 + ["seed"] * 6
    assert set(frame["params.network.reg"]) == {"l1", "l2"}
    assert set(frame["params.network.lambda_reg"]) == {"0.001"}


def test_report_compares_every_configuration_and_reads_lambda_as_a_dose(grid_store, tmp_path):
    uri, _ = grid_store
    result = build_and_log_report(
        ReportRequest(tracking_uri=uri, out_dir=str(tmp_path / "report"), log=False)
    )
    report = result.report
    # No configuration is the published baseline: the one closest to the defaults (λ = 1e-4, L1) is.
    assert report.baseline == "random·bipolar·l1·relu · λ=0.0001"
    assert set(report.comparisons["config_a"]) == set(report.per_seed["config"]) - {report.baseline}
    assert report.per_seed["config"].nunique() == 6
    tests = report.dose_tests
    assert set(tests["group"]) == {"reg=l1", "reg=l2"} and set(tests["metric"]) == set(report.metrics)
    assert (tests["seeds"] == 3).all() and (tests["levels"] == 3).all()
    figure = report.figures["dose_response_lambda_reg"]
    assert all(axis.get_xscale() == "log" for axis in figure.axes if axis.has_data())
    assert (tmp_path / "report" / "dose_response_tests.csv").exists()
    markdown = report.markdown()
    assert "Dose–response" in markdown and "macs vs λ (reg=l1)" in markdown


def test_three_ablate_runs_at_three_lambdas_are_three_configurations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for value in LAMBDAS:
        result = invoke(
            "ablate", "--lambda-reg", value, "--seeds", "2", *TINY, "--tracking-uri", uri, "--no-artifacts"
        )
        assert result.exit_code == 0, result.output
    names = sorted(run.info.run_name for run in runs_of_kind(MlflowClient(uri), "ablation"))
    # λ = 1e-4 is the default, so that run is the baseline's name; the others say their λ.
    assert names == sorted(
        ["random·bipolar·l1·relu · λ=1e-05", "random·bipolar·l1·relu", "random·bipolar·l1·relu · λ=0.001"]
    )
    result = invoke("report", "--tracking-uri", uri, "--no-log", "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    assert "random·bipolar·l1·relu · λ=0.001" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ablate", "--lambda-reg", "1e-3", "--lambda-reg", "1e-4"], "--lambda-reg was given 2 times"),
        (["sweep", "--grid", "network.lamda_reg=1"], "unknown setting 'network.lamda_reg' in --grid"),
        (["sweep", "--grid", "network.reg=l1,l3"], "network.reg in --grid must be one of none, l1, l2"),
        (["sweep", "--grid", "network.reg"], "--grid takes FIELD=VALUE"),
        (["sweep", "--set", "sae.d_sae=many"], "sae.d_sae in --set must be an integer"),
        (
            ["sweep", "--preset", "strategic", "--init", "orthogonal"],
            "network.init varies in design 'strategic'",
        ),
        (["sweep", "--design", "strategic", "--preset", "factorial"], "give --design or --preset, not both"),
        (["sweep", "--design", "no/such/file.toml"], "design file no/such/file.toml does not exist"),
        (["ablate", "--lambda-reg", "-1"], "--lambda-reg: network.lambda_reg must be >= 0"),
        (["ablate", "--sigma", "inf"], "--sigma: network.sigma must be a finite number"),
    ],
)
def test_bad_designs_exit_2_and_write_nothing(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli.cli, [*arguments, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
