"""Reading the tracking store back: tidy per-seed tables, runs by id, checkpoints."""

from __future__ import annotations

import math
import pickle
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.config import FACTOR_LEVELS
from tracking.recorder import search_all
from tracking.store import Store
from tracking.taming import CHECKPOINT_PATH, config_params

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


def load_seed_checkpoint(store: Store, run_id: str, run=None) -> dict:
    """A seed run's checkpoint, loaded with `weights_only=True` and verified against the run.

    Raises `pipeline.evaluation.CheckpointError` (one sentence) when the run has no checkpoint (recorded with
    --no-artifacts), when the file does not load (tampered or truncated bytes), or when it disagrees with
    what the run recorded: its config must hash to the run's `config_hash` tag, every setting must equal the
    run's param of the same name (params cannot be changed after logging, unlike tags), and its seed must
    be the run's. Tensor shapes are checked against that verified config (`check_checkpoint`). So nothing
    downstream sizes data or modules from a number the run did not record.

    `run` is the run's `mlflow.entities.Run` when the caller already fetched it.
    """
    from pipeline.evaluation import CheckpointError, check_checkpoint

    if run is None:
        run = store.client.get_run(run_id)
    folder_name, _, file_name = CHECKPOINT_PATH.rpartition("/")
    stored = {Path(item.path).name for item in store.client.list_artifacts(run_id, folder_name)}
    if file_name not in stored:
        raise CheckpointError(
            f"seed run {run_id} has no {CHECKPOINT_PATH} artifact (it was recorded with --no-artifacts, or "
            "the file was removed), so its metrics cannot be recomputed"
        )
    # ignore_cleanup_errors: where a mapped file cannot be deleted while mapped (Windows), leave it behind.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
        path = store.client.download_artifacts(run_id, CHECKPOINT_PATH, folder)
        reason = None
        if not zipfile.is_zipfile(path):
            reason = "the file is not a torch checkpoint archive"
        else:
            try:
                # mmap: tensors are mapped from the file rather than read into memory, so an inflated tensor
                # costs nothing until the shape check below has rejected it.
                saved = torch.load(Path(path), weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                reason = "its pickle is malformed or holds objects other than tensors and plain containers"
            except Exception as error:  # noqa: BLE001 - any other failure to read means an unusable file
                reason = f"reading it raised {type(error).__name__}"
    if reason is not None:
        # Torch's own message is not passed on: it advises loading with weights_only=False, which would run
        # whatever code the file carries.
        raise CheckpointError(
            f"the checkpoint of seed run {run_id} cannot be loaded safely ({reason}); it is corrupted or was "
            "tampered with"
        )
    tags = run.data.tags
    try:
        config = check_checkpoint(saved, expected_hash=tags.get("config_hash"))
    except CheckpointError as error:
        raise CheckpointError(f"seed run {run_id}: {error}") from None
    recorded = run.data.params
    differing = sorted(
        name for name, value in config_params(config).items() if name in recorded and recorded[name] != value
    )
    if differing:
        raise CheckpointError(
            f"seed run {run_id}: the checkpoint's config differs from the run's recorded params in "
            f"{', '.join(differing[:5])}{' …' if len(differing) > 5 else ''}"
        )
    if "seed" in tags and str(saved["seed"]) != tags["seed"]:
        raise CheckpointError(
            f"seed run {run_id}: the checkpoint is for seed {saved['seed']} but the run is seed "
            f"{tags['seed']}"
        )
    return saved


def logged_metrics(run) -> dict[str, float]:
    return {
        name: value
        for name, value in run.data.metrics.items()
        if not name.startswith("curve.") and math.isfinite(value)
    }
