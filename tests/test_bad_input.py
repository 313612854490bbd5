"""Bad input, table-driven: every option of every command gets a bad value and must be refused with exit
code 2, one line of error naming the option, and nothing written (no tracking store, no reports).

The table is checked against the commands' click parameters, so an option added without a case here fails
`test_every_option_has_a_case`. Config options (derived from the dataclasses) get their cases derived the
same way: each numeric one above its documented maximum and non-finite, each choice one a bogus value.
"""

from __future__ import annotations

import os

import click
import pytest
from click.testing import CliRunner

import cli
from pipeline.config import AblationConfig
from pipeline.config_tools import leaf_fields
from pipeline.design import field_specs

HUGE = "99999999999999999999999"  # beyond every maximum, and beyond int64 (an OverflowError once)
VALID_RUN_ID = "0" * 32
FILE = "{file}"  # replaced by the path of an existing file made before the command runs

COMMANDS: dict[str, click.Command] = {
    "ablate": cli.cli.commands["ablate"],
    "sweep": cli.cli.commands["sweep"],
    "report": cli.cli.commands["report"],
    "inspect": cli.cli.commands["inspect"],
    "incidental collisions": cli.incidental.commands["collisions"],
    "incidental noise": cli.incidental.commands["noise"],
    "incidental dynamics": cli.incidental.commands["dynamics"],
    "incidental report": cli.incidental.commands["report"],
}

FLAG_CASES = [["={flag}=1"]]  # a flag given a value: `--force=1`
NAME_CASES = [[""], ["   "], ["x" * 251]]
URI_CASES = [[""], [" \t"]]
OUT_CASES = [[""], [" "], [FILE], [f"{FILE}/inside"]]

RUN_OPTIONS = {
    "seeds": [["0"], ["100000"], [HUGE], ["ten"]],
    "first_seed": [["-1"], [HUGE]],
    "device": [["tpu"]],
    "batching": [["sometimes"]],
    "experiment": NAME_CASES,
    "tracking_uri": URI_CASES,
    "force": FLAG_CASES,
    "no_artifacts": FLAG_CASES,
    "i_know_it_is_big": FLAG_CASES,
}

TRAINING_OPTIONS = {
    "instances": [["0"], ["1000000"]],
    "steps": [["0"], [HUGE]],
    "optimizer": [["adam"]],
    "lr": [["0"], ["nan"], ["inf"], ["1e9"]],
    "weight_decay": [["-1"], ["nan"], ["1e9"]],
    "seed": [["-1"], [HUGE]],
    "curve_every": [["0"], [HUGE]],
    "device": [["tpu"]],
    "force": FLAG_CASES,
    "experiment": NAME_CASES,
    "tracking_uri": URI_CASES,
    "i_know_it_is_big": FLAG_CASES,
}

REPORT_OUTPUT = {
    "resamples": [["10"], ["1000000000"], ["many"]],
    "out_dir": OUT_CASES,
    "no_log": FLAG_CASES,
    "i_know_it_is_big": FLAG_CASES,
}


def config_cases() -> dict[str, list[list[str]]]:
    """A bad value for every config option, derived from its field (see the module docstring)."""
    cases = {}
    for spec in field_specs().values():
        if spec.hint not in (int, float, str):
            continue  # list-valued fields have no option of their own
        name = cli._field_destination(spec.path)
        if spec.choice_source is not None:
            cases[name] = [["bogus"]]
        elif spec.hint is int:
            cases[name] = [[HUGE], ["1.5"]]
        elif spec.hint is float:
            bounded = leaf_fields(AblationConfig)[spec.path][0].metadata.get("maximum") is not None
            cases[name] = [["nan"], ["inf"], ["-1"], *([["1e300"]] if bounded else [])]
        else:
            cases[name] = [[""]]
    return cases


