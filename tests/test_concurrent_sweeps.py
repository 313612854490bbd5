"""Two sweeps of the same three configurations started together share the work instead of duplicating it.

Each identity is claimed by the first sweep's ablation run (tracking.taming `_contest`, a bakery over run tags); the second waits
for it and reuses it. Checked on one SQLite file and on a local `mlflow server`: both commands exit 0 and
every identity (and every seed of it) is FINISHED exactly once, nothing left RUNNING.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tracking.store import open_store

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["sweep", "--grid", "network.lambda_reg=1e-4,1e-3,1e-2", "--seeds", "2", "--epochs", "20"]
SWEEP += ["--sae-epochs", "10", "--samples", "64", "--no-artifacts", "--experiment", "together"]


def environment() -> dict[str, str]:
    values = {
        name: value for name, value in os.environ.items() if not name.startswith(("MLFLOW_", "POLYLAB"))
    }
    return values | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_two_sweeps_at_once(uri: str, folder: Path) -> None:
    # The store and experiment exist first: creating a new store from two processes at once is another
    # matter (tracking/store.py).
    open_store(uri).experiment_id("together")
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *SWEEP, "--tracking-uri", uri],
            cwd=folder,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=180)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("together").experiment_id
    runs = client.search_runs([experiment_id], "", max_results=1000)
    assert [run.info.run_id for run in runs if run.info.status == "RUNNING"] == []
    finished = [run for run in runs if run.info.status == "FINISHED"]
    ablations = Counter(
        run.data.tags["config_hash"] for run in finished if run.data.tags["kind"] == "ablation"
    )
    assert sorted(ablations.values()) == [1, 1, 1], ablations
    seeds = Counter(
        (run.data.tags["config_hash"], run.data.tags["seed"])
        for run in finished
        if run.data.tags["kind"] == "seed"
    )
    assert len(seeds) == 6 and set(seeds.values()) == {1}, seeds
    assert sum("Reused" in output for output in outputs) >= 1
    print(f"\ntwo sweeps at once on {uri.split(':')[0]}: {time.monotonic() - started:.1f} s")


def test_two_sweeps_at_once_on_one_sqlite_store_train_each_identity_once(tmp_path):
    run_two_sweeps_at_once(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)


def test_two_sweeps_at_once_on_a_server_train_each_identity_once(tmp_path):
    # Imported here, not at the top, so that pytest rewrites the plugin's asserts (tests/servers.py).
    servers = pytest.importorskip("tests.servers")
    with ExitStack() as stack:
        server = stack.enter_context(servers.running_server(tmp_path / "server"))
        run_two_sweeps_at_once(server.uri, tmp_path)


def test_claims_made_at_once_elect_exactly_one_trainer(tmp_path, tiny):
    """The bakery itself, raced harder than two sweeps do: four claimants per round create their claim
    and take their ticket with random pauses between the steps (a busy store delaying writes), in threads
    so that every claim counts as live. In every round exactly one claim wins; an order by start time
    (every ticket equal) fails this within a few rounds."""
    import random
    import threading

    from tracking import recorder
    from tracking.taming import _contest, _take_number, start_ablation_run

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = store.experiment_id("claims")
    draws = random.Random(5)
    for round_number in range(8):
        # Claims spread over 0.3 s: some land after others have already contested.
        pauses = [[draws.uniform(0, 0.3), draws.uniform(0, 0.05), draws.uniform(0, 0.05)] for _ in range(4)]
        barrier = threading.Barrier(4)
        outcomes: dict[int, tuple[str, str | None]] = {}
        errors: list[BaseException] = []

        def claim(claimant: int, pauses=pauses, barrier=barrier, outcomes=outcomes, errors=errors) -> None:
            try:
                barrier.wait()
                time.sleep(pauses[claimant][0])
                run_id = start_ablation_run(
                    store, experiment_id, tiny, [0], sweep_id=f"c{claimant}", artifacts=False
                )
                time.sleep(pauses[claimant][1])
                _take_number(store, experiment_id, tiny, [0], run_id)
                time.sleep(pauses[claimant][2])
                winner = _contest(store, experiment_id, tiny, [0], run_id, force=True, artifacts=False)
                outcomes[claimant] = (run_id, winner)
            except BaseException as error:  # reported below, on the test's thread
                errors.append(error)

        threads = [threading.Thread(target=claim, args=(claimant,)) for claimant in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        winners = [run_id for run_id, winner in outcomes.values() if winner is None]
        assert len(outcomes) == 4 and len(winners) == 1, (round_number, outcomes)
        # Close the round's claims so that the next round starts from none.
        for run_id, _ in outcomes.values():
            recorder.fail_run(store, run_id, "test round over")
