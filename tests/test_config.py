import dataclasses

import pytest

from pipeline.config import (
    FACTORIAL_CONFIGURATIONS,
    STRATEGIC_CONFIGURATIONS,
    AblationConfig,
    DataConfig,
    NetworkConfig,
    SAEConfig,
    preset_configs,
)
from pipeline.config_tools import ConfigError, flatten


def test_defaults_are_the_published_ones():
    config = AblationConfig()
    assert config.data.group_sizes == (3, 2, 3)
    assert config.data.groups == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert (config.data.train_samples, config.data.validation_samples) == (820, 204)
    assert (config.network.hidden_dim, config.network.hidden_layers, config.network.epochs) == (12, 4, 2000)
    assert (config.network.lambda_reg, config.network.sigma, config.network.lr) == (1e-4, 0.1, 1e-3)
    assert (config.sae.d_sae, config.sae.epochs, config.sae.l1_coefficient) == (16, 1000, 1e-4)
    assert config.name == "random·bipolar·l1·relu"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NetworkConfig(init="rand"), "init must be one of random, orthogonal; got 'rand'"),
        (
            lambda: NetworkConfig(noise="laplace"),
            "noise must be one of none, bipolar, positive_kurtosis, gaussian",
        ),
        (lambda: NetworkConfig(reg="l3"), "reg must be one of none, l1, l2"),
        (lambda: NetworkConfig(act="tanh"), "act must be one of relu, gelu"),
        (lambda: NetworkConfig(sigma=-0.1), "sigma must be >= 0"),
        (lambda: NetworkConfig(lambda_reg=-1.0), "lambda_reg must be >= 0"),
        (lambda: NetworkConfig(epochs=0), "epochs must be an integer >= 1"),
        (lambda: NetworkConfig(l2_form="coupled"), "l2_form must be one of decay, penalty"),
        (
            lambda: SAEConfig(architecture="matching_pursuit"),
            "sae.architecture must be one of leaky_relu, published_tied, relu, topk, batch_topk, jumprelu, gated",
        ),
        (lambda: DataConfig(group_sizes=(4, 4)), "data.targets 'published' is defined only for"),
        (lambda: DataConfig(samples=4, validation_fraction=0.1), "leaves 4 train and 0 validation"),
    ],
)
def test_validation_names_the_field_and_allowed_values(build, message):
    with pytest.raises(ConfigError) as error:
        build()
    assert message in str(error.value)


def test_round_trip_and_strict_loader():
    config = AblationConfig().with_factors("orthogonal", "positive_kurtosis", "l2", "gelu")
    assert AblationConfig.from_dict(config.to_dict()) == config
    broken = config.to_dict()
    broken["network"]["sigmaa"] = 0.2
    with pytest.raises(ConfigError, match="unknown config key.*network.sigmaa"):
        AblationConfig.from_dict(broken)
    # A loaded config is validated like a constructed one.
    bad = config.to_dict()
    bad["network"]["act"] = "tanh"
    with pytest.raises(ConfigError, match="act must be one of"):
        AblationConfig.from_dict(bad)


def test_hash_is_stable_and_sensitive():
    config = AblationConfig()
    assert config.hash() == AblationConfig().hash()
    assert len(config.hash()) == 16
    changed = dataclasses.replace(config, network=dataclasses.replace(config.network, sigma=0.2))
    assert changed.hash() != config.hash()
    assert config.with_factors("random", "bipolar", "l1", "gelu").hash() != config.hash()


def test_flatten_names_every_field():
    flat = flatten(AblationConfig())
    assert flat["network.init"] == "random"
    assert flat["data.group_sizes"] == [3, 2, 3]
    assert flat["sae.d_sae"] == 16
    assert (
        len(flat)
        == len(dataclasses.fields(DataConfig))
        + len(dataclasses.fields(NetworkConfig))
        + len(dataclasses.fields(SAEConfig))
        + 2
    )


def test_presets():
    assert len(STRATEGIC_CONFIGURATIONS) == 8 and len(set(STRATEGIC_CONFIGURATIONS)) == 8
    assert len(FACTORIAL_CONFIGURATIONS) == 16 and len(set(FACTORIAL_CONFIGURATIONS)) == 16
    assert set(STRATEGIC_CONFIGURATIONS) <= set(FACTORIAL_CONFIGURATIONS)
    names = [config.name for config in preset_configs("strategic")]
    assert names[0] == "random·bipolar·l1·relu" and names[-1] == "orthogonal·positive_kurtosis·l2·gelu"
    with pytest.raises(ConfigError, match="preset must be one of strategic, factorial"):
        preset_configs("all")


def test_description_names_what_differs_from_baseline():
    text = AblationConfig().with_factors("random", "bipolar", "l2", "gelu").describe()
    assert "reg = l2" in text and "act = gelu" in text and "init" not in text.split("Differs")[1]


def test_with_epochs_changes_only_the_epoch_counts():
    config = AblationConfig().with_factors("orthogonal", "bipolar", "l2", "gelu")
    quick = config.with_epochs(200, 100)
    assert (quick.network.epochs, quick.sae.epochs) == (200, 100)
    assert dataclasses.replace(quick.network, epochs=2000) == config.network
    assert dataclasses.replace(quick.sae, epochs=1000) == config.sae and quick.data == config.data
