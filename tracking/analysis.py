"""The analysis stage's store side: which seed runs a report reads, and the report's own run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from pipeline.analysis import StudyContext, relabel_configurations
from tracking.query import search_all, seed_frame
from tracking.store import Store, TrackingError, code_version, fail_run, git_commit, log_in_batches


def latest_sweep_id(store: Store, experiment_id: str) -> str:
    """The sweep id of the most recent sweep run (any status) in the experiment."""
    runs = store.client.search_runs(
        [experiment_id],
        "tags.kind = 'sweep' and tags.study = 'taming'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise TrackingError(
            "--sweep-id latest: this experiment has no sweep run; run `python cli.py sweep` first"
        )
    return runs[0].data.tags["sweep_id"]


def sweep_ablation_run_ids(store: Store, experiment_id: str, sweep_id: str) -> list[str]:
    """Ablation runs a sweep used, its own and the FINISHED ones it reused, from its summary.csv."""
    runs = search_all(
        store,
        [experiment_id],
        f"tags.kind = 'sweep' and tags.study = 'taming' and tags.sweep_id = '{sweep_id}'",
    )
    if not runs:
        raise TrackingError(f"--sweep-id {sweep_id!r} matches no sweep run in this experiment")
    run = runs[0]
    try:
        path = store.client.download_artifacts(run.info.run_id, "summary.csv")
    except Exception:  # noqa: BLE001 - an unfinished sweep has no summary; fall back to its tag
        return [
            r.info.run_id
            for r in search_all(
                store, [experiment_id], f"tags.kind = 'ablation' and tags.sweep_id = '{sweep_id}'"
            )
        ]
    return pd.read_csv(path)["run_id"].tolist()


def select_seeds(
    store: Store, experiment_id: str, *, sweep_id: str | None = None, filter_string: str | None = None
) -> tuple[pd.DataFrame, str]:
    """Every seed run (all statuses) the report should read, and a text of the query used.

    With a sweep id: the seed runs of that sweep's ablations (reused ones included). Configurations are
    grouped by config hash and named by their factors plus every setting that differs between the
    selected configurations (pipeline.analysis.relabel_configurations), so runs that share factor levels
    but not settings (a λ sweep, three `ablate` runs at three λ) are compared, never mixed.
    """
    if sweep_id == "latest":
        sweep_id = latest_sweep_id(store, experiment_id)
    query = f"experiment {experiment_id}; tags.kind = 'seed'"
    frame = seed_frame(store, [experiment_id], filter_string, statuses=None)
    if filter_string and "params." in filter_string:
        # Seed runs recorded before they carried the config have no params: a filter on settings would
        # drop them silently. Their ablation run has the params, so select those seeds through it.
        matching_ablations = {
            run.info.run_id
            for run in search_all(store, [experiment_id], f"tags.kind = 'ablation' and {filter_string}")
        }
        everything = seed_frame(store, [experiment_id], None, statuses=None)
        if not everything.empty:
            without_params = everything["network.init"].isna() if "network.init" in everything else True
            inherited = everything[without_params & everything["parent_run_id"].isin(matching_ablations)]
            frame = pd.concat([frame, inherited]).drop_duplicates("run_id") if len(inherited) else frame
    if filter_string:
        query += f" and {filter_string}"
    if sweep_id is not None:
        parents = set(sweep_ablation_run_ids(store, experiment_id, sweep_id))
        frame = frame[frame["parent_run_id"].isin(parents)] if not frame.empty else frame
        query += f"; ablations of sweep {sweep_id}"
    if frame.empty:
        raise TrackingError(f"no seed runs match ({query}); check --experiment, --sweep-id and --filter")
    # A --force re-run deletes the older ablation; its seed runs must not count twice.
    parents = {run.info.run_id: run for run in search_all(store, [experiment_id], "tags.kind = 'ablation'")}
    frame = frame[frame["parent_run_id"].isin(set(parents))].copy()
    frame = with_parent_settings(frame, parents)
    # Configurations are told apart by identity (config hash), and named by what differs between them.
    frame = relabel_configurations(frame)
    return drop_duplicate_seeds(frame), query


def with_parent_settings(frame: pd.DataFrame, parents: dict) -> pd.DataFrame:
    """Fill each seed row's settings from its ablation run's params where the seed run lacks them (seed
    runs recorded before seed runs carried the config)."""
    from pipeline.design import field_specs

    paths = list(field_specs())
    for path in paths:
        if path not in frame:
            frame[path] = None
    missing = frame[paths].isna().any(axis=1)
    for index in frame.index[missing]:
        params = parents[frame.at[index, "parent_run_id"]].data.params
        for path in paths:
            if pd.isna(frame.at[index, path]) and path in params:
                frame.at[index, path] = params[path]
    return frame


def drop_duplicate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one FINISHED run per (config hash, seed): the most recent.

    Two sweeps of the same preset started at the same time against one server can both train a
    configuration before either has finished it (each checks for a FINISHED run first and finds none), so
    one identity can end with two FINISHED seed runs. Training is deterministic, so the duplicates carry
    the same values; counting both would inflate n. `frame.attrs["duplicates_dropped"]` says how many went.
    """
    finished = frame["status"] == "FINISHED"
    ranked = frame[finished].sort_values("start_time", ascending=False)
    keep = ranked.drop_duplicates(subset=["config_hash", "seed"], keep="first")
    result = pd.concat([keep, frame[~finished]]).sort_index().reset_index(drop=True)
    result.attrs["duplicates_dropped"] = int(finished.sum() - len(keep))
    return result


