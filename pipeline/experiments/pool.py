"""Worker processes for the taming study: how passes are cut into seed chunks, and the pool that trains them.

Importing this module costs nothing heavy (no torch): the sweep command decides on its workers before it
imports torch and MLflow. Starting the pool imports the engine once in this process and forks the workers
from it where that is safe (`start_method`), so no worker pays the imports, and they train while this
process imports MLflow; elsewhere they are spawned and import it themselves.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import AblationConfig, pass_key, total_epochs

if TYPE_CHECKING:
    from pipeline.train import SeedResult

Progress = Callable[[int], None]


def plan_passes(
    configs: Sequence[AblationConfig], seeds: Sequence[int], share_passes: bool = True
) -> list[list[tuple[int, int]]]:
    """Group (config index, seed) pairs into batched passes: by pass_key when sharing, else per config."""
    groups: dict[object, list[tuple[int, int]]] = defaultdict(list)
    for config_index, config in enumerate(configs):
        key = pass_key(config) if share_passes else config_index
        groups[key].extend((config_index, seed) for seed in seeds)
    return list(groups.values())


def seed_chunks(members: Sequence[tuple[int, int]], chunks: int) -> list[list[tuple[int, int]]]:
    """Split a pass's (config index, seed) members into at most `chunks` contiguous groups of seeds.

    A seed never straddles two chunks, so configurations sharing a seed still share its data and noise
    streams (common random numbers) inside their chunk.
    """
    seeds = list(dict.fromkeys(seed for _, seed in members))
    chunks = max(1, min(chunks, len(seeds)))
    size, extra = divmod(len(seeds), chunks)
    groups, start = [], 0
    for chunk in range(chunks):
        chosen = set(seeds[start : start + size + (chunk < extra)])
        start += size + (chunk < extra)
        groups.append([member for member in members if member[1] in chosen])
    return groups


def chunk_work(
    configs: Sequence[AblationConfig], chunk: Sequence[tuple[int, int]]
) -> tuple[list[AblationConfig], list[int]]:
    """The configurations and seeds one seed chunk of (config index, seed) members trains, in order."""
    return [configs[index] for index, _ in chunk], [seed for _, seed in chunk]


# With a pool, a pass with enough seeds is cut into this many seed chunks per worker. Chunks then finish
# at different times, and a caller that records seeds as they come (`on_seed`) writes the first chunks
# while the last ones train. On one thread the cost per model is flat from 16 models per pass up
# (8 models: about 30 % more per model), so for the strategic sweep (chunks of 24 and 16 models) the
# smaller chunks cost nothing in speed.
CHUNKS_PER_WORKER = 2


def pool_chunks(members: Sequence[tuple[int, int]], workers: int) -> list[list[tuple[int, int]]]:
    """The seed chunks a pool of `workers` trains one pass in (one chunk without a pool).

    Two chunks per worker when the pass has at least four seeds per worker, else one: with fewer seeds
    the second round would leave workers idle or run chunks too small to batch well.
    """
    if workers <= 1:
        return [list(members)]
    seeds = len(dict.fromkeys(seed for _, seed in members))
    per_worker = CHUNKS_PER_WORKER if seeds >= 2 * CHUNKS_PER_WORKER * workers else 1
    return seed_chunks(members, workers * per_worker)


# Below this much work (models × (network + SAE epochs)) one process is done before a pool of fresh
# processes has imported torch: a pool saves ~30 % of the training time and costs ~2 s to start
# (bench/scale.py). The strategic sweep is 80 × 3000 = 240 000.
POOL_MINIMUM_MODEL_EPOCHS = 60_000


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask where the platform has one, capped by a cgroup
    v2 CPU quota (a container limited to 2 CPUs on a 64-core host gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def auto_workers(configs: Sequence[AblationConfig], seeds: Sequence[int], device: str = "cpu") -> int:
    """Worker processes worth starting for this work: one per core (at most one per seed) on a CPU when
    the work reaches POOL_MINIMUM_MODEL_EPOCHS, else 1. An accelerator is driven by one process."""
    if not configs or not seeds:
        return 1
    if device != "cpu":
        from pipeline.train import resolve_device  # imports torch, which "cpu" does not need

        if resolve_device(device).type != "cpu":
            return 1
    work = len(seeds) * sum(total_epochs(config) for config in configs)
    if work < POOL_MINIMUM_MODEL_EPOCHS:
        return 1
    return max(1, min(usable_cores(), len(seeds)))


def total_work(
    configs: Sequence[AblationConfig], seeds: Sequence[int], share_passes: bool = True, workers: int = 1
) -> int:
    """Progress units for `run_ablations` (epochs of all passes, network + SAE; each seed chunk of a pass
    counts its epochs when `workers` > 1)."""
    return sum(
        total_epochs(configs[members[0][0]]) * len(pool_chunks(members, workers))
        for members in plan_passes(configs, seeds, share_passes)
    )


# A worker process reports progress this many epochs at a time (one queue message per call otherwise).
PROGRESS_BATCH = 25
_worker_progress: multiprocessing.Queue | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the process that started it dies, however it dies (SIGKILL included):
    an orphaned worker would keep training, holding a core, for a sweep nobody records.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) has the kernel kill it. It fires when the parent *thread* that
    forked it ends and is not available elsewhere, so a watchdog thread also checks every second whether
    the parent changed (an orphan is re-parented) and exits then.
    """
    import ctypes
    import ctypes.util
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the line above took effect

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def start_method() -> str:
    """ "fork" where forking this process is safe, else "spawn"; a fork imports the workers' modules here
    first, so that every worker starts with them loaded.

    Safe means: the platform forks, this process runs no other Python thread (a fork copies only the
    calling thread, and a lock another thread held would stay locked in the child), numba has not started
    its thread pool, and CUDA is not initialized (neither survives a fork). The sweep and decompose
    commands start their pool before anything else runs, so they fork; a process that has already
    trained on the fused engine (a test session, say) spawns. Forking costs the parent the imports once
    (it needs them anyway to record) instead of each worker paying them: on the strategic sweep, medians of
    16.3 s wall and 30.1 CPU-s forked against 17.3 s and 32.2 CPU-s spawned
    (`bench/sweep_time.py --compare POLYLAB_START_METHOD=fork,spawn --runs 4`, 2 cores).
    """
    forced = os.environ.get(START_METHOD_VARIABLE, "").strip()
    if forced:
        if forced not in ("fork", "spawn"):
            raise ValueError(f"{START_METHOD_VARIABLE} must be fork or spawn; got {forced!r}")
        return forced
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return "spawn"
    import torch

    import pipeline.experiments.taming  # noqa: F401  (training and evaluation, what a worker runs)
    from pipeline import fused

    if torch.cuda.is_initialized():
        return "spawn"
    if fused.numba is not None:
        from numba.np.ufunc import parallel

        if parallel._is_initialized:
            return "spawn"
    return "fork"


