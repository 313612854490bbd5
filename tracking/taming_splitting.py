"""Recording the splitting remedy on a stored taming sweep's networks, and reading it back.

Run tree (in the sweep's experiment, beside it; every run tagged study=taming):

    invocation run  kind=split_sweep  one per `split` command: tags command=split, source_sweep_id; params
                                      the ε and epoch lists; once done, the comparison table
                                      (splitting.csv, per_configuration.csv), the figures (PNG), the
                                      readings as its description, networks_split / networks_reused metrics
      network run   kind=split        one per (stored network, arm, fine-tuning epochs), nested under the
                                      invocation that computed it. Tags: source_sweep_id, network_run_id
                                      (the seed run whose checkpoint held the network), source_run_id (its
                                      ablation run), config, config_hash, seed, arm (baseline | split),
                                      epsilon ("none" for the baseline), epochs, code_version. Params:
                                      epsilon, epochs, split, relative_threshold, min_attribution. Metrics:
                                      every field of `pipeline.experiments.taming_splitting.RECORD_FIELDS`
                                      (before and after, one value each).

A network run is created only once its result exists, and FINISHED as soon as its params and metrics are
logged, so FINISHED means complete; a network whose fine-tuning diverged gets a FAILED run with the reason.
An exception (Ctrl-C included) marks the invocation run FAILED with the reason; network runs already
FINISHED stay and are reused.

Identity and resume: a network run's identity is (network_run_id, arm, epsilon, epochs, code_version,
thresholds). A re-run finds the FINISHED identities of the sweep and computes only the (arm, epochs) points
that some network still lacks, recording only the missing networks, so nothing is recorded twice. `force`
computes everything again and deletes the older FINISHED runs of each identity it recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from mlflow.entities import Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from pipeline.experiments.taming_splitting import RECORD_FIELDS, Arm, SplitRecord, SplitSettings
from tracking.recorder import (
    FINISHED,
    NOTE_TAG,
    create_child_run,
    fail_run,
    figure_writer,
    finite_metrics,
    log_files,
    now_ms,
    owner_tags,
    retire_runs,
    search_all,
    without_logged,
)
from tracking.store import Store, code_version, git_commit, log_in_batches

STUDY = "taming"
INVOCATION_KIND = "split_sweep"
NETWORK_KIND = "split"
TABLE_ARTIFACT = "splitting.csv"
PER_CONFIGURATION_ARTIFACT = "per_configuration.csv"
DEFAULT_SETTINGS = SplitSettings()


def epsilon_tag(arm: Arm) -> str:
    """The arm's ε as a tag: repr of the float ("0.01", "0.0"), "none" for the baseline."""
    return "none" if arm.epsilon is None else repr(float(arm.epsilon))


def identity_key(network_run_id: str, arm: Arm, epochs: int) -> tuple[str, str, str, str]:
    return (network_run_id, "split" if arm.split else "baseline", epsilon_tag(arm), str(int(epochs)))


def _settings_tags(settings: SplitSettings) -> dict[str, str]:
    return {
        "relative_threshold": repr(float(settings.relative_threshold)),
        "min_attribution": repr(float(settings.min_attribution)),
    }


def _sweep_filter(source_sweep_id: str, settings: SplitSettings, current_code: bool = True) -> str:
    if "'" in source_sweep_id:
        raise ValueError(f"sweep id {source_sweep_id!r} cannot be searched (quote in it)")
    query = f"tags.study = '{STUDY}' and tags.kind = '{NETWORK_KIND}' and tags.source_sweep_id = '{source_sweep_id}'"
    for name, value in _settings_tags(settings).items():
        query += f" and tags.{name} = '{value}'"
    if current_code:
        query += f" and tags.code_version = '{code_version()}'"
    return query


