"""`inspect`: a logged run checked against what is stored for it.

A seed run's checkpoint is loaded, its data regenerated from the stored config and seed, every metric
recomputed (`pipeline.evaluation.reevaluate`) and compared with the logged value.

The checkpoint is verified against the run before anything is sized from it (`load_seed_checkpoint`): a
missing, unreadable or edited checkpoint raises `pipeline.evaluation.CheckpointError` (imported where it is
caught, so importing this module stays free of torch) with one sentence, which the CLI reports
with exit code 1 (a failed verification, like a metric that does not reproduce; 2 is for bad usage).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pandas as pd

from orchestration.taming import InputError, open_store, reports_store_faults

# Recomputed metrics must equal the logged ones to this relative tolerance (same code, same CPU: exact in
# practice; the slack only absorbs float formatting).
TOLERANCE = 1e-9


@dataclass
class Inspection:
    kind: str
    name: str
    status: str
    table: pd.DataFrame | None = None
    failure: str | None = None
    mismatches: int = 0

    @property
    def reproduced(self) -> bool:
        return self.failure is None and self.mismatches == 0


@reports_store_faults
def inspect_run(tracking_uri: str | None, run_id: str) -> Inspection:
    """The run's stored state checked against its artifacts.

    Raises InputError (exit 2) for a run id the store does not have, and CheckpointError (exit 1) for a
    seed run whose checkpoint is missing, unreadable or disagrees with what the run recorded.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.evaluation import reevaluate
    from tracking.query import load_seed_checkpoint, logged_metrics

    store = open_store(tracking_uri, writing=False)
    try:
        run = store.client.get_run(run_id)
    except MlflowException as error:
        raise InputError(
            f"RUN_ID {run_id!r} was not found in {store.uri}: {error.message.splitlines()[0]}"
        ) from None
    kind = run.data.tags.get("kind") or "run"
    inspection = Inspection(kind, run.data.tags.get("mlflow.runName", run_id), run.info.status)
    if kind == "seed":
        if run.info.status != "FINISHED":
            inspection.failure = run.data.tags.get("failure_reason", "unknown")
            return inspection
        recomputed = reevaluate(load_seed_checkpoint(store, run_id, run))
        logged = logged_metrics(run)
        rows = []
        for metric, value in recomputed.items():
            stored = logged.get(metric, math.nan)
            equal = abs(stored - value) <= TOLERANCE * max(1.0, abs(value))
            inspection.mismatches += not equal
            rows.append(
                {"metric": metric, "logged": stored, "recomputed": value, "match": "yes" if equal else "NO"}
            )
        inspection.table = pd.DataFrame(rows)
    elif kind == "ablation":
        path = store.client.download_artifacts(run_id, "seeds.csv")
        with open(path) as handle:
            inspection.table = pd.read_csv(io.StringIO(handle.read()))
    else:
        inspection.table = pd.DataFrame(sorted(run.data.metrics.items()), columns=["metric", "value"])
    return inspection