CASES: dict[str, dict[str, list[list[str]]]] = {
    "ablate": {**config_cases(), **RUN_OPTIONS},
    "sweep": {
        **config_cases(),
        **RUN_OPTIONS,
        "design_source": [[""], ["no-such-design"], ["missing.toml"]],
        "preset": [["random"]],
        "grid_texts": [
            [""],
            ["network.lambda_reg"],
            ["no_such_field=1,2"],
            ["network.lambda_reg=nan"],
            ["network.hidden_dim=12,100000"],
        ],
        "set_texts": [
            [""],
            ["network.epochs"],
            ["network.epochs=nan"],
            ["no_such_field=1"],
            ["network.epochs=1000000"],
        ],
        "executor": [["ray"]],
        "scheduler": [[""], ["   "]],
        "workers": [["0"], ["100000"], [HUGE]],
    },
    "report": {
        "experiment": NAME_CASES,
        "tracking_uri": URI_CASES,
        "sweep_id": [["a'b"], ["ABCDEF123456"], [""]],
        "filter_string": [
            ["tags.reg = "],
            ["foo"],
            ["tags.reg = 'l2' or 1=1"],
            ["metrics.macs > 'abc'"],
            [""],
        ],
        "baseline": [["   "], ["x" * 251]],
        "metrics": [["seed"], ["no_such_metric"]],
        "pairing": [["bayes"]],
        "paired_flag": FLAG_CASES,
        "published_ladder": FLAG_CASES,
        **REPORT_OUTPUT,
    },
    "inspect": {
        "run_id": [["a'b"], [""], ["../etc"]],
        "tracking_uri": URI_CASES,
    },
    "incidental collisions": {
        "n": [["0"], ["100000"], [HUGE]],
        "ms": [["0"], ["1:100000000:1"], ["64,,128"], ["a:b:c"], ["100000"]],
        "l1_values": [["nan"], ["inf"], ["-1"], ["1e6"]],
        **TRAINING_OPTIONS,
    },
    "incidental noise": {
        "n": [["0"], ["100000"]],
        "m": [["0"], ["100000"]],
        "noise_types": [["uniform"]],
        "sigmas": [["0"], ["nan"], ["inf"], ["1e6"]],
        "nu": [["2"], ["nan"], ["1e12"]],
        "noise_sharing": [["per_epoch"]],
        "l1": [["nan"], ["inf"], ["-1"]],
        **TRAINING_OPTIONS,
    },
    "incidental dynamics": {
        "m": [["0"], [HUGE]],
        "l1_values": [["nan"], ["inf"], ["0"], ["1e-9"]],
        "t_max_times_l1": [["0.5"], ["nan"], ["1e9"]],
        "dt": [["0"], ["nan"], ["inf"], ["5"]],
        "seed": [["-1"], [HUGE]],
        "experiment": NAME_CASES,
        "tracking_uri": URI_CASES,
        "i_know_it_is_big": FLAG_CASES,
    },
    "incidental report": {
        "experiment": NAME_CASES,
        "tracking_uri": URI_CASES,
        "sweep_ids": [["a'b"], ["latest"]],
        "baseline": [["uniform"]],
        "paired": FLAG_CASES,
        **REPORT_OUTPUT,
    },
}

# Bad combinations, each refused naming the option(s) that cause it.
EXTRA_CASES = [
    ("sweep", ["--design", "factorial", "--seeds", "1000"], "--seeds"),
    ("ablate", ["--samples", "100000", "--hidden-dim", "1024", "--hidden-layers", "64"], "--seeds"),
    ("incidental collisions", ["--n", "4096", "--m", "4096", "--instances", "16"], "--instances"),
    ("incidental collisions", ["--optimizer", "sgd", "--weight-decay", "0.1"], "--weight-decay"),
    ("incidental dynamics", ["--l1", "1e-6", "--dt", "0.01"], "--dt"),
]


def _flag(command: click.Command, name: str) -> str:
    param = next(param for param in command.params if param.name == name)
    if isinstance(param, click.Argument):
        return param.human_readable_name
    return max(param.opts, key=len)


def _parameter_names(command: click.Command) -> set[str]:
    return {param.name for param in command.params if param.name != "help"}


def _table() -> list:
    rows = []
    for command_name, cases in CASES.items():
        command = COMMANDS[command_name]
        for name, values in cases.items():
            flag = _flag(command, name)
            for values_ in values:
                rows.append(
                    pytest.param(command_name, name, flag, values_, id=f"{command_name}:{flag}={values_}")
                )
    return rows


TABLE = _table()


