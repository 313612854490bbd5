"""Checkpoints that are missing, unreadable or edited are refused in one sentence, before any allocation.

One tiny store (one seed with a checkpoint, one recorded with --no-artifacts) is shared by the module; each
test edits the stored checkpoint file and the fixture puts the original bytes back afterwards.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
from orchestration.inspect import inspect_run
from pipeline.config import AblationConfig
from pipeline.config_tools import config_hash
from pipeline.evaluation import CheckpointError, check_checkpoint, checkpoint, reevaluate
from tracking.query import load_seed_checkpoint
from tracking.store import open_store

TINY = ["--seeds", "1", "--epochs", "5", "--sae-epochs", "5"]
HUGE_SAMPLES = 400_000_000  # ~4.8 GB of float32 features and targets if anything sized data from it
# Peak resident memory may grow by this much while a refused checkpoint is handled; the allocation the
# checks prevent is tens of times larger.
ALLOWED_PEAK_GROWTH_BYTES = 300 * 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # module-scoped: runs before the per-test temporary folder
        for extra in (["--samples", "32"], ["--samples", "40", "--no-artifacts"]):
            result = CliRunner().invoke(cli.cli, ["ablate", *TINY, *extra, "--tracking-uri", uri])
            assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    seeds = client.search_runs(experiments, "tags.kind = 'seed'")
    with_file = [run for run in seeds if run.data.params["data.samples"] == "32"][0]
    without_file = [run for run in seeds if run.data.params["data.samples"] == "40"][0]
    # The stored file itself (a local artifact store under the folder), which the tests edit in place.
    path = Path(urlparse(with_file.info.artifact_uri).path) / "checkpoint" / "seed.pt"
    assert path.is_file(), with_file.info.artifact_uri
    return {
        "uri": uri,
        "run": with_file,
        "bare_run": without_file,
        "path": path,
        "original": path.read_bytes(),
    }


@pytest.fixture
def stored(store):
    yield store
    store["path"].write_bytes(store["original"])
    MlflowClient(store["uri"]).set_tag(
        store["run"].info.run_id, "config_hash", store["run"].data.tags["config_hash"]
    )


def _edit(stored, change) -> None:
    saved = torch.load(stored["path"], weights_only=True)
    change(saved)
    torch.save(saved, stored["path"])


def _refusal(stored, run_id: str | None = None) -> str:
    """inspect_run's CheckpointError message; asserts it came fast and without a large allocation."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as raised:
        inspect_run(stored["uri"], run_id or stored["run"].info.run_id)
    assert time.perf_counter() - started < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before < ALLOWED_PEAK_GROWTH_BYTES
    message = str(raised.value)
    # One sentence: one line, no traceback, no advice to load with weights_only=False.
    assert "\n" not in message and "weights_only" not in message and message
    return message


def test_an_untouched_checkpoint_reproduces(stored):
    inspection = inspect_run(stored["uri"], stored["run"].info.run_id)
    assert inspection.reproduced and inspection.mismatches == 0


def test_truncated_bytes_are_refused(stored):
    stored["path"].write_bytes(stored["original"][: len(stored["original"]) // 2])
    assert "not a torch checkpoint archive" in _refusal(stored)


class Foreign:
    """An object weights_only loading must refuse: its class is not a tensor or a plain container."""


def test_a_valid_archive_with_a_foreign_object_is_refused(stored):
    # Today's failure: torch raises UnpicklingError with advice to pass weights_only=False.
    _edit(stored, lambda saved: saved.update(extra=Foreign()))
    assert "holds objects other than tensors" in _refusal(stored)


def test_a_pickle_that_would_run_code_is_refused(stored):
    # A plain pickle whose loading calls a function: what weights_only=True exists to stop.
    stored["path"].write_bytes(b"cbuiltins\nprint\n(S'pwned'\ntR.")
    assert "cannot be loaded safely" in _refusal(stored)


def test_a_config_edited_to_a_huge_size_is_refused_before_allocating(stored):
    _edit(stored, lambda saved: saved["config"]["data"].update(samples=HUGE_SAMPLES))
    message = _refusal(stored)
    assert "config_hash" in message and stored["run"].info.run_id in message


def test_an_edited_config_with_a_matching_hash_tag_is_caught_by_the_params(stored):
    # Tags can be rewritten after the fact; params cannot, so the params are the second line of defence.
    _edit(stored, lambda saved: saved["config"]["data"].update(samples=HUGE_SAMPLES))
    edited = AblationConfig.from_dict(torch.load(stored["path"], weights_only=True)["config"])
    MlflowClient(stored["uri"]).set_tag(stored["run"].info.run_id, "config_hash", config_hash(edited))
    message = _refusal(stored)
    assert "data.samples" in message


def test_a_tensor_of_the_wrong_shape_is_refused(stored):
    _edit(stored, lambda saved: saved["sae"].update({"weights.decoder": torch.zeros(5000, 12)}))
    message = _refusal(stored)
    assert "weights.decoder" in message and "(5000, 12)" in message


def test_a_checkpoint_of_another_seed_is_refused(stored):
    _edit(stored, lambda saved: saved.update(seed=saved["seed"] + 1))
    assert "seed" in _refusal(stored)


def test_a_seed_recorded_without_artifacts_is_told_in_one_sentence(stored):
    message = _refusal(stored, stored["bare_run"].info.run_id)
    assert "--no-artifacts" in message


def test_load_seed_checkpoint_returns_a_verified_checkpoint(stored):
    saved = load_seed_checkpoint(open_store(stored["uri"]), stored["run"].info.run_id)
    assert set(reevaluate(saved)) >= {"macs", "dead_latents"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda saved: saved.update(format="something else"), "not a taming seed checkpoint"),
        (lambda saved: saved["config"]["data"].update(samples=-3), "config is invalid"),
        (lambda saved: saved["network"].pop("layers.0.bias"), "missing"),
        (
            lambda saved: saved["network"].update({"layers.0.weight": torch.zeros(12, 8, dtype=torch.long)}),
            "floating",
        ),
        (lambda saved: saved.update(seed="0"), "seed"),
    ],
)
def test_check_checkpoint_names_the_problem(tiny, change, words):
    from pipeline.models import MLP
    from pipeline.sae import SparseAutoencoder, architecture

    hidden, latents = tiny.network.hidden_dim, tiny.sae.d_sae
    network = MLP(tiny.data.features, hidden, tiny.network.hidden_layers, tiny.network.act)
    parameters = architecture(tiny.sae.architecture).initial_parameters(
        hidden, latents, tiny.sae, torch.Generator().manual_seed(0)
    )
    sae = SparseAutoencoder(tiny.sae, parameters, torch.zeros(hidden), torch.ones(hidden))
    saved = checkpoint(tiny, 0, network, sae)
    assert check_checkpoint(saved, tiny.hash()) == tiny
    change(saved)
    with pytest.raises(CheckpointError, match=words):
        check_checkpoint(saved)


def test_cli_inspect_exits_1_with_one_sentence(stored):
    stored["path"].write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(
        cli.cli,
        ["inspect", stored["run"].info.run_id, "--tracking-uri", stored["uri"]],
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    assert "cannot be loaded safely" in result.output and "Traceback" not in result.output
