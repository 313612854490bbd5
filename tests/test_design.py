"""Designs: loading, checking, expanding into configurations, naming; pass sharing derived from the fields."""

import dataclasses
import itertools
import math

import pytest
import torch

from pipeline.config import (
    FACTOR_LEVELS,
    FACTORIAL_CONFIGURATIONS,
    STRATEGIC_CONFIGURATIONS,
    AblationConfig,
    pass_key,
    preset_configs,
)
from pipeline.config_tools import leaf_values, replace_leaves
from pipeline.design import (
    Design,
    DesignError,
    configuration_label,
    field_specs,
    load_design,
    parse_design,
    varying_paths,
)
from pipeline.experiments.taming import evaluate
from pipeline.train import train_pass
from tests.conftest import tiny_config

# The config hashes the presets had before they became design files (commit 1ca4ab8, computed there with
# `[c.hash() for c in preset_configs(p)]`): stores made then must keep being reused.
HASHES_BEFORE_DESIGNS = {
    "strategic": [
        "d978ea62a5fbf83f", "6fc4acc6d2687b96", "2fc918417d256797", "0b5cec895db9bd6e",
        "e5bf55425878c33f", "d3ac99a944244b71", "2dc9cc343cae1bf9", "a14745b37b33e91b",
    ],
    "factorial": [
        "d978ea62a5fbf83f", "6b8b4721f7ef0e6c", "24c24e12746a254d", "0b5cec895db9bd6e",
        "2fc918417d256797", "dc048c865fd8819b", "2dc9cc343cae1bf9", "4fdb134043d4b082",
        "6fc4acc6d2687b96", "dfc4c481ad192e57", "338143628b690066", "e5bf55425878c33f",
        "d3ac99a944244b71", "2ac7053d50175667", "08d0679f7ce32ee1", "a14745b37b33e91b",
    ],
}  # fmt: skip


@pytest.mark.parametrize("preset", ["strategic", "factorial"])
def test_shipped_presets_keep_their_config_hashes(preset):
    configs = load_design(preset).configs()
    assert [config.hash() for config in configs] == HASHES_BEFORE_DESIGNS[preset]
    cells = STRATEGIC_CONFIGURATIONS if preset == "strategic" else FACTORIAL_CONFIGURATIONS
    assert configs == [AblationConfig().with_factors(*cell) for cell in cells]
    assert preset_configs(preset) == configs


def test_grid_is_the_cartesian_product_with_the_last_axis_fastest():
    design = parse_design({"grid": {"network.lambda_reg": [1e-5, 1e-4, 1e-3], "reg": ["l1", "l2"]}})
    configs = design.configs()
    expected = list(itertools.product([1e-5, 1e-4, 1e-3], ["l1", "l2"]))
    assert [(c.network.lambda_reg, c.network.reg) for c in configs] == expected
    assert varying_paths(configs) == ["network.reg", "network.lambda_reg"]
    labels = [configuration_label(config, varying_paths(configs)) for config in configs]
    assert (
        labels[0] == "random·bipolar·l1·relu · λ=1e-05" and labels[-1] == "random·bipolar·l2·relu · λ=0.001"
    )
    assert len(set(labels)) == 6


def test_cases_cross_the_grid_and_fixed_applies_to_all():
    design = parse_design(
        {
            "fixed": {"network": {"epochs": 300}, "sae.epochs": 150},
            "cases": [{"network.init": "random"}, {"network.init": "orthogonal", "network.act": "gelu"}],
            "grid": {"network.hidden_dim": [9, 12]},
            "seeds": 3,
        }
    )
    configs = design.configs()
    assert [(c.network.init, c.network.act, c.network.hidden_dim) for c in configs] == [
        ("random", "relu", 9),
        ("random", "relu", 12),
        ("orthogonal", "gelu", 9),
        ("orthogonal", "gelu", 12),
    ]
    assert {(c.network.epochs, c.sae.epochs) for c in configs} == {(300, 150)}
    assert design.seeds == 3
    assert configuration_label(configs[2], varying_paths(configs)) == "orthogonal·bipolar·l1·gelu · hidden=9"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"grid": {"network.lamda_reg": [1]}}, "unknown setting 'network.lamda_reg'"),
        ({"grid": {"epochs": [1, 2]}}, "names several settings (network.epochs, sae.epochs)"),
        ({"grid": {"network.reg": []}}, "network.reg in grid of design x needs a non-empty list"),
        ({"grid": {"network.reg": ["l3"]}}, "network.reg in grid of design x must be one of none, l1, l2"),
        (
            {"grid": {"network.hidden_dim": [9.5]}},
            "network.hidden_dim in grid of design x must be an integer",
        ),
        ({"grid": {"network.lambda_reg": ["abc"]}}, "must be a number; got 'abc'"),
        ({"grid": {"network.lambda_reg": [-1.0]}}, "network.lambda_reg must be >= 0; got -1.0"),
        ({"fixed": {"network.sigma": "nan"}}, "network.sigma in fixed of design x must be a finite number"),
        ({"cases": [{"network.init": "random"}, {"network.init": "random"}]}, "give the same configuration"),
        ({"grid": {"network.reg": ["l1", "l1"]}}, "lists a value twice"),
        ({"fixed": {"network.reg": "l2"}, "grid": {"network.reg": ["l1", "l2"]}}, "both fixed and varied"),
        ({"axes": {}}, "unknown key(s) axes"),
        ({"seeds": 0}, "seeds in design x must be an integer >= 1"),
        ({"study": "incidental"}, "study in design x must be taming"),
    ],
)
def test_bad_designs_name_the_key_and_the_allowed_values(data, message):
    with pytest.raises(DesignError) as error:
        parse_design(data, name="x").configs()
    assert message in str(error.value)


