"""Every command against a real `mlflow server` over HTTP, as a lab shares one.

The server has a database backend and `--serve-artifacts`, so a client needs nothing but HTTP: no
shared filesystem, nothing written in its working directory. Also: a server that is down, credentials
in the URI, and basic-auth with the credentials taken from the environment and never recorded.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
from pipeline.config import preset_configs
from pipeline.evaluation import METRIC_NAMES

# Fixtures served_sweep, auth_server and unused_port; not imported, so that pytest rewrites its asserts.
pytest_plugins = ["tests.servers"]

TINY = ["--seeds", "2", "--epochs", "20", "--sae-epochs", "10", "--samples", "64"]

CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, list(arguments))


def local_store_files(folder: Path) -> list[str]:
    """What a client would have written had it used a local store instead of the server."""
    return [name for name in ("mlruns", "mlartifacts", "mlflow.db") if (folder / name).exists()]


def runs_of_kind(client: MlflowClient, experiment_id: str, kind: str) -> list:
    return client.search_runs([experiment_id], f"tags.kind = '{kind}'", max_results=1000)


@pytest.fixture
def client_folder(tmp_path, monkeypatch) -> Path:
    """An empty working directory, with no tracking settings inherited from the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    # MLflow's client would retry a failing request for minutes; fail in seconds instead.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    return tmp_path


def test_sweep_over_http_records_everything_on_the_server(served_sweep, tmp_path):
    server = served_sweep.server
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(served_sweep.experiment)
    # Artifacts go through the server's proxy, not to a path the client would have to reach.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    ablations = runs_of_kind(client, experiment.experiment_id, "ablation")
    seeds = runs_of_kind(client, experiment.experiment_id, "seed")
    sweeps = runs_of_kind(client, experiment.experiment_id, "sweep")
    assert len(ablations) == 8 and len(seeds) == 16 and len(sweeps) == 1
    assert all(run.info.status == "FINISHED" for run in ablations + seeds + sweeps)
    assert {run.info.run_name for run in ablations} == {config.name for config in preset_configs("strategic")}
    assert {run.data.tags["mlflow.parentRunId"] for run in seeds} == {run.info.run_id for run in ablations}

    seed_run = seeds[0]
    overlap = Path(client.download_artifacts(seed_run.info.run_id, "overlap.png", str(tmp_path)))
    assert overlap.read_bytes().startswith(PNG_SIGNATURE)
    checkpoint = client.download_artifacts(seed_run.info.run_id, "checkpoint/seed.pt", str(tmp_path))
    assert torch.load(checkpoint, weights_only=True)["seed"] == int(seed_run.data.tags["seed"])

    # The files live under the server's --artifacts-destination; the client's working directory is empty.
    assert list(served_sweep.client_folder.iterdir()) == []
    stored = [path for path in server.artifacts.rglob("*") if path.is_file()]
    assert sum(path.name == "overlap.png" for path in stored) == 16
    assert sum(path.name == "seed.pt" for path in stored) == 16
    assert not server.artifacts.is_relative_to(served_sweep.client_folder)
    assert "random·bipolar·l1·relu" in served_sweep.output


def test_inspect_over_http_reproduces_the_metrics(served_sweep, client_folder):
    client = MlflowClient(served_sweep.server.uri)
    experiment_id = client.get_experiment_by_name(served_sweep.experiment).experiment_id
    seed_run = runs_of_kind(client, experiment_id, "seed")[0]
    result = invoke("inspect", seed_run.info.run_id, "--tracking-uri", served_sweep.server.uri)
    assert result.exit_code == 0, result.output
    count = len(METRIC_NAMES)
    assert f"{count}/{count} metrics reproduced from the checkpoint" in result.output

    ablation = runs_of_kind(client, experiment_id, "ablation")[0]
    result = invoke("inspect", ablation.info.run_id, "--tracking-uri", served_sweep.server.uri)
    assert result.exit_code == 0 and "finished" in result.output
    assert local_store_files(client_folder) == []