def finished_identities(
    store: Store, experiment_id: str, source_sweep_id: str, settings: SplitSettings
) -> dict[tuple[str, str, str, str], list[str]]:
    """FINISHED network runs of the sweep under the current code version: identity key → run ids, newest
    first."""
    runs = search_all(
        store,
        [experiment_id],
        _sweep_filter(source_sweep_id, settings) + f" and attributes.status = '{FINISHED}'",
        order_by=["attributes.start_time DESC"],
    )
    found: dict[tuple[str, str, str, str], list[str]] = {}
    for run in runs:
        tags = run.data.tags
        key = (
            tags.get("network_run_id", ""),
            tags.get("arm", ""),
            tags.get("epsilon", ""),
            tags.get("epochs", ""),
        )
        found.setdefault(key, []).append(run.info.run_id)
    return found


def start_invocation(
    store: Store,
    experiment_id: str,
    source_sweep_id: str,
    params: Mapping[str, Any],
    adopted_run_id: str | None = None,
) -> str:
    """The RUNNING invocation run (or the run `mlflow run` created, adopted), tagged and with its params."""
    name = f"split {source_sweep_id}"
    tags = {
        "kind": INVOCATION_KIND,
        "study": STUDY,
        "command": "split",
        "source_sweep_id": source_sweep_id,
        "code_version": code_version(),
        "git_commit": git_commit(),
        MLFLOW_RUN_NAME: name,
        **owner_tags(),
    }
    if adopted_run_id is None:
        run_id = store.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    else:
        run_id = adopted_run_id
        log_in_batches(store, run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    log_in_batches(
        store,
        run_id,
        params=without_logged(store, run_id, [Param(key, str(value)) for key, value in params.items()]),
    )
    return run_id


def log_records(
    store: Store,
    experiment_id: str,
    invocation_run_id: str,
    records: Sequence[SplitRecord],
    networks: Mapping[str, Mapping[str, str]],
    settings: SplitSettings,
) -> list[str]:
    """One network run per record (its key is the network's seed run id); `networks[key]` holds the tags
    that describe it (config, config_hash, seed, source_run_id, source_sweep_id). Returns the run ids."""
    run_ids = []
    for record in records:
        arm = record.arm
        described = networks[record.key]
        tags = {
            "kind": NETWORK_KIND,
            "study": STUDY,
            "network_run_id": str(record.key),
            **described,
            "arm": "split" if arm.split else "baseline",
            "epsilon": epsilon_tag(arm),
            "epochs": str(record.epochs),
            "code_version": code_version(),
            **_settings_tags(settings),
        }
        name = f"{described.get('config', '?')} · seed {described.get('seed', '?')} · {arm.label} · +{record.epochs}"
        run_id = create_child_run(store, experiment_id, invocation_run_id, name, tags)
        params = {
            "epsilon": epsilon_tag(arm),
            "epochs": record.epochs,
            "split": arm.split,
            "relative_threshold": settings.relative_threshold,
            "min_attribution": settings.min_attribution,
        }
        log_in_batches(
            store,
            run_id,
            params=[Param(key, str(value)) for key, value in params.items()],
            metrics=finite_metrics(record.values, now_ms()),
        )
        if record.failure is not None:
            fail_run(store, run_id, record.failure)
        else:
            store.client.set_terminated(run_id, FINISHED)
        run_ids.append(run_id)
    return run_ids


def retire_older(
    store: Store, experiment_id: str, source_sweep_id: str, settings: SplitSettings, keep: set[str]
) -> list[str]:
    """Delete FINISHED network runs whose identity one of `keep` (runs just recorded with --force) has."""
    found = finished_identities(store, experiment_id, source_sweep_id, settings)
    older = [
        run_id
        for run_ids in found.values()
        if any(run_id in keep for run_id in run_ids)
        for run_id in run_ids
        if run_id not in keep
    ]
    return retire_runs(store, older)


def finish_invocation(
    store: Store,
    run_id: str,
    table: pd.DataFrame | None,
    readings: Sequence[str],
    figures: Mapping[str, Any],
    metrics: Mapping[str, float],
) -> None:
    """Log the comparison's files, readings and counts on the invocation run, then mark it FINISHED."""
    files: dict[str, Any] = {}
    if table is not None:
        files[TABLE_ARTIFACT] = lambda path: table.to_csv(path, index=False)
        per_configuration = table.attrs.get("per_configuration")
        if per_configuration is not None:
            files[PER_CONFIGURATION_ARTIFACT] = lambda path: per_configuration.to_csv(path, index=False)
    files |= {f"{name}.png": figure_writer(figure) for name, figure in figures.items()}
    log_in_batches(
        store,
        run_id,
        metrics=finite_metrics(metrics, now_ms()),
        tags=[RunTag(NOTE_TAG, "\n".join(readings)[:7900])],
    )
    if files:
        log_files(store, run_id, files)
    store.client.set_terminated(run_id, FINISHED)


# ------------------------------------------------------------------------------------------------------------
# Reading back


def split_records(
    store: Store, experiment_id: str, source_sweep_id: str, settings: SplitSettings = DEFAULT_SETTINGS
) -> pd.DataFrame:
    """Every FINISHED network run of the sweep as one row: config, seed, arm, epsilon (NaN for the
    baseline), epochs, network_run_id, run_id, code_version, then RECORD_FIELDS. Where one identity has
    several FINISHED runs (recorded under several code versions), only the newest is kept.
    """
    runs = search_all(
        store,
        [experiment_id],
        _sweep_filter(source_sweep_id, settings, current_code=False)
        + f" and attributes.status = '{FINISHED}'",
        order_by=["attributes.start_time DESC"],
    )
    rows = []
    seen: set[tuple[str, str, str, str]] = set()
    for run in runs:
        tags = run.data.tags
        key = (
            tags.get("network_run_id", ""),
            tags.get("arm", ""),
            tags.get("epsilon", ""),
            tags.get("epochs", ""),
        )
        if key in seen:
            continue
        seen.add(key)
        epsilon = tags.get("epsilon", "none")
        rows.append(
            {
                "config": tags.get("config"),
                "config_hash": tags.get("config_hash"),
                "seed": int(tags.get("seed", -1)),
                "arm": tags.get("arm"),
                "epsilon": math.nan if epsilon == "none" else float(epsilon),
                "epochs": int(tags.get("epochs", 0)),
                "network_run_id": tags.get("network_run_id"),
                "run_id": run.info.run_id,
                "code_version": tags.get("code_version"),
                **{name: run.data.metrics.get(name, math.nan) for name in RECORD_FIELDS},
            }
        )
    return pd.DataFrame(rows)


def splitting_section(store: Store, experiment_id: str, sweep_id: str | None):
    """(table, readings, figures) of the splitting study on sweep `sweep_id` ('latest': the newest taming
    sweep; None: the sweep of the newest FINISHED `split` invocation), from its stored network runs only;
    None when the sweep has no split runs (or, for None, when no split was run in the experiment).

    The table is `pipeline.taming_splitting.comparison_table` (its per-configuration companion in
    `table.attrs["per_configuration"]`); figures are keyed by file stem.
    """
    from pipeline.taming_splitting import splitting_analysis
    from tracking.analysis import latest_sweep_id

    if sweep_id is None:
        invocations = store.client.search_runs(
            [experiment_id],
            f"tags.study = '{STUDY}' and tags.kind = '{INVOCATION_KIND}' and attributes.status = '{FINISHED}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if not invocations:
            return None
        sweep_id = invocations[0].data.tags["source_sweep_id"]
    elif sweep_id == "latest":
        sweep_id = latest_sweep_id(store, experiment_id)
    frame = split_records(store, experiment_id, sweep_id)
    if frame.empty:
        return None
    table, lines, figures = splitting_analysis(frame)
    versions = sorted(set(frame["code_version"].dropna()))
    if len(versions) > 1:
        lines.append(
            f"Note: the split runs were recorded under {len(versions)} code versions ({', '.join(versions)}); "
            "each (network, arm, epochs) counts once, its newest run."
        )
    lines.insert(0, f"Splitting remedy on the networks of sweep {sweep_id}.")
    return table, lines, figures
