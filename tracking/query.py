"""Reading the tracking store back: tidy per-seed tables, runs by id, checkpoints."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.config import FACTOR_LEVELS
from tracking.recorder import search_all
from tracking.store import Store
from tracking.taming import CHECKPOINT_PATH

SEED_COLUMNS = (
    "run_id",
    "parent_run_id",
    "config",
    *FACTOR_LEVELS,
    "seed",
    "status",
    "config_hash",
    "code_version",
    "sweep_id",
    "failure_reason",
    "start_time",
)


def seed_frame(
    store: Store,
    experiment_ids: list[str],
    filter_string: str | None = None,
    statuses: tuple[str, ...] | None = ("FINISHED",),
) -> pd.DataFrame:
    """One row per seed run: identity columns (SEED_COLUMNS), one column per setting (the run's params,
    `network.lambda_reg`, ... as text), then one column per logged metric.

    This is the documented way to get every seed with every setting as a DataFrame:
    `seed_frame(open_store(None), [experiment_id])`.

    `filter_string` is an MLflow search filter added to `tags.kind = 'seed'` (e.g.
    "tags.sweep_id = 'abc'"); `statuses` keeps runs in those states (None keeps all). Seed runs whose
    ablation run was deleted (a --force re-run retires the old one) are not returned.
    """
    query = "tags.kind = 'seed'" + (f" and {filter_string}" if filter_string else "")
    runs = search_all(store, experiment_ids, query)
    rows = []
    for run in runs:
        if statuses is not None and run.info.status not in statuses:
            continue
        tags = run.data.tags
        row = {
            "run_id": run.info.run_id,
            "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID),
            "config": tags.get("config_name", "·".join(tags.get(f, "?") for f in FACTOR_LEVELS)),
            **{factor: tags.get(factor) for factor in FACTOR_LEVELS},
            "seed": int(tags.get("seed", -1)),
            "status": run.info.status,
            "config_hash": tags.get("config_hash"),
            "code_version": tags.get("code_version"),
            "sweep_id": tags.get("sweep_id"),
            "failure_reason": tags.get("failure_reason"),
            "start_time": run.info.start_time,
        }
        # Settings (seed runs carry the flattened config as params), then metrics.
        row.update({name: value for name, value in run.data.params.items() if name not in row})
        row.update({name: value for name, value in run.data.metrics.items() if not name.startswith("curve.")})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(SEED_COLUMNS))
    if frame.empty:
        return frame
    return frame.sort_values(["config", "seed"]).reset_index(drop=True)


def load_seed_checkpoint(store: Store, run_id: str) -> dict:
    """Download a seed run's checkpoint and load it with `weights_only=True`."""
    with tempfile.TemporaryDirectory() as folder:
        path = store.client.download_artifacts(run_id, CHECKPOINT_PATH, folder)
        return torch.load(Path(path), weights_only=True)


def logged_metrics(run) -> dict[str, float]:
    return {
        name: value
        for name, value in run.data.metrics.items()
        if not name.startswith("curve.") and math.isfinite(value)
    }