def test_every_option_has_a_case():
    for command_name, command in COMMANDS.items():
        missing = _parameter_names(command) - set(CASES[command_name])
        assert not missing, f"{command_name}: no bad-input case for {sorted(missing)}"
        stale = set(CASES[command_name]) - _parameter_names(command)
        assert not stale, f"{command_name}: cases for options that no longer exist: {sorted(stale)}"


def test_the_table_is_big():
    # Printed by `pytest -s`; the issue asked for the count.
    print(
        f"\n{len(TABLE)} bad-input cases over {len(COMMANDS)} commands, plus {len(EXTRA_CASES)} combinations"
    )
    assert len(TABLE) >= sum(len(_parameter_names(command)) for command in COMMANDS.values())


def test_every_numeric_option_documents_its_range():
    """A range shows in --help: click's own for the range types, 'range: …' for config options."""
    for command_name, command in COMMANDS.items():
        context = click.Context(command, info_name=command_name)
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            kind = param.type
            item = getattr(kind, "item", kind)
            numeric = isinstance(item, (click.types._NumberParamTypeBase,))
            if not numeric:
                continue
            help_record = param.get_help_record(context)
            text = " ".join(help_record or ())
            bounded = isinstance(item, cli._Limited) and item.max is not None
            # Config options: their field's range (no maximum only where the value costs nothing, σ).
            assert bounded or "range: " in text, f"{command_name} {param.opts}: {text}"


def _run(tmp_path, monkeypatch, command_name: str, arguments: list[str]):
    """Run in an empty folder with a store URI inside it; returns (result, files before, files after)."""
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    arguments = [argument.replace(FILE, str(existing)) for argument in arguments]
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    result = CliRunner().invoke(cli.cli, [*command_name.split(), *arguments])
    after = sorted(str(path) for path in tmp_path.rglob("*"))
    return result, before, after


