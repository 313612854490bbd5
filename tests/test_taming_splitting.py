"""The splitting remedy on the taming MLP: split, fine-tune, record, resume, compare.

Independent checks: splitting at ε = 0 leaves the outputs of the original `MLP` module unchanged to float
precision; the batched fine-tuning equals a plain `torch.optim.Adam` autograd loop on the same objective
and does not depend on what shares its pass; the recorded "before" count is the seed run's logged
`neuron_polysemantic` and what `pipeline.evaluation` recomputes from the checkpoint; the paired statistic
equals `scipy.stats.ttest_rel` and a hand-computed t-interval on hand-built numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import cli
from pipeline.data import make_dataset
from pipeline.evaluation import load_checkpoint, reevaluate
from pipeline.experiments import taming_splitting as splitting
from pipeline.taming_splitting import comparison_table, paired_difference
from pipeline.train import train_pass
from tests.conftest import tiny_config, with_network
from tracking.query import load_seed_checkpoint
from tracking.store import open_store
from tracking.taming_splitting import splitting_section

TINY = ["--epochs", "20", "--sae-epochs", "10", "--samples", "64"]


def invoke(*arguments: str):
    return CliRunner().invoke(cli.cli, list(arguments), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained():
    """Two tiny trained networks (different configurations, seeds 0 and 1)."""
    configs = [tiny_config(), tiny_config().with_factors("orthogonal", "positive_kurtosis", "l2", "gelu")]
    return train_pass(configs, [0, 1])


def test_splitting_at_zero_noise_leaves_the_outputs_unchanged(trained):
    for result in trained:
        dataset = make_dataset(result.config.data, result.seed)
        with torch.no_grad():
            reference = result.network(dataset.inputs)  # the original nn.Module, not our forward
        network = splitting.Network.from_mlp(result.network)
        neurons = [0, 3, 5, 11]
        directions = splitting.copy_directions(result.seed, network.width, network.weights[-2].shape[1])
        widened = splitting.split_network(network, neurons, 0.0, directions)
        outputs, hidden = widened.forward_with_hidden(dataset.inputs)
        assert widened.width == 16
        assert float((outputs - reference).abs().max()) < 1e-6
        for position, neuron in enumerate(neurons):
            assert widened.copies[neuron] == [neuron, 12 + position]
            torch.testing.assert_close(hidden[:, 12 + position], hidden[:, neuron], rtol=0, atol=0)
        # With ε > 0 each copy's row moves by exactly ε·‖row‖ along its own direction.
        perturbed = splitting.split_network(network, neurons, 0.1, directions)
        original = network.weights[-2]
        for position, neuron in enumerate(neurons):
            for copy, row in enumerate((neuron, 12 + position)):
                expected = original[neuron] + 0.1 * original[neuron].norm() * directions[copy, neuron]
                torch.testing.assert_close(perturbed.weights[-2][row], expected)
        torch.testing.assert_close(perturbed.weights[-1][:, 12:], network.weights[-1][:, neurons] / 2)


def test_a_neuron_is_split_once():
    network = splitting.Network.from_mlp(train_pass([tiny_config()], [0])[0].network)
    with pytest.raises(ValueError, match="distinct"):
        splitting.split_network(network, [1, 1], 0.0, splitting.copy_directions(0, 12, 12))


def _autograd_fine_tune(network: splitting.Network, config, dataset, epochs: int) -> list[torch.Tensor]:
    """Plain reference: nn.Parameters, autograd, torch.optim.Adam; the config's reg, no noise."""
    weights = [torch.nn.Parameter(w.clone()) for w in network.weights]
    biases = [torch.nn.Parameter(b.clone()) for b in network.biases]
    decay = (
        config.network.lambda_reg if config.network.reg == "l2" and config.network.l2_form == "decay" else 0.0
    )
    optimizer = torch.optim.Adam([*weights, *biases], lr=config.network.lr, weight_decay=decay)
    activation = torch.relu if config.network.act == "relu" else torch.nn.functional.gelu
    for _ in range(epochs):
        hidden = dataset.train_inputs
        for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
            hidden = activation(hidden @ weight.T + bias)
        outputs = hidden @ weights[-1].T + biases[-1]
        loss = ((outputs - dataset.train_targets) ** 2).mean()
        if config.network.reg == "l1":
            loss = loss + config.network.lambda_reg * sum(w.abs().sum() for w in weights)
        if config.network.reg == "l2" and config.network.l2_form == "penalty":
            loss = loss + config.network.lambda_reg * sum(w.square().sum() for w in weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [w.detach() for w in weights]


@pytest.mark.parametrize(
    ("reg", "form", "act"), [("l1", "decay", "relu"), ("l2", "decay", "gelu"), ("l2", "penalty", "relu")]
)
def test_fine_tuning_equals_a_plain_autograd_adam_loop(reg, form, act):
    config = with_network(tiny_config(), noise="none", reg=reg, l2_form=form, act=act, lambda_reg=1e-2)
    network = splitting.Network.from_mlp(train_pass([config], [0])[0].network)
    dataset = make_dataset(config.data, 0)
    widened = splitting.split_network(network, [2, 7], 0.1, splitting.copy_directions(0, 12, 12))
    results = {}
    splitting.fine_tune(
        [splitting.FineTuneItem(widened, config, 0)], [dataset], [5], lambda e, r: results.setdefault(e, r)
    )
    reference = _autograd_fine_tune(widened, config, dataset, 5)
    for ours, theirs in zip(results[5][0].weights, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_a_networks_fine_tuning_does_not_depend_on_its_pass(trained):
    """Alone, or padded beside a wider network and a noiseless one: the same result (to rounding)."""
    first, second = trained
    dataset_first = make_dataset(first.config.data, first.seed)
    dataset_second = make_dataset(second.config.data, second.seed)
    narrow = splitting.split_network(
        splitting.Network.from_mlp(first.network), [1], 0.1, splitting.copy_directions(0, 12, 12)
    )
    wide = splitting.split_network(
        splitting.Network.from_mlp(second.network), list(range(8)), 0.1, splitting.copy_directions(1, 12, 12)
    )
    quiet = with_network(first.config, noise="none")
    alone, together = {}, {}
    splitting.fine_tune(
        [splitting.FineTuneItem(narrow, first.config, 0)],
        [dataset_first],
        [6],
        lambda e, r: alone.setdefault(e, r),
    )
    splitting.fine_tune(
        [
            splitting.FineTuneItem(wide, second.config, 1),
            splitting.FineTuneItem(narrow, first.config, 0),
            splitting.FineTuneItem(narrow, quiet, 0),
        ],
        [dataset_second, dataset_first, dataset_first],
        [6],
        lambda e, r: together.setdefault(e, r),
    )
    for ours, theirs in zip(together[6][1].weights, alone[6][0].weights, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert together[6][0].width == 20 and together[6][1].width == 13
    # Same seed and noise kind: the noisy copy sees noise, the noiseless one none, so they differ.
    assert not torch.equal(together[6][2].weights[-2], together[6][1].weights[-2])


def test_paired_statistic_equals_ttest_rel_on_hand_built_numbers():
    seeds = [0, 1, 2, 3, 4]
    rows = []
    baseline_values = {("a", 0): 5, ("a", 1): 6, ("a", 2): 4, ("a", 3): 7, ("a", 4): 5}
    baseline_values |= {("b", s): v for s, v in zip(seeds, [3, 4, 4, 2, 6], strict=True)}
    split_values = {("a", s): v for s, v in zip(seeds, [9, 10, 9, 12, 8], strict=True)}
    split_values |= {("b", s): v for s, v in zip(seeds, [6, 9, 7, 4, 11], strict=True)}
    for (config, seed), value in baseline_values.items():
        rows.append({"arm": "baseline", "epsilon": math.nan, "value": value, "config": config, "seed": seed})
    for (config, seed), value in split_values.items():
        rows.append({"arm": "split", "epsilon": 0.1, "value": value, "config": config, "seed": seed})
    frame = pd.DataFrame(rows).assign(epochs=100)
    frame["polysemantic_after"] = frame["value"].astype(float)
    frame["polysemantic_fraction_after"] = frame["value"] / 20
    frame["val_mse_after"] = 0.01 * frame["value"]
    frame["polysemantic_before"] = 4.0
    frame["polysemantic_fraction_before"] = 0.4
    frame["val_mse_before"] = 0.02
    frame["resolved"] = (frame["value"] % 3).astype(float)
    frame["resolved_fraction"] = frame["resolved"] / 4
    table = comparison_table(frame)
    row = table[table["metric"] == "polysemantic_after"].iloc[0]
    # Average over configurations within seed, then paired across seeds.
    split_means = [np.mean([split_values[("a", s)], split_values[("b", s)]]) for s in seeds]
    baseline_means = [np.mean([baseline_values[("a", s)], baseline_values[("b", s)]]) for s in seeds]
    expected = scipy.stats.ttest_rel(split_means, baseline_means)
    differences = np.subtract(split_means, baseline_means)
    half = scipy.stats.t.ppf(0.975, 4) * differences.std(ddof=1) / math.sqrt(5)
    assert row.difference == pytest.approx(differences.mean())
    assert row.t == pytest.approx(expected.statistic)
    assert row.p == pytest.approx(expected.pvalue)
    assert row.ci_low == pytest.approx(differences.mean() - half)
    assert row.ci_high == pytest.approx(differences.mean() + half)
    assert row.seeds == 5 and row.networks == 10
    # Resolved fraction: pooled within seed (resolved / originally polysemantic over configurations).
    resolved = table[table["metric"] == "resolved_fraction"].iloc[0]
    pooled_split = [(split_values[("a", s)] % 3 + split_values[("b", s)] % 3) / 8 for s in seeds]
    pooled_baseline = [(baseline_values[("a", s)] % 3 + baseline_values[("b", s)] % 3) / 8 for s in seeds]
    assert resolved.difference == pytest.approx(np.mean(pooled_split) - np.mean(pooled_baseline))
    assert paired_difference([1, 2, 3], [1, 2, 3])["difference"] == 0


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
    """A 2-configuration × 2-seed sweep, then its split at ε 0 and 0.1, +3 and +5 epochs."""
    folder = tmp_path_factory.mktemp("split")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        swept = invoke("sweep", "--grid", "network.reg=l1,l2", "--seeds", "2", *TINY, "--tracking-uri", uri)
        assert swept.exit_code == 0, swept.output
        first = invoke(
            "split", "--epsilon", "0,0.1", "--epochs", "3,5", "--tracking-uri", uri, "--out", "first"
        )
        assert first.exit_code == 0, first.output
    return folder, uri, first.output


def _split_runs(uri: str, status: str | None = None) -> list:
    client = MlflowClient(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.kind = 'split'", max_results=1000)
    return [run for run in runs if status is None or run.info.status == status]


def test_split_records_every_network_arm_and_length_linked_to_its_seed_run(split_store):
    _, uri, output = split_store
    runs = _split_runs(uri)
    # 4 networks × (baseline + 2 ε) × 2 lengths.
    assert len(runs) == 24 and all(run.info.status == "FINISHED" for run in runs)
    client = MlflowClient(uri)
    for run in runs:
        tags = run.data.tags
        seed_run = client.get_run(tags["network_run_id"])
        assert seed_run.data.tags["kind"] == "seed" and seed_run.data.tags["seed"] == tags["seed"]
        assert run.data.params["epochs"] == tags["epochs"] and run.data.params["epsilon"] == tags["epsilon"]
        # The "before" count is the seed run's logged metric.
        assert run.data.metrics["polysemantic_before"] == seed_run.data.metrics["neuron_polysemantic"]
        if tags["arm"] == "split":
            assert run.data.metrics["split_neurons"] == run.data.metrics["polysemantic_before"]
            if tags["epsilon"] == "0.0":
                assert run.data.metrics.get("max_output_change_at_split", 0.0) < 1e-5
    assert "polysemantic_after" in output and "Method:" in output


def test_the_before_count_is_what_evaluation_recomputes_from_the_checkpoint(split_store):
    _, uri, _ = split_store
    store = open_store(uri, writing=False)
    runs = [
        run
        for run in _split_runs(uri)
        if run.data.tags["arm"] == "baseline" and run.data.tags["epochs"] == "3"
    ]
    for run in runs:
        saved = load_seed_checkpoint(store, run.data.tags["network_run_id"])
        recomputed = reevaluate(saved)
        assert run.data.metrics["polysemantic_before"] == recomputed["neuron_polysemantic"]
        assert run.data.metrics["val_mse_before"] == pytest.approx(recomputed["val_mse"], rel=1e-6)
        config, seed, network, _ = load_checkpoint(saved)
        reading = splitting.read_network(splitting.Network.from_mlp(network), make_dataset(config.data, seed))
        assert int(reading.polysemantic.sum()) == recomputed["neuron_polysemantic"]


def test_rerunning_resumes_without_duplicating_runs(split_store):
    folder, uri, _ = split_store
    before = {run.info.run_id for run in _split_runs(uri)}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        again = invoke(
            "split", "--epsilon", "0,0.1", "--epochs", "3,5", "--tracking-uri", uri, "--out", "again"
        )
    assert again.exit_code == 0, again.output
    assert {run.info.run_id for run in _split_runs(uri)} == before
    assert "Recorded 0 split run(s), reused 24" in again.output
    # One more length computes only that length.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        longer = invoke(
            "split", "--epsilon", "0.1", "--epochs", "3,4", "--tracking-uri", uri, "--out", "longer"
        )
    assert longer.exit_code == 0, longer.output
    assert "Recorded 8 split run(s), reused 8" in longer.output
    assert len(_split_runs(uri)) == 32


def test_force_recomputes_and_keeps_one_finished_run_per_identity(split_store):
    folder, uri, _ = split_store
    before = {run.info.run_id for run in _split_runs(uri, "FINISHED")}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        forced = invoke(
            "split", "--epsilon", "0", "--epochs", "3", "--force", "--tracking-uri", uri, "--out", "f"
        )
    assert forced.exit_code == 0, forced.output
    assert "Recorded 8 split run(s)" in forced.output
    after = _split_runs(uri, "FINISHED")
    assert len(after) == len(before)
    assert len(before - {run.info.run_id for run in after}) == 8
    keys = [(r.data.tags["network_run_id"], r.data.tags["epsilon"], r.data.tags["epochs"]) for r in after]
    assert len(keys) == len(set(keys))


def test_report_only_rebuilds_table_and_figures_from_stored_runs(split_store):
    folder, uri, _ = split_store
    count = len(_split_runs(uri))
    out = folder / "report-only"
    result = invoke("split", "--report-only", "--tracking-uri", uri, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "splitting.csv").exists() and (out / "splitting_before_after.png").exists()
    assert len(_split_runs(uri)) == count
    store = open_store(uri, writing=False)
    experiment_id = store.experiment_id("taming", create=False)
    table, readings, figures = splitting_section(store, experiment_id, "latest")
    assert splitting_section(store, experiment_id, None)[0].equals(table)
    stored = pd.read_csv(out / "splitting.csv")
    assert len(stored) == len(table)
    assert set(figures) == {"splitting_before_after", "splitting_per_configuration"}
    assert any(line.startswith("Method:") for line in readings)


def test_splitting_section_is_none_without_split_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert invoke("sweep", "--seeds", "1", *TINY, "--tracking-uri", uri).exit_code == 0
    store = open_store(uri, writing=False)
    experiment_id = store.experiment_id("taming", create=False)
    assert splitting_section(store, experiment_id, "latest") is None
    assert splitting_section(store, experiment_id, None) is None
    result = invoke("split", "--report-only", "--tracking-uri", uri)
    assert result.exit_code == 2 and "no split runs" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--epsilon", "-0.1"], "--epsilon"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon", "0,,1"], "--epsilon"),
        (["--epsilon", "0.1,0.1"], "--epsilon"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "2.5"], "--epochs"),
        (["--sweep-id", "nope"], "--sweep-id"),
        (["--sweep-id", "0123456789ab"], "--sweep-id"),
        (["--experiment", "absent"], "--experiment"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(split_store, arguments, message):
    _, uri, _ = split_store
    database = Path(uri.removeprefix("sqlite:///"))
    count = len(
        MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    )
    modified = database.stat().st_mtime_ns
    result = invoke("split", *arguments, "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()[-1]) < 400
    assert database.stat().st_mtime_ns == modified
    assert (
        len(MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()]))
        == count
    )


def test_a_missing_store_is_refused_without_creating_one(tmp_path):
    database = tmp_path / "none.db"
    result = invoke("split", "--tracking-uri", f"sqlite:///{database}")
    assert result.exit_code == 2 and "--tracking-uri" in result.output
    assert not database.exists()
