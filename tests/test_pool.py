"""Worker pools: how passes are cut into seed chunks, when a sweep uses processes, prefetching, streaming."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

import pipeline.experiments.pool as pool_module
from pipeline.config import AblationConfig, preset_configs
from pipeline.experiments.pool import (
    POOL_MINIMUM_MODEL_EPOCHS,
    PassPool,
    auto_workers,
    plan_passes,
    pool_chunks,
    total_work,
)
from pipeline.experiments.taming import run_ablations
from pipeline.runtime import retain_freed_memory
from tests.conftest import tiny_config


def chunk_seeds(chunks) -> list[list[int]]:
    return [sorted({seed for _, seed in chunk}) for chunk in chunks]


def test_pool_chunks_cut_ten_seeds_into_two_rounds_of_equal_pairs():
    members = [(config, seed) for config in range(8) for seed in range(10)]
    chunks = pool_chunks(members, workers=2)
    # Two chunks per worker; the first round (3 + 3 seeds) and the second (2 + 2) are each balanced.
    assert chunk_seeds(chunks) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert sorted(member for chunk in chunks for member in chunk) == sorted(members)
    for chunk in chunks:  # every configuration of a chunk's seeds travels with it
        assert {config for config, _ in chunk} == set(range(8))


def test_pool_chunks_use_one_round_when_seeds_are_few_and_no_split_without_a_pool():
    members = [(config, seed) for config in range(2) for seed in range(3)]
    assert chunk_seeds(pool_chunks(members, workers=2)) == [[0, 1], [2]]
    assert chunk_seeds(pool_chunks(members, workers=1)) == [[0, 1, 2]]
    # Seven seeds on two workers is under four per worker: one chunk each.
    seven = [(0, seed) for seed in range(7)]
    assert chunk_seeds(pool_chunks(seven, workers=2)) == [[0, 1, 2, 3], [4, 5, 6]]


def test_total_work_counts_each_chunk_of_a_pass():
    configs = preset_configs("strategic", tiny_config())
    per_model = configs[0].network.epochs + configs[0].sae.epochs
    assert total_work(configs, range(10), workers=1) == per_model
    assert total_work(configs, range(10), workers=2) == 4 * per_model
    assert len(plan_passes(configs, range(10))) == 1


def test_auto_workers_starts_processes_only_for_work_that_repays_them(monkeypatch):
    monkeypatch.setattr(pool_module, "usable_cores", lambda: 4)
    published = preset_configs("strategic", AblationConfig())
    # 80 models × 3000 epochs: one process per core.
    assert auto_workers(published, range(10)) == 4
    # Never more processes than seeds: a seed is never split across processes.
    assert auto_workers(published, range(3)) == 3
    # One published configuration with 10 seeds is 30 000 model-epochs: under the threshold.
    assert POOL_MINIMUM_MODEL_EPOCHS > 10 * 3000
    assert auto_workers(published[:1], range(10)) == 1
    assert auto_workers(preset_configs("strategic", tiny_config()), range(10)) == 1
    monkeypatch.setattr(pool_module, "usable_cores", lambda: 1)
    assert auto_workers(published, range(10)) == 1


def test_retain_freed_memory_takes_effect_on_glibc_and_is_idempotent():
    import platform

    first = retain_freed_memory()
    assert retain_freed_memory() is first
    if platform.libc_ver()[0] == "glibc":
        assert first is True


def metrics_match(first, second) -> bool:
    return all(
        math.isclose(value, second[name], rel_tol=1e-6, abs_tol=1e-9)
        or (math.isnan(value) and math.isnan(second[name]))
        for name, value in first.items()
    )


def test_prefetched_work_is_collected_not_trained_again_and_seeds_stream_out():
    configs = preset_configs("strategic", tiny_config())[:2]
    seeds = list(range(8))
    alone = run_ablations(configs, seeds)
    delivered = []
    with PassPool(2) as pool:
        pool.prefetch(configs, seeds)
        assert len(pool.prefetched) == 4  # 8 seeds on 2 workers: two chunks each
        submitted = []
        original_submit = pool.executor.submit
        pool.executor.submit = lambda *arguments: submitted.append(arguments) or original_submit(*arguments)
        pooled = run_ablations(
            configs,
            seeds,
            pool=pool,
            on_seed=lambda index, seed_result: delivered.append((index, seed_result.seed)),
        )
        assert submitted == [] and pool.prefetched == {}
    # Every (configuration, seed) handed over exactly once, as its chunk finished.
    assert sorted(delivered) == [(index, seed) for index in range(2) for seed in seeds]
    for result_alone, result_pooled in zip(alone, pooled, strict=True):
        assert [seed.seed for seed in result_pooled.seeds] == seeds
        for seed_alone, seed_pooled in zip(result_alone.seeds, result_pooled.seeds, strict=True):
            assert metrics_match(seed_alone.metrics, seed_pooled.metrics)


def test_closing_a_pool_stops_prefetched_work_nobody_collected():
    # The published strategic sweep: over 20 s of training per worker, which close() must not wait for.
    published = preset_configs("strategic", AblationConfig())
    pool = PassPool(2).start()
    pool.prefetch(published, range(10))
    time.sleep(1.0)
    workers = list(pool.executor._processes.values())
    assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
    started = time.perf_counter()
    pool.close()
    assert time.perf_counter() - started < 8
    deadline = time.monotonic() + 5  # a terminated process may take a moment to be reaped
    while any(worker.is_alive() for worker in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(worker.is_alive() for worker in workers)


def test_serial_runs_hand_over_every_seed_too():
    configs = preset_configs("strategic", tiny_config())[:2]
    delivered = []
    run_ablations(
        configs, [0, 1], on_seed=lambda index, seed_result: delivered.append((index, seed_result.seed))
    )
    assert sorted(delivered) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("workers", [0, -1])
def test_pool_needs_a_worker(workers):
    with pytest.raises(ValueError, match="workers must be at least 1"):
        PassPool(workers)


def test_a_new_store_is_recognised_without_importing_mlflow(tmp_path):
    from tracking.uri import is_new_sqlite_store

    database = tmp_path / "mlflow.db"
    assert is_new_sqlite_store(f"sqlite:///{database}")
    assert is_new_sqlite_store(f"sqlite:///{database}?timeout=30")
    database.write_bytes(b"")  # an empty file holds no store: creation replaces it, so it counts as new
    assert is_new_sqlite_store(f"sqlite:///{database}")
    database.write_bytes(b"SQLite format 3\x00" + bytes(84))
    assert not is_new_sqlite_store(f"sqlite:///{database}")
    assert not is_new_sqlite_store(f"sqlite:///{database}?timeout=30")
    assert not is_new_sqlite_store(f"sqlite:///{tmp_path / 'missing-folder' / 'mlflow.db'}")
    assert not is_new_sqlite_store("http://127.0.0.1:5000")


def test_the_cli_and_the_pool_module_import_neither_torch_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, cli, pipeline.experiments.pool; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert finished.stdout.split() == ["False", "False"]


def test_a_bad_tracking_uri_is_refused_before_any_worker_starts(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli

    def no_worker(*arguments, **keywords):
        raise AssertionError("a worker pool was started for a sweep that cannot be recorded")

    monkeypatch.setattr(pool_module.PassPool, "__init__", no_worker)
    missing = tmp_path / "missing-folder" / "mlflow.db"
    arguments = ["sweep", "--preset", "strategic", "--seeds", "10", "--workers", "2"]
    result = CliRunner().invoke(cli.cli, [*arguments, "--tracking-uri", f"sqlite:///{missing}"])
    assert result.exit_code == 2, result.output
    assert "--tracking-uri points into a folder that does not exist" in result.output
    assert not missing.parent.exists()


FORKED_POOL_SCRIPT = """
import json, sys
from pipeline.config import preset_configs
from pipeline.experiments.pool import PassPool
from pipeline.experiments.taming import run_ablations
from tests.conftest import tiny_config