# Set to fork or spawn to override `start_method` (a spawned pool is the one every platform has).
START_METHOD_VARIABLE = "POLYLAB_START_METHOD"


def _start_worker(progress: multiprocessing.Queue, parent_pid: int | None = None) -> None:
    global _worker_progress
    import signal

    # Ctrl-C reaches every process of the terminal's group: the parent handles it (marks its runs FAILED,
    # stops the pool), so a worker ignores it instead of printing a traceback of its own. A forked worker
    # also inherits the command's TERM handler (orchestration.signals), which would unwind it as if it
    # were the command: the pool stops workers with TERM, so it must simply end them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    import torch

    # One thread per process: N processes then use N cores without oversubscribing them.
    torch.set_num_threads(1)
    _worker_progress = progress


def _chunk_key(configs: Sequence[AblationConfig], seeds: Sequence[int], device: str) -> tuple:
    return (tuple(config.hash() for config in configs), tuple(seeds), device)


def _ready() -> bool:
    return True


def worker_progress() -> tuple[Progress | None, Callable[[], None]]:
    """In a worker process: (progress callback that sends counts to the parent PROGRESS_BATCH at a time, or
    None outside a pool; a function that sends what is left)."""
    if _worker_progress is None:
        return None, lambda: None
    pending = 0

    def progress(count: int) -> None:
        nonlocal pending
        pending += count
        if pending >= PROGRESS_BATCH:
            _worker_progress.put(pending)
            pending = 0

    def flush() -> None:
        nonlocal pending
        if pending:
            _worker_progress.put(pending)
            pending = 0

    return progress, flush


def _train_chunk(
    configs: Sequence[AblationConfig],
    seeds: Sequence[int],
    device: str,
    overlap_labels: dict[str, str] | None = None,
) -> list[SeedResult]:
    """In a worker process: one batched pass over a seed chunk, evaluated (progress sent to the parent);
    with `overlap_labels` (PassPool.paint_overlaps) each finished seed's overlap heatmap is drawn too."""
    from pipeline.experiments.taming import evaluate
    from pipeline.train import train_pass

    progress, flush = worker_progress()
    trained = train_pass(configs, seeds, progress, device)
    flush()
    results = [evaluate(result) for result in trained]
    if overlap_labels is not None:
        from pipeline.design import label_of, seed_label
        from pipeline.plots.taming import overlap_png

        for result in results:
            if result.finished:
                title = seed_label(label_of(result.config, overlap_labels), result.seed)
                decoder = result.sae.decoder_directions.detach().cpu()
                result.overlap_picture = (title, overlap_png(decoder, title))
    return results


