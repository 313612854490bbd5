"""Decomposing stored networks: new SAEs from a sweep's checkpoints, no network trained again.

Independent checks: an SAE trained by `decompose_pass` on a network from a full pass must equal the SAE
the full pass trained with the same settings (the network does not depend on SAE settings, and each SAE
starts from its seed's own generator); the decomposition's seed runs must hold exactly the source runs'
networks; a different SAE setting must change the SAE and never the network.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
from pipeline.config import SAEConfig
from pipeline.evaluation import load_checkpoint
from pipeline.experiments.decompose import decompose_pass
from pipeline.experiments.taming import evaluate
from pipeline.train import train_pass
from tests.conftest import tiny_config
from tracking.query import load_seed_checkpoint
from tracking.store import open_store

TINY = ["--epochs", "20", "--sae-epochs", "10", "--samples", "64"]


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, list(arguments), catch_exceptions=False)


def runs_of_kind(client: MlflowClient, kind: str, extra: str = "") -> list:
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    query = f"tags.kind = '{kind}'" + (f" and {extra}" if extra else "")
    return client.search_runs(experiments, query, max_results=1000)


@pytest.mark.parametrize("architecture", ["leaky_relu", "topk"])
def test_decomposing_a_passes_networks_reproduces_its_saes(architecture):
    base = tiny_config()
    base = dataclasses.replace(base, sae=dataclasses.replace(base.sae, architecture=architecture, k=4))
    configs = [base, base.with_factors("orthogonal", "bipolar", "l2", "gelu"), base]
    seeds = [0, 1, 2]
    full = train_pass(configs, seeds)
    again = decompose_pass(configs, seeds, [result.network for result in full])
    for original, decomposed in zip(full, again, strict=True):
        assert decomposed.network is original.network
        for name, value in original.sae.state_dict().items():
            torch.testing.assert_close(decomposed.sae.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        original_metrics = evaluate(original).metrics
        decomposed_metrics = evaluate(decomposed).metrics
        assert original_metrics.keys() == decomposed_metrics.keys()
        for name, value in original_metrics.items():
            assert decomposed_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_decompose_pass_rejects_mixed_sae_settings():
    base = tiny_config()
    other = dataclasses.replace(base, sae=SAEConfig(epochs=12, d_sae=8))
    networks = [result.network for result in train_pass([base], [0])] * 2
    with pytest.raises(ValueError, match="share data, hidden width and SAE settings"):
        decompose_pass([base, other], [0, 0], networks)


@pytest.fixture(scope="module")
def decomposed_store(tmp_path_factory):
    """A 2-config × 2-seed sweep, then its decomposition by two SAE architectures."""
    folder = tmp_path_factory.mktemp("decompose")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        swept = invoke("sweep", "--grid", "network.reg=l1,l2", "--seeds", "2", *TINY, "--tracking-uri", uri)
        assert swept.exit_code == 0, swept.output
        decomposed = invoke(
            "decompose", "--grid", "sae.architecture=topk,relu", "--set", "sae.k=3", "--tracking-uri", uri
        )
        assert decomposed.exit_code == 0, decomposed.output
    return uri, folder


def test_decomposition_records_a_sweep_whose_seeds_link_to_their_networks(decomposed_store):
    uri, _ = decomposed_store
    client = MlflowClient(uri)
    store = open_store(uri)
    sources = {run.info.run_id: run for run in runs_of_kind(client, "seed") if "trained" not in run.data.tags}
    decomposed = runs_of_kind(client, "seed", "tags.trained = 'sae only'")
    assert len(sources) == 4 and len(decomposed) == 8  # 2 configs × 2 seeds, × 2 architectures
    architectures = set()
    for run in decomposed:
        assert run.info.status == "FINISHED"
        source = sources[run.data.tags["network_run_id"]]
        assert run.data.tags["network_code_version"] == source.data.tags["code_version"]
        assert source.data.tags["seed"] == run.data.tags["seed"]
        assert source.data.params["network.reg"] == run.data.params["network.reg"]
        config, _, network, sae = load_checkpoint(load_seed_checkpoint(store, run.info.run_id))
        _, _, source_network, source_sae = load_checkpoint(load_seed_checkpoint(store, source.info.run_id))
        # The network is the stored one, bit for bit: nothing retrained it.
        for name, value in source_network.state_dict().items():
            assert torch.equal(network.state_dict()[name], value), name
        assert config.sae.architecture == run.data.params["sae.architecture"] != "leaky_relu"
        assert config.sae.k == 3
        architectures.add(config.sae.architecture)
        assert not torch.equal(sae.decoder_directions, source_sae.decoder_directions)
        # Same metrics of the network (ground-truth neuron polysemanticity), new ones of the SAE.
        assert run.data.metrics["neuron_polysemantic"] == source.data.metrics["neuron_polysemantic"]
    assert architectures == {"topk", "relu"}
    sweeps = runs_of_kind(client, "sweep", "tags.trained = 'sae only'")
    assert len(sweeps) == 1
    source_sweep_id = sweeps[0].data.tags["source_sweep_id"]
    for ablation in runs_of_kind(client, "ablation", "tags.trained = 'sae only'"):
        assert ablation.data.tags["source_sweep_id"] == source_sweep_id
        assert client.get_run(ablation.data.tags["source_run_id"]).data.tags["kind"] == "ablation"


def test_decomposing_again_reuses_and_the_report_reads_it(decomposed_store):
    uri, folder = decomposed_store
    client = MlflowClient(uri)
    before = len(runs_of_kind(client, "seed"))
    sweeps = runs_of_kind(client, "sweep", "tags.trained = 'sae only'")
    source_sweep_id = sweeps[0].data.tags["source_sweep_id"]
    again = invoke(
        "decompose",
        "--sweep-id",
        source_sweep_id,
        "--grid",
        "sae.architecture=topk,relu",
        "--set",
        "sae.k=3",
        "--tracking-uri",
        uri,
    )
    assert again.exit_code == 0, again.output
    assert "Reused 4 FINISHED configuration(s)" in again.output
    assert len(runs_of_kind(client, "seed")) == before
    report = invoke("report", "--sweep-id", "latest", "--tracking-uri", uri, "--out", str(folder / "report"))
    assert report.exit_code == 0, report.output
    text = (folder / "report" / "report.md").read_text()
    assert "architecture=topk" in text and "architecture=relu" in text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--grid", "network.reg=l1,l2"], "decompose changes only sae.* settings"),
        (["--set", "sae.architecture=sparse"], "sae.architecture"),
        ([], "decompose needs SAE settings to change"),
        (["--sweep-id", "nothex", "--set", "sae.d_sae=8"], "is not a sweep id"),
        (["--sweep-id", "0123456789ab", "--set", "sae.d_sae=8"], "matches no sweep run"),
    ],
)
def test_bad_decompose_input_exits_2_and_writes_nothing(decomposed_store, arguments, message):
    uri, _ = decomposed_store
    client = MlflowClient(uri)
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000))
    result = CliRunner().invoke(cli.cli, ["decompose", *arguments, "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert message in result.output
    after = len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000))
    assert after == before


def test_decomposing_a_sweep_without_checkpoints_is_one_sentence(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    swept = invoke(
        "sweep", "--grid", "network.reg=l1,l2", "--seeds", "1", *TINY, "--tracking-uri", uri, "--no-artifacts"
    )
    assert swept.exit_code == 0, swept.output
    result = CliRunner().invoke(cli.cli, ["decompose", "--set", "sae.d_sae=8", "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert "--no-artifacts cannot be decomposed" in result.output


def test_a_pool_of_workers_gives_the_same_decomposition_as_one_process():
    from pipeline.experiments.decompose import decompose_ablations
    from pipeline.experiments.pool import PassPool

    base = tiny_config()
    configs = [base, base.with_factors("orthogonal", "bipolar", "l2", "gelu")]
    seeds = [0, 1, 2, 3]
    trained = {
        (config.hash(), result.seed): result.network
        for config in configs
        for result in train_pass([config] * 4, seeds)
    }
    # Another L1 strength, not another width: a new d_sae would compile the fused SAE kernel once more.
    target = [
        dataclasses.replace(config, sae=dataclasses.replace(config.sae, l1_coefficient=3e-4))
        for config in configs
    ]
    source_hash = {t.hash(): c.hash() for t, c in zip(target, configs, strict=True)}

    def networks(config, seed):
        return trained[(source_hash[config.hash()], seed)]

    alone = decompose_ablations(target, seeds, networks=networks)
    with PassPool(2) as pool:
        pooled = decompose_ablations(target, seeds, networks=networks, pool=pool)
    for one, other in zip(alone, pooled, strict=True):
        for a, b in zip(one.seeds, other.seeds, strict=True):
            assert a.seed == b.seed and a.finished and b.finished
            for name, value in a.metrics.items():
                assert b.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), name