configs = preset_configs("strategic", tiny_config())[:2]
seeds = [0, 1, 2, 3]
with PassPool(2) as pool:
    method = pool.start_method
    pooled = run_ablations(configs, seeds, pool=pool)
alone = run_ablations(configs, seeds)  # after the pool: this starts numba's threads in this process
print(json.dumps({
    "method": method,
    "pooled": [seed.metrics for result in pooled for seed in result.seeds],
    "alone": [seed.metrics for result in alone for seed in result.seeds],
}))
"""


def test_a_fresh_process_forks_its_workers_and_they_train_the_same_seeds():
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    finished = subprocess.run(
        [sys.executable, "-c", FORKED_POOL_SCRIPT], capture_output=True, text=True, cwd=root, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    reported = json.loads(finished.stdout.strip().splitlines()[-1])
    assert reported["method"] == "fork"
    assert len(reported["pooled"]) == len(reported["alone"]) == 8
    for pooled, alone in zip(reported["pooled"], reported["alone"], strict=True):
        assert metrics_match(alone, pooled)


def test_a_process_with_another_thread_or_numbas_threads_spawns(monkeypatch):
    import threading

    from numba.np.ufunc import parallel

    monkeypatch.delenv(pool_module.START_METHOD_VARIABLE, raising=False)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert pool_module.start_method() == "spawn"
    finally:
        release.set()
        other.join()
    monkeypatch.setattr(parallel, "_is_initialized", True)
    assert pool_module.start_method() == "spawn"
    monkeypatch.setattr(parallel, "_is_initialized", False)
    if threading.active_count() == 1:
        assert pool_module.start_method() == "fork"


def test_the_start_method_variable_overrides_and_is_checked(monkeypatch):
    monkeypatch.setenv(pool_module.START_METHOD_VARIABLE, "spawn")
    assert pool_module.start_method() == "spawn"
    monkeypatch.setenv(pool_module.START_METHOD_VARIABLE, "forkserver")
    with pytest.raises(ValueError, match="POLYLAB_START_METHOD must be fork or spawn; got 'forkserver'"):
        pool_module.start_method()
