"""Shared fixtures: tiny configurations so the suite runs in seconds on 2 cores.

Tiny means few samples and epochs, not other widths: the fused engine compiles its kernels once per
width pair (network: features, hidden; SAE: hidden, latents), 30-75 s each on a cold cache such as CI's.
The suite keeps to the default widths (8 features, hidden 12, 16 latents) wherever it trains with it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """The session's empty-store template (tracking.store.store_template_path): built by the first test
    that creates a store, copied by the rest, and never the user's own cache."""
    return tmp_path_factory.mktemp("store-template") / "empty-store.db"


@pytest.fixture(autouse=True)
def _work_in_a_temporary_folder(tmp_path, monkeypatch, store_template):
    """Every test runs in its own folder, so nothing (mlflow.db, mlruns/, reports/) lands in the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYLAB_STORE_TEMPLATE", str(store_template))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def tiny_config(**network_fields) -> AblationConfig:
    """A published-shaped config with few samples and epochs."""
    return AblationConfig(
        data=DataConfig(samples=96),
        network=NetworkConfig(epochs=24, **network_fields),
        sae=SAEConfig(epochs=12),
        curve_every=10,
        metric_null_draws=20,
    )


@pytest.fixture
def tiny() -> AblationConfig:
    return tiny_config()


def with_network(config: AblationConfig, **fields) -> AblationConfig:
    return dataclasses.replace(config, network=dataclasses.replace(config.network, **fields))