def study_context(store: Store, experiment_id: str, frame: pd.DataFrame) -> StudyContext:
    """Store, experiment, sweeps, code versions and each configuration's stored settings for a report.

    Settings come from one ablation run per configuration (its params are the flattened config); the
    seed runs of one configuration share a config hash, so one parent speaks for all of them.
    """
    experiment = store.client.get_experiment(experiment_id)
    settings: dict[str, dict[str, str]] = {}
    finished = frame[frame["status"] == "FINISHED"] if len(frame) else frame
    for config, rows in finished.groupby("config", sort=False):
        parent = rows["parent_run_id"].dropna()
        if len(parent):
            params = dict(store.client.get_run(parent.iloc[0]).data.params)
            if params:
                settings[str(config)] = params

    def present(column: str) -> tuple[str, ...]:
        if column not in finished:
            return ()
        return tuple(sorted({str(value) for value in finished[column].dropna() if str(value)}))

    return StudyContext(
        store=store.uri,
        experiment=f"{experiment.name} (id {experiment_id})",
        sweep_ids=present("sweep_id"),
        code_versions=present("code_version"),
        settings=settings,
    )


def stored_networks(store: Store, frame: pd.DataFrame, config_name: str) -> list:
    """(config, seed, network) of every FINISHED seed run of one configuration, from its checkpoint."""
    from pipeline.evaluation import load_checkpoint
    from tracking.query import load_seed_checkpoint

    rows = frame[(frame["config"] == config_name) & (frame["status"] == "FINISHED")]
    if rows.empty:
        raise TrackingError(f"--published-ladder: {config_name} has no finished seed runs to decompose")
    networks = []
    for run_id in rows["run_id"]:
        try:
            saved = load_seed_checkpoint(store, run_id)
        except Exception as error:  # noqa: BLE001 - a missing or unreadable artifact, told in one sentence
            raise TrackingError(
                f"--published-ladder: seed run {run_id} has no loadable checkpoint ({type(error).__name__}); "
                "runs recorded with --no-artifacts cannot be decomposed again"
            ) from None
        config, seed, network, _ = load_checkpoint(saved)
        networks.append((config, seed, network))
    return networks


def log_report(
    store: Store,
    experiment_id: str,
    files: list[Path],
    *,
    description: str,
    query: str,
    options: dict,
    adopted_run_id: str | None,
) -> str:
    """Log a written report as its own run (kind=analysis) with every file as an artifact."""
    run_id = (
        adopted_run_id
        or store.client.create_run(experiment_id, run_name="report", tags={"kind": "analysis"}).info.run_id
    )
    try:
        params = [Param("query", query[:6000])] + [
            Param(name, str(value)[:6000]) for name, value in options.items()
        ]
        tags = [
            RunTag("kind", "analysis"),
            RunTag(MLFLOW_RUN_NAME, f"report ({options.get('baseline', '')} baseline)"),
            RunTag("code_version", code_version()),
            RunTag("git_commit", git_commit()),
            RunTag("mlflow.note.content", description[:7900]),
        ]
        log_in_batches(store, run_id, params=params, tags=tags)
        for path in files:
            store.client.log_artifact(run_id, str(path))
        store.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException as error:
        fail_run(store, run_id, f"{type(error).__name__}: {error}")
        raise
    return run_id