def test_report_over_http_logs_an_analysis_run(served_sweep, client_folder):
    uri = served_sweep.server.uri
    out = client_folder / "report"
    result = invoke(
        "report",
        "--tracking-uri",
        uri,
        "--experiment",
        served_sweep.experiment,
        "--sweep-id",
        "latest",
        "--resamples",
        "200",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    run_id = re.search(r"Logged as analysis run ([0-9a-f]{32})", result.output).group(1)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "analysis"
    logged = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"report.md", "report.html", "comparisons.csv"} <= logged
    assert (out / "report.md").is_file()
    assert sorted(path.name for path in client_folder.iterdir()) == ["report"]


def test_a_server_that_is_down_exits_2_and_writes_nothing(client_folder, unused_port):
    uri = f"http://127.0.0.1:{unused_port}"  # nothing listens there
    result = invoke("sweep", "--preset", "strategic", *TINY, "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    assert "--tracking-uri" in result.output and "unreachable" in result.output
    assert list(client_folder.iterdir()) == []


def test_credentials_in_the_uri_are_refused_and_not_echoed(client_folder, unused_port):
    password = secrets.token_urlsafe(12)
    uri = f"http://someone:{password}@127.0.0.1:{unused_port}"
    result = invoke("sweep", "--preset", "strategic", *TINY, "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    assert "must not carry credentials" in result.output and "MLFLOW_TRACKING_PASSWORD" in result.output
    assert password not in result.output
    assert list(client_folder.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# basic-auth (the `auth_server` fixture is in tests/servers.py)


@pytest.mark.parametrize("credentials", ["missing", "wrong password"])
def test_basic_auth_refuses_missing_or_wrong_credentials_with_exit_2(
    auth_server, credentials, client_folder, monkeypatch
):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    wrong = "not-" + auth_server.password
    if credentials == "wrong password":
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    uri = auth_server.server.uri
    result = invoke("ablate", *TINY, "--tracking-uri", uri, "--experiment", "refused", "--no-artifacts")
    assert result.exit_code == 2, result.output
    assert "HTTP 401" in result.output and "MLFLOW_TRACKING_USERNAME" in result.output
    assert wrong not in result.output and auth_server.password not in result.output
    assert list(client_folder.iterdir()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.admin_password)
    assert MlflowClient(uri).get_experiment_by_name("refused") is None


def test_basic_auth_credentials_come_from_the_environment_and_are_never_recorded(
    auth_server, client_folder, monkeypatch, tmp_path_factory
):
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.password)
    server = auth_server.server
    result = invoke("ablate", *TINY, "--tracking-uri", server.uri, "--experiment", "authenticated")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert list(client_folder.iterdir()) == []

    client = MlflowClient(server.uri)
    experiment_id = client.get_experiment_by_name("authenticated").experiment_id
    runs = client.search_runs([experiment_id], "", max_results=1000)
    assert sorted(run.data.tags["kind"] for run in runs) == ["ablation", "seed", "seed"]
    assert all(run.info.status == "FINISHED" for run in runs)
    credentials = (auth_server.username, auth_server.password)
    downloads = tmp_path_factory.mktemp("downloads")
    checked_files = 0
    for run in runs:
        data = run.data
        texts = [*data.params, *data.params.values(), *data.tags, *data.tags.values(), *data.metrics]
        texts += [run.info.run_name, run.info.user_id]
        assert not [text for text in texts if any(secret in str(text) for secret in credentials)]
        folder = Path(client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id)))
        for path in (path for path in folder.rglob("*") if path.is_file()):
            content = path.read_bytes()
            assert not any(secret.encode() in content for secret in credentials), path
            checked_files += 1
    assert checked_files == 6  # seeds.csv, overlap_grid.png, and overlap.png + checkpoint per seed
    # The same on the server's disk, whatever the API shows.
    for path in (path for path in server.artifacts.rglob("*") if path.is_file()):
        assert not any(secret.encode() in path.read_bytes() for secret in credentials), path
    assert not any(secret in result.output for secret in credentials)