def _check_refused(result, before, after, named: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    # One line: nothing after the error line, and the option named in it.
    assert result.output.rstrip().splitlines()[-1] == errors[0], result.output
    assert named in errors[0], errors[0]
    assert after == before, "bad input must leave nothing behind"


@pytest.mark.parametrize(("command_name", "name", "flag", "values"), TABLE)
def test_bad_value_is_refused(tmp_path, monkeypatch, command_name, name, flag, values):
    command = COMMANDS[command_name]
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    if values == ["={flag}=1"]:
        arguments = [f"{flag}=1"]
    elif flag == "RUN_ID":
        arguments = values
    else:
        arguments = [flag, *values]
    if name != "tracking_uri":
        arguments += ["--tracking-uri", store]
    if command_name == "inspect" and name != "run_id":
        arguments = [VALID_RUN_ID, *arguments]
    assert _parameter_names(command)  # the command exists
    result, before, after = _run(tmp_path, monkeypatch, command_name, arguments)
    _check_refused(result, before, after, flag)
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(("command_name", "arguments", "named"), EXTRA_CASES)
def test_bad_combination_is_refused(tmp_path, monkeypatch, command_name, arguments, named):
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result, before, after = _run(tmp_path, monkeypatch, command_name, [*arguments, "--tracking-uri", store])
    _check_refused(result, before, after, named)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
        result, before, after = _run(
            tmp_path, monkeypatch, "report", ["--out", str(locked / "report"), "--tracking-uri", store]
        )
        _check_refused(result, before, after, "--out")
    finally:
        locked.chmod(0o700)


def test_the_override_lets_a_big_value_through_the_option_check():
    """--i-know-it-is-big lifts a maximum (the value then reaches the command, not refused by its range)."""
    from pipeline.config import NetworkConfig
    from pipeline.config_tools import ConfigError, size_limits_lifted

    with pytest.raises(ConfigError, match="--i-know-it-is-big"):
        NetworkConfig(hidden_dim=2048)
    with size_limits_lifted():
        assert NetworkConfig(hidden_dim=2048).hidden_dim == 2048
    with pytest.raises(ConfigError):
        NetworkConfig(hidden_dim=2048)  # lifted for the block only
    kind = cli.LimitedInt(min=1, max=10)
    context = click.Context(cli.cli)
    with pytest.raises(click.BadParameter, match="--i-know-it-is-big"):
        kind.convert("11", None, context)
    context.meta[cli._LIMITS_LIFTED] = True
    assert kind.convert("11", None, context) == 11


# ------------------------------------------------------------------------------------------------------------
# Values that pass every check but make training diverge: FAILED seeds with the reason, never FINISHED.


def test_a_diverging_network_is_a_failed_seed_with_the_reason(tiny):
    import dataclasses

    from pipeline.experiments.taming import run_ablation

    config = dataclasses.replace(tiny, network=dataclasses.replace(tiny.network, lr=10.0))
    result = run_ablation(config, seeds=[0, 1])
    assert not result.finished
    for seed in result.failed:
        assert "network loss diverged" in seed.failure and "first-epoch loss" in seed.failure


def test_non_finite_or_exploding_metrics_fail_the_seed(tiny):
    from pipeline.train import SAE_FVU_LIMIT, SeedResult, metrics_failure

    assert metrics_failure({"val_mse": 0.1, "sae_fvu": 0.2, "macs": float("nan")}) is None
    assert "sae_fvu" in metrics_failure({"sae_fvu": float("nan")})
    assert "sae_mse is inf" in metrics_failure({"sae_fvu": float("nan"), "sae_mse": float("inf")})
    # A collapsed network (no variance left in its last hidden layer) has an undefined FVU, not a diverged SAE.
    assert metrics_failure({"sae_fvu": float("nan"), "sae_mse": 0.01, "val_mse": 0.1}) is None
    assert "above the limit" in metrics_failure({"sae_fvu": SAE_FVU_LIMIT * 10})
    seed = SeedResult(config=tiny, seed=0)
    seed.metrics = {"val_mse": float("inf"), "sae_fvu": 0.2}
    assert not seed.finished and "val_mse is inf" in seed.failure


def test_the_report_names_nan_metrics_and_blames_only_given_options():
    import pandas as pd

    from orchestration.report import ReportRequest, _blamed
    from pipeline.analysis import _missing_value_notes

    frame = pd.DataFrame({"config": ["a", "a", "b"], "macs": [0.1, float("nan"), 0.3], "sae_fvu": [0.1] * 3})
    notes = _missing_value_notes(frame, ["macs", "sae_fvu"])
    assert len(notes) == 1 and notes[0].startswith("macs is NaN or infinite for 1 of 3 finished seeds (a)")
    assert _blamed("metric(s) ['x'] are not in the store", ReportRequest()) == "the selected runs"
    assert _blamed("metric(s) ['x'] are not in the store", ReportRequest(metrics=("x",))) == "--metric"
    assert _blamed("baseline 'q' has no finished seeds", ReportRequest(baseline="q")) == "--baseline"
    assert _blamed("baseline 'q' has no finished seeds", ReportRequest(sweep_id="latest")).startswith(
        "the selected runs (--sweep-id latest"
    )


def test_a_network_whose_last_hidden_layer_died_is_a_finished_seed_with_nan_fvu(tiny):
    """Strong regularization can kill every unit of the last hidden layer: FVU is then 0/0 (NaN), every
    other metric is defined, and the seed is a result to report, not a failure."""
    import math

    import torch

    from pipeline.data import make_dataset
    from pipeline.evaluation import evaluate_seed
    from pipeline.experiments.taming import run_ablation
    from pipeline.train import metrics_failure

    trained = run_ablation(tiny, seeds=[0]).seeds[0]
    network = trained.network
    with torch.no_grad():
        last_hidden = network.layers[-2]
        last_hidden.weight.zero_()
        last_hidden.bias.fill_(-1.0)  # ReLU(−1) = 0 for every sample: no variance left
    metrics = evaluate_seed(tiny, network, trained.sae, make_dataset(tiny.data, 0))
    assert math.isnan(metrics["sae_fvu"]) and math.isfinite(metrics["sae_mse"])
    assert metrics["neuron_polysemantic"] == 0 and metrics["dead_neurons"] == 1.0
    # The SAE trained on a constant: its directions decompose nothing, so their metrics are undefined.
    assert (
        math.isnan(metrics["macs"])
        and math.isnan(metrics["interference"])
        and math.isnan(metrics["feature_mcc"])
    )
    assert metrics_failure(metrics) is None
