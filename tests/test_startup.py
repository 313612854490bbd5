"""What the sweep command's start-up and recording rely on for speed, checked so it does not creep back.

The sweep starts its worker processes right after its configs are checked, so checking them must not
import torch (about 0.8 s on 2 cores, during which a second core would sit idle); and a seed run's
artifacts go straight to its local artifact folder, without the client's look-up of the run.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import SAEConfig, check_field_choices
from pipeline.config_tools import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def printed_by_a_fresh_python(code: str) -> str:
    """What `code` prints when run by a new interpreter in the checkout (so nothing is imported yet)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_default_sae_architecture_is_in_the_registry():
    # check_field_choices skips the registry look-up for a default value; that is sound only if the
    # default is a registered architecture.
    from pipeline.sae import ARCHITECTURES

    default = next(item.default for item in dataclasses.fields(SAEConfig) if item.name == "architecture")
    assert default in ARCHITECTURES
    check_field_choices(SAEConfig(), "sae.")


def test_an_unknown_sae_architecture_is_still_rejected():
    with pytest.raises(ConfigError, match="sae.architecture must be one of leaky_relu"):
        SAEConfig(architecture="matching_pursuit")


def test_checking_the_preset_configs_does_not_import_torch():
    code = (
        "import sys\n"
        "from pipeline.config import AblationConfig, preset_configs\n"
        "for preset in ('strategic', 'factorial'):\n"
        "    preset_configs(preset, AblationConfig())\n"
        "print('torch' in sys.modules)\n"
    )
    assert printed_by_a_fresh_python(code).strip() == "False"


def test_log_files_with_the_run_artifact_uri_writes_into_the_run(tmp_path):
    from tracking.recorder import log_files
    from tracking.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = store.client.create_experiment("startup", artifact_location=str(tmp_path / "artifacts"))
    info = store.client.create_run(experiment_id).info
    log_files(
        store,
        info.run_id,
        {"nested/a.txt": lambda path: path.write_text("a"), "b.bin": lambda path: path.write_bytes(b"b")},
        artifact_uri=info.artifact_uri,
    )
    listed = {item.path for item in store.client.list_artifacts(info.run_id)}
    assert listed == {"nested", "b.bin"}
    assert [item.path for item in store.client.list_artifacts(info.run_id, "nested")] == ["nested/a.txt"]
    assert (Path(info.artifact_uri.removeprefix("file://")) / "nested" / "a.txt").read_text() == "a"


def test_the_recording_side_imports_neither_statsmodels_nor_scipy_stats():
    # A sweep's process records summaries through stats.describe only; the two libraries cost it about
    # 0.6 s of a core shared with the training workers.
    code = (
        "import sys\n"
        "import tracking.taming, orchestration.taming\n"
        "from pipeline import stats\n"
        "stats.describe([1.0, 2.0, 4.0])\n"
        "print('statsmodels' in sys.modules, 'scipy.stats' in sys.modules)\n"
    )
    assert printed_by_a_fresh_python(code).split() == ["False", "False"]


def test_describe_uses_the_student_t_quantile_scipy_stats_gives():
    import math

    import numpy as np
    import scipy.stats

    from pipeline import stats

    values = np.array([0.3, 1.7, 2.2, 0.9, 1.4])
    described = stats.describe(values, confidence=0.9)
    half_width = scipy.stats.t.ppf(0.95, df=4) * values.std(ddof=1) / math.sqrt(5)
    assert described["ci_high"] - described["mean"] == pytest.approx(half_width, rel=1e-12)
    assert described["mean"] - described["ci_low"] == pytest.approx(half_width, rel=1e-12)