def test_design_files_in_toml_and_yaml(tmp_path):
    (tmp_path / "mine.toml").write_text("seeds = 2\n[grid]\nnetwork.sigma = [0.05, 0.2]\n")
    (tmp_path / "mine.yaml").write_text("seeds: 2\ngrid:\n  network.sigma: [0.05, 0.2]\n")
    toml_configs = load_design(tmp_path / "mine.toml").configs()
    assert load_design(tmp_path / "mine.yaml").configs() == toml_configs
    assert [config.network.sigma for config in toml_configs] == [0.05, 0.2]
    (tmp_path / "broken.toml").write_text("grid = [\n")
    with pytest.raises(DesignError, match="is not valid TOML"):
        load_design(tmp_path / "broken.toml")
    with pytest.raises(DesignError, match="no design named 'nosuch'; shipped designs: .*strategic"):
        load_design("nosuch")


def test_overrides_refuse_to_fix_an_axis():
    strategic = load_design("strategic")
    with pytest.raises(DesignError, match="network.reg varies in design 'strategic'"):
        strategic.with_overrides({"network.reg": "l2"})
    with pytest.raises(DesignError, match="already an axis"):
        strategic.with_overrides(grid={"network.init": ("random",)})
    widened = strategic.with_overrides({"network.epochs": 300}, {"network.lambda_reg": (1e-4, 1e-3)})
    assert len(widened.configs()) == 16


def test_every_option_is_derived_once_and_the_published_flags_survive():
    specs = field_specs()
    options = [spec.option for spec in specs.values()]
    assert len(options) == len(set(options))
    published = {
        "network.epochs": "--epochs",
        "sae.epochs": "--sae-epochs",
        "network.lambda_reg": "--lambda-reg",
        "network.l2_form": "--l2-form",
        "network.hidden_dim": "--hidden-dim",
        "sae.d_sae": "--d-sae",
        "sae.architecture": "--sae-architecture",
        "sae.l1_coefficient": "--sae-l1",
        "sae.lr": "--sae-lr",
        "data.samples": "--samples",
        "network.init": "--init",
    }
    assert {path: specs[path].option for path in published} == published
    assert all(spec.help for spec in specs.values()), "every field needs a help sentence"
    assert {path: spec.default for path, spec in specs.items()} == leaf_values(AblationConfig())
    from pipeline.sae import ARCHITECTURES

    assert specs["sae.architecture"].choices == tuple(ARCHITECTURES)


def _alternative(path: str, value):
    """Another valid value of a field, for the pass-sharing test."""
    spec = field_specs()[path]
    if spec.choices:
        return next(choice for choice in spec.choices if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if 0 < value <= 1 else value * 2 if value else 0.01
    if isinstance(value, tuple):
        return (4, 4)
    raise AssertionError(f"no alternative for {path}")


def _companion(path: str, base: AblationConfig) -> AblationConfig:
    """`base` with one field changed to another valid value (and what that value needs)."""
    value = leaf_values(base)[path]
    changes = {path: _alternative(path, value)}
    if path == "data.group_sizes":
        changes["data.targets"] = "pairwise"
    if path == "data.strength_low":
        changes[path] = 0.25
    if path == "data.strength_high":
        changes[path] = 0.75
    return replace_leaves(base, changes)


def test_pass_key_splits_every_field_the_engine_does_not_take_per_model():
    base = tiny_config()
    for path, spec in field_specs().items():
        other = _companion(path, base)
        assert other != base, path
        same_pass = pass_key(other) == pass_key(base)
        assert same_pass == spec.per_model, f"{path}: per_model={spec.per_model} but same pass={same_pass}"


def _parameters(result) -> list[torch.Tensor]:
    return [*result.network.state_dict().values(), *result.sae.state_dict().values()]


@pytest.mark.parametrize("path", [path for path, spec in field_specs().items() if spec.per_model])
def test_every_per_model_field_really_is_taken_per_model(path):
    """A configuration trained beside one that differs in a per_model field ends exactly where it ends
    alone: the engine did not read the field from the pass's first configuration."""
    base = dataclasses.replace(tiny_config(), curve_every=5)
    if path == "network.elastic_alpha":  # α acts only in the elastic net
        base = replace_leaves(base, {"network.reg": "elastic"})
    other = _companion(path, base)
    together = [evaluate(result) for result in train_pass([base, other], [3, 3])]
    alone = [evaluate(train_pass([config], [3])[0]) for config in (base, other)]
    for mixed, single in zip(together, alone, strict=True):
        for left, right in zip(_parameters(mixed), _parameters(single), strict=True):
            assert torch.allclose(left, right, atol=1e-6), path
        for metric, value in single.metrics.items():
            mixed_value = mixed.metrics[metric]
            assert (math.isnan(value) and math.isnan(mixed_value)) or abs(mixed_value - value) <= 1e-6 * max(
                1, abs(value)
            ), (path, metric)
    # And the field matters: the two configurations did not train the same model.
    assert together[0].metrics != together[1].metrics or path == "network.l2_form", path


def test_factor_levels_are_the_designs_axes():
    factorial = load_design("factorial")
    assert {path.removeprefix("network."): values for path, values in factorial.grid.items()} == FACTOR_LEVELS


def test_design_round_trips_through_its_dict(tmp_path):
    design = load_design("lambda")
    again = parse_design(design.to_dict(), name="lambda")
    assert again.configs() == design.configs()
    assert isinstance(design, Design) and len(design.configs()) == 24