class PassPool:
    """N worker processes (forked or spawned, `start_method`; one torch thread each) that train seed chunks
    of batched passes.

    Start it once for a sweep (`with PassPool(2) as pool:`) and hand it to every `run_ablations` call:
    starting a process costs about as much as importing torch.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1; got {workers}")
        self.start_method = start_method()
        context = multiprocessing.get_context(self.start_method)
        self.workers = workers
        self.progress = context.Queue()
        self.executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(self.progress, os.getpid())
        )
        self.prefetched: dict[tuple, Future] = {}
        self.outstanding: list[Future] = []  # every training future handed out
        self.overlap_labels: dict[str, str] | None = None

    def start(self) -> PassPool:
        """Start every worker now instead of at the first pass, so that a spawned worker's imports overlap
        whatever the caller does next (opening the tracking store, say)."""
        for _ in range(self.workers):
            self.executor.submit(_ready)
        return self

    def paint_overlaps(self, labels: dict[str, str]) -> PassPool:
        """From now on the workers also draw each finished seed's overlap heatmap (`overlap_picture`: its
        title, `pipeline.design.seed_label` of the configuration's `label_of` in `labels`, and the PNG bytes
        of `pipeline.plots.taming.overlap_png`).

        The process that records a sweep is its bottleneck once the workers train fast: drawing there costs
        it about 10 ms a seed (`overlap_png`, cProfile), while the workers sit idle after their last chunk.
        Call it before `prefetch`.
        """
        self.overlap_labels = dict(labels)
        return self

    def prefetch(
        self,
        configs: Sequence[AblationConfig],
        seeds: Sequence[int],
        share_passes: bool = True,
        device: str = "cpu",
    ) -> None:
        """Start training this work now; a later `run_ablations` on this pool collects every chunk it
        shares with it instead of training it again. For a caller that knows what will train before it
        is ready to record it (the sweep command on a new store, while MLflow creates the database)."""
        for members in plan_passes(configs, seeds, share_passes):
            for chunk in pool_chunks(members, self.workers):
                chunk_configs, chunk_seeds = chunk_work(configs, chunk)
                key = _chunk_key(chunk_configs, chunk_seeds, device)
                if key not in self.prefetched:
                    self.prefetched[key] = self._submit(chunk_configs, chunk_seeds, device)

    def submit(self, configs: Sequence[AblationConfig], seeds: Sequence[int], device: str) -> Future:
        """The future of one seed chunk: the prefetched one if there is one, else a new submission."""
        prefetched = self.prefetched.pop(_chunk_key(configs, seeds, device), None)
        return prefetched or self._submit(list(configs), list(seeds), device)

    def _submit(self, configs: list[AblationConfig], seeds: list[int], device: str) -> Future:
        return self.submit_task(_train_chunk, configs, seeds, device, self.overlap_labels)

    def submit_task(self, function: Callable, *arguments) -> Future:
        """Run `function(*arguments)` (module-level, picklable) in a worker, e.g. a chunk of SAEs trained
        on stored networks (`pipeline.experiments.decompose`); it reports progress through
        `worker_progress`."""
        future = self.executor.submit(function, *arguments)
        self.outstanding.append(future)
        return future

    def release(self) -> None:
        """Let the workers exit once they are idle, without waiting: for a caller that has collected its
        last pass and still has other work (recording it) before `close`."""
        self.executor.shutdown(wait=False)

    def __enter__(self) -> PassPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Shut the workers down. Work still running (the caller failed before collecting it, or
        prefetched work nobody asked for) and workers that never got any are stopped, not waited for."""
        busy = any(not future.done() for future in self.outstanding)
        never_used = not self.outstanding
        self.prefetched.clear()
        self.outstanding.clear()
        if busy or never_used:
            self._terminate_workers()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.progress.close()

    def _terminate_workers(self) -> None:
        terminate = getattr(self.executor, "terminate_workers", None)  # Python 3.14+
        if terminate is not None:
            terminate()
            return
        # Before 3.14: the processes must be taken before shutdown(), which forgets them.
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)

    def drain_progress(self, progress: Progress | None) -> None:
        while True:
            try:
                count = self.progress.get_nowait()
            except queue.Empty:
                return
            if progress is not None:
                progress(count)


def run_in_pool(
    pool: PassPool,
    configs: Sequence[AblationConfig],
    passes: list[list[tuple[int, int]]],
    deliver: Callable[[int, SeedResult], None],
    progress: Progress | None,
    device: str,
) -> None:
    """Train `passes` (lists of (config index, seed)) on `pool`, handing each seed to `deliver` as its
    chunk finishes."""
    futures: dict[Future, list[tuple[int, int]]] = {}
    for members in passes:
        for chunk in pool_chunks(members, pool.workers):
            future = pool.submit(*chunk_work(configs, chunk), device)
            futures[future] = chunk
    collect_chunks(pool, futures, deliver, progress)


def collect_chunks(
    pool: PassPool,
    futures: dict[Future, list[tuple[int, int]]],
    deliver: Callable[[int, SeedResult], None],
    progress: Progress | None,
) -> None:
    """Hand each chunk's seeds (`futures[future]`: its (config index, seed) members, in the order the
    future returns its results) to `deliver` as the chunk finishes, forwarding the workers' progress;
    on any failure the chunks not yet started are cancelled."""
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            pool.drain_progress(progress)
            for future in done:
                for (config_index, _), seed_result in zip(futures[future], future.result(), strict=True):
                    deliver(config_index, seed_result)
        pool.drain_progress(progress)
    except BaseException:
        for future in pending:
            future.cancel()
        raise
