"""End to end through the CLI into a temporary SQLite store, checked with MlflowClient."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
import pipeline.experiments.taming as taming_experiments
from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig, preset_configs
from pipeline.evaluation import METRIC_NAMES, load_checkpoint, reevaluate
from tracking import taming as tracking_taming
from tracking.query import load_seed_checkpoint, seed_frame
from tracking.store import open_store
from tracking.taming import run_tracked_sweep

TINY = ["--seeds", "2", "--epochs", "20", "--sae-epochs", "10", "--samples", "64"]


def png_pixels(png: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(png))


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, list(arguments), catch_exceptions=False)


@pytest.fixture
def store_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def runs_of_kind(client: MlflowClient, kind: str, status: str | None = None) -> list:
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    query = f"tags.kind = '{kind}'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs(experiments, query, max_results=1000)


@pytest.fixture(scope="module")
def strategic_store(tmp_path_factory):
    """One tiny strategic sweep shared by the read-only checks below."""
    folder = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # module-scoped: runs before the per-test temporary folder
        result = CliRunner().invoke(
            cli.cli, ["sweep", "--preset", "strategic", *TINY, "--tracking-uri", uri, "--experiment", "e2e"]
        )
    assert result.exit_code == 0, result.output
    return uri, result.output


def test_sweep_run_tree(strategic_store):
    uri, output = strategic_store
    client = MlflowClient(uri)
    ablations = runs_of_kind(client, "ablation")
    seeds = runs_of_kind(client, "seed")
    assert len(ablations) == 8 and len(seeds) == 16
    assert all(run.info.status == "FINISHED" for run in ablations + seeds)
    expected_names = {config.name for config in preset_configs("strategic")}
    assert {run.info.run_name for run in ablations} == expected_names
    by_id = {run.info.run_id: run for run in ablations}
    for seed_run in seeds:
        parent = by_id[seed_run.data.tags["mlflow.parentRunId"]]
        assert seed_run.data.tags["config_hash"] == parent.data.tags["config_hash"]
        assert seed_run.info.run_name == f"{parent.info.run_name} seed {seed_run.data.tags['seed']}"
        assert set(METRIC_NAMES) <= set(seed_run.data.metrics)
        assert {artifact.path for artifact in client.list_artifacts(seed_run.info.run_id)} == {
            "checkpoint",
            "overlap.png",
        }
        history = client.get_metric_history(seed_run.info.run_id, "curve.train_mse")
        assert [point.step for point in history] == [20]
    baseline = next(run for run in ablations if run.info.run_name == "random·bipolar·l1·relu")
    params, tags, metrics = baseline.data.params, baseline.data.tags, baseline.data.metrics
    assert (
        params["network.init"] == "random"
        and params["network.epochs"] == "20"
        and params["seed_list"] == "0,1"
    )
    assert tags["init"] == "random" and tags["act"] == "relu" and tags["preset"] == "strategic"
    assert tags["code_version"].startswith("src-") and len(tags["config_hash"]) == 16
    assert "published baseline" in tags["mlflow.note.content"]
    assert metrics["seeds_finished"] == 2 and metrics["seeds_failed"] == 0
    # Ablation summaries are recomputed here from the seed runs' own metrics.
    children = [run for run in seeds if run.data.tags["mlflow.parentRunId"] == baseline.info.run_id]
    values = [run.data.metrics["macs"] for run in children]
    assert metrics["macs_mean"] == pytest.approx(sum(values) / 2)
    assert metrics["macs_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert {a.path for a in client.list_artifacts(baseline.info.run_id)} == {"seeds.csv", "overlap_grid.png"}
    assert len(runs_of_kind(client, "sweep")) == 1
    assert "random·bipolar·l1·relu" in output and "macs" in output


def test_checkpoint_reproduces_logged_metrics(strategic_store):
    uri, _ = strategic_store
    client = MlflowClient(uri)
    seed_run = runs_of_kind(client, "seed")[0]
    store = open_store(uri)
    saved = load_seed_checkpoint(store, seed_run.info.run_id)
    recomputed = reevaluate(saved)
    for name in METRIC_NAMES:
        assert seed_run.data.metrics[name] == pytest.approx(recomputed[name], rel=1e-9, abs=1e-12)
    result = invoke("inspect", seed_run.info.run_id, "--tracking-uri", uri)
    count = len(METRIC_NAMES)
    assert result.exit_code == 0 and f"{count}/{count} metrics reproduced" in result.output
    ablation = runs_of_kind(client, "ablation")[0]
    result = invoke("inspect", ablation.info.run_id, "--tracking-uri", uri)
    assert result.exit_code == 0 and "finished" in result.output


def test_seed_frame_is_tidy(strategic_store):
    uri, _ = strategic_store
    store = open_store(uri)
    experiment_id = store.existing_experiment_id("e2e")
    frame = seed_frame(store, [experiment_id])
    assert len(frame) == 16 and set(frame["seed"]) == {0, 1}
    assert {"config", "init", "noise", "reg", "act", "config_hash", *METRIC_NAMES} <= set(frame.columns)
    only_l2 = seed_frame(store, [experiment_id], "tags.reg = 'l2'")
    assert len(only_l2) == 8 and set(only_l2["reg"]) == {"l2"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ablate", "--init", "rand"], "'rand' is not one of 'random', 'orthogonal'"),
        (["ablate", "--noise", "laplace"], "--noise"),
        (["ablate", "--seeds", "0"], "--seeds"),
        (["ablate", "--lambda-reg", "-1"], "--lambda-reg"),
        (["ablate", "--sigma", "-0.1"], "--sigma"),
        (["ablate", "--epochs", "0"], "--epochs"),
        (["sweep", "--preset", "all"], "'all' is not one of 'strategic', 'factorial'"),
        (["ablate", "--tracking-uri", "ftp://example.org/x"], "--tracking-uri must start with one of"),
        (["ablate", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
        (["ablate", "--tracking-uri", "sqlite:////no/such/folder/mlflow.db"], "folder that does not exist"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(cli.cli, [*arguments, *TINY[:0]])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_interrupted_sweep_resumes_without_duplicates(store_uri, monkeypatch):
    real = taming_experiments.run_ablations
    calls = {"count": 0}

    def crash_on_second_pass(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(taming_experiments, "run_ablations", crash_on_second_pass)
    arguments = [
        "sweep",
        "--preset",
        "strategic",
        *TINY,
        "--batching",
        "per-config",
        "--tracking-uri",
        store_uri,
    ]
    arguments += ["--no-artifacts"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        invoke(*arguments)
    client = MlflowClient(store_uri)
    assert len(runs_of_kind(client, "ablation", "FINISHED")) == 1
    failed = runs_of_kind(client, "ablation", "FAILED")
    assert len(failed) == 1 and "simulated crash" in failed[0].data.tags["failure_reason"]
    assert runs_of_kind(client, "sweep")[0].info.status == "FAILED"

    monkeypatch.setattr(taming_experiments, "run_ablations", real)
    result = invoke(*arguments)
    assert result.exit_code == 0 and "Reused 1 FINISHED configuration" in result.output
    finished = runs_of_kind(client, "ablation", "FINISHED")
    assert len(finished) == 8
    assert len({run.data.tags["config_hash"] for run in finished}) == 8

    # --force retrains and retires the older run: still exactly one FINISHED run per identity.
    result = invoke(
        *arguments[:3],
        "--seeds",
        "2",
        "--epochs",
        "20",
        "--sae-epochs",
        "10",
        "--samples",
        "64",
        "--batching",
        "per-config",
        "--tracking-uri",
        store_uri,
        "--no-artifacts",
        "--force",
    )
    assert result.exit_code == 0
    finished = runs_of_kind(client, "ablation", "FINISHED")
    assert len(finished) == 8 and len({run.data.tags["config_hash"] for run in finished}) == 8
    assert len(runs_of_kind(client, "seed", "FINISHED")) == 16


def tiny_config() -> AblationConfig:
    return AblationConfig(
        data=DataConfig(samples=64),
        network=NetworkConfig(epochs=20),
        sae=SAEConfig(epochs=10),
        metric_null_draws=20,
    )


def test_diverged_seed_is_a_failed_run_and_the_ablation_finishes(store_uri):
    store = open_store(store_uri)
    experiment_id = store.experiment_id("divergence")

    def trainer_with_one_divergence(configs, seeds, share_passes, progress, on_seed):
        # Hands nothing over early (on_seed unused): every seed is then written after training.
        results = taming_experiments.run_ablations(
            configs, seeds, share_passes=share_passes, progress=progress
        )
        broken = results[0].seeds[1]
        broken.failure, broken.metrics, broken.network, broken.sae = (
            "network loss became nan at epoch 7",
            {},
            None,
            None,
        )
        return results

    _, outcomes = run_tracked_sweep(
        store, experiment_id, [tiny_config()], [0, 1, 2], trainer=trainer_with_one_divergence, artifacts=False
    )
    assert outcomes[0].status == "finished" and (outcomes[0].seeds_finished, outcomes[0].seeds_failed) == (
        2,
        1,
    )
    client = store.client
    seed_runs = {int(run.data.tags["seed"]): run for run in runs_of_kind(client, "seed")}
    assert seed_runs[1].info.status == "FAILED"
    assert seed_runs[1].data.tags["failure_reason"] == "network loss became nan at epoch 7"
    assert seed_runs[0].info.status == seed_runs[2].info.status == "FINISHED"
    ablation = runs_of_kind(client, "ablation")[0]
    assert ablation.info.status == "FINISHED" and ablation.data.metrics["seeds_failed"] == 1


def test_all_seeds_diverging_fails_the_ablation_with_the_reason(store_uri):
    store = open_store(store_uri)
    experiment_id = store.experiment_id("explode")
    config = tiny_config()
    exploding = AblationConfig(data=config.data, network=NetworkConfig(epochs=20, sigma=1e30), sae=config.sae)
    _, outcomes = run_tracked_sweep(
        store, experiment_id, [exploding], [0, 1], trainer=taming_experiments.run_ablations, artifacts=False
    )
    assert outcomes[0].status == "failed" and "network loss became inf at epoch 0" in outcomes[0].failure
    ablation = runs_of_kind(store.client, "ablation")[0]
    assert ablation.info.status == "FAILED" and "every seed failed" in ablation.data.tags["failure_reason"]


def test_mlflow_run_hands_over_the_ablation_run(store_uri, monkeypatch):
    client = MlflowClient(store_uri)
    experiment_id = client.create_experiment("handed-over")
    handed = client.create_run(experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", handed)
    result = invoke("ablate", "--init", "orthogonal", *TINY, "--tracking-uri", store_uri, "--no-artifacts")
    assert result.exit_code == 0, result.output
    ablations = runs_of_kind(client, "ablation")
    assert [run.info.run_id for run in ablations] == [handed]
    assert ablations[0].info.run_name == "orthogonal·bipolar·l1·relu"
    assert all(run.info.experiment_id == experiment_id for run in runs_of_kind(client, "seed"))
    assert len(runs_of_kind(client, "seed")) == 2


def test_checkpoint_loads_with_weights_only(strategic_store, tmp_path):
    uri, _ = strategic_store
    client = MlflowClient(uri)
    seed_run = runs_of_kind(client, "seed")[0]
    path = client.download_artifacts(seed_run.info.run_id, "checkpoint/seed.pt", str(tmp_path))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"format", "config", "seed", "network", "sae"}
    assert set(saved["sae"]) >= {"mean", "std", "weights.decoder"}


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    database_folder, working_folder = tmp_path / "store", tmp_path / "elsewhere"
    database_folder.mkdir()
    working_folder.mkdir()
    monkeypatch.chdir(working_folder)
    uri = f"sqlite:///{database_folder / 'mlflow.db'}"
    result = invoke(
        "ablate",
        "--seeds",
        "1",
        "--epochs",
        "5",
        "--sae-epochs",
        "5",
        "--samples",
        "64",
        "--tracking-uri",
        uri,
    )
    assert result.exit_code == 0, result.output
    assert list(working_folder.iterdir()) == []
    assert list((database_folder / "mlruns" / "taming").glob("*/artifacts/checkpoint/seed.pt"))


def test_streamed_seed_runs_stay_running_until_their_ablation_finishes(store_uri):
    """A seed written while others train is not FINISHED before its ablation: a crash in between leaves
    it FAILED with the reason, and the resumed sweep ends with exactly one FINISHED run per seed."""
    store = open_store(store_uri)
    experiment_id = store.experiment_id("streamed")
    client = store.client
    seen_while_training = []

    def trainer_that_dies_after_one_seed(configs, seeds, share_passes, progress, on_seed):
        results = taming_experiments.run_ablations(configs, seeds, share_passes=share_passes)
        on_seed(0, results[0].seeds[0])
        seen_while_training.extend(run.info.status for run in runs_of_kind(client, "seed"))
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        run_tracked_sweep(
            store, experiment_id, [tiny_config()], [0, 1], trainer=trainer_that_dies_after_one_seed
        )
    assert seen_while_training == ["RUNNING"]
    [seed_run] = runs_of_kind(client, "seed")
    assert seed_run.info.status == "FAILED" and "worker died" in seed_run.data.tags["failure_reason"]
    assert {artifact.path for artifact in client.list_artifacts(seed_run.info.run_id)} == {
        "checkpoint",
        "overlap.png",
    }
    assert runs_of_kind(client, "ablation")[0].info.status == "FAILED"

    _, outcomes = run_tracked_sweep(
        store, experiment_id, [tiny_config()], [0, 1], trainer=taming_experiments.run_ablations
    )
    assert outcomes[0].status == "finished"
    finished = runs_of_kind(client, "seed", "FINISHED")
    assert sorted(int(run.data.tags["seed"]) for run in finished) == [0, 1]


def test_sweep_on_two_workers_into_a_new_store_matches_one_process(strategic_store, tmp_path, monkeypatch):
    """--workers 2 on a new store: training starts before the store exists (prefetch), seeds are written
    as their chunks finish, and every metric equals the one-process sweep's."""
    from pipeline.experiments.pool import PassPool

    collected = []
    original_submit = PassPool.submit

    def spying_submit(pool, configs, seeds, device):
        prefetched_before = len(pool.prefetched)
        future = original_submit(pool, configs, seeds, device)
        collected.append(len(pool.prefetched) == prefetched_before - 1)
        return future

    monkeypatch.setattr(PassPool, "submit", spying_submit)
    drawn_here = []
    original_overlap_png = tracking_taming.overlap_png
    monkeypatch.setattr(
        tracking_taming,
        "overlap_png",
        lambda *arguments: drawn_here.append(arguments) or original_overlap_png(*arguments),
    )
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    result = invoke("sweep", "--preset", "strategic", *TINY, "--workers", "2", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    # Two seeds on two workers: two chunks, both trained before the store existed and then collected.
    assert collected == [True, True]
    # The workers drew every seed's heatmap, and drew what this process draws from the run's checkpoint.
    assert drawn_here == []
    store = open_store(uri)
    for seed_run in runs_of_kind(store.client, "seed")[:3]:
        _, _, _, sae = load_checkpoint(load_seed_checkpoint(store, seed_run.info.run_id))
        expected = original_overlap_png(sae.decoder_directions.detach(), seed_run.info.run_name)
        stored = Path(store.client.download_artifacts(seed_run.info.run_id, "overlap.png", str(tmp_path)))
        assert np.array_equal(png_pixels(stored.read_bytes()), png_pixels(expected))
    one_uri, _ = strategic_store
    two = seed_frame(open_store(uri), [open_store(uri).experiment_id(None)])
    one_store = open_store(one_uri)
    one = seed_frame(one_store, [one_store.experiment_id("e2e")])
    assert len(two) == len(one) == 16 and (two["status"] == "FINISHED").all()
    assert two["parent_run_id"].nunique() == 8
    for (_, row_one), (_, row_two) in zip(one.iterrows(), two.iterrows(), strict=True):
        assert (row_one["config"], row_one["seed"]) == (row_two["config"], row_two["seed"])
        for name in METRIC_NAMES:
            assert math.isclose(row_one[name], row_two[name], rel_tol=1e-6, abs_tol=1e-9) or (
                math.isnan(row_one[name]) and math.isnan(row_two[name])
            ), name


def test_a_failure_while_finishing_an_ablation_leaves_no_finished_seed_run(store_uri, monkeypatch):
    """Seed runs turn FINISHED only after everything of their ablation is logged: a failure in its last
    step (the grid) fails them with it, and the resumed sweep ends with one FINISHED run per seed."""
    import tracking.taming as tracked

    store = open_store(store_uri)
    experiment_id = store.experiment_id("finish-fails")

    def failing_grid(*arguments, **keywords):
        raise OSError("disk full")

    monkeypatch.setattr(tracked, "overlap_grid_png", failing_grid)
    with pytest.raises(OSError, match="disk full"):
        run_tracked_sweep(
            store, experiment_id, [tiny_config()], [0, 1], trainer=taming_experiments.run_ablations
        )
    client = store.client
    assert runs_of_kind(client, "seed", "FINISHED") == []
    assert {run.info.status for run in runs_of_kind(client, "seed")} == {"FAILED"}
    assert runs_of_kind(client, "ablation")[0].info.status == "FAILED"
    monkeypatch.undo()
    run_tracked_sweep(store, experiment_id, [tiny_config()], [0, 1], trainer=taming_experiments.run_ablations)
    finished = runs_of_kind(client, "seed", "FINISHED")
    assert sorted(int(run.data.tags["seed"]) for run in finished) == [0, 1]


def test_the_database_file_alone_holds_every_run_once_the_command_ends(tmp_path):
    """The store runs SQLite with a write-ahead log; when the command exits the log is folded back into
    mlflow.db (no -wal/-shm left), so a copy of that one file has every run."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(cli.__file__).resolve().parent
    database = tmp_path / "mlflow.db"
    command = [sys.executable, str(root / "cli.py"), "ablate", *TINY, "--no-artifacts"]
    subprocess.run([*command, "--tracking-uri", f"sqlite:///{database}"], check=True, capture_output=True)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("mlflow.db")) == [
        "mlflow.db"
    ]
    copy = tmp_path / "copy" / "mlflow.db"
    copy.parent.mkdir()
    shutil.copy(database, copy)
    client = MlflowClient(f"sqlite:///{copy}")
    assert len(runs_of_kind(client, "seed", "FINISHED")) == 2
    assert len(runs_of_kind(client, "ablation", "FINISHED")) == 1
    import sqlite3

    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
