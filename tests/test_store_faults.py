"""Nothing lost, nothing hidden: every unusable store is one sentence naming --tracking-uri, within a few
seconds and with nothing written; a new store is created whole or not at all."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tracking.store import describe_store_failure, open_store, store_template_path
from tracking.uri import SQLITE_HEADER, TrackingError

PROJECT = Path(__file__).resolve().parent.parent
TINY_ABLATE = [
    "ablate",
    "--seeds",
    "1",
    "--epochs",
    "5",
    "--sae-epochs",
    "5",
    "--samples",
    "32",
    "--no-artifacts",
]


def cli(*arguments: str, cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """`python cli.py …` as a user runs it; (result, seconds)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(PROJECT / "cli.py"), *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.monotonic() - started


def one_sentence(result: subprocess.CompletedProcess) -> str:
    """The error line of a usage failure; asserts exit 2 and no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def refused(uri: str, *, writing: bool = True) -> str:
    with pytest.raises(TrackingError) as caught:
        open_store(uri, writing=writing)
    message = str(caught.value)
    assert "--tracking-uri" in message and "\n" not in message
    return message


def close(store) -> None:
    """Close the store's connections, so a mount holding it can be unmounted."""
    store.client._tracking_client.store.engine.dispose()


@pytest.fixture(scope="module")
def made_store(tmp_path_factory) -> Path:
    """One small real store (an experiment, no runs), copied by the tests that need one."""
    folder = tmp_path_factory.mktemp("made")
    store = open_store(f"sqlite:///{folder / 'mlflow.db'}")
    store.experiment_id("faults")
    close(store)
    with sqlite3.connect(folder / "mlflow.db") as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return folder / "mlflow.db"


@pytest.fixture
def store_copy(made_store, tmp_path) -> Path:
    database = tmp_path / "store" / "mlflow.db"
    database.parent.mkdir()
    shutil.copy(made_store, database)
    return database


# --- URI checks, before any work ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("sqlite:///", "names no database file"),
        ("sqlite:///:memory:", "names no database file"),
        ("", "is empty"),
        ("mlflow.db", "use an SQLite store instead, e.g. sqlite:///mlflow.db"),
        ("/tmp/somewhere", "plain path"),
        ("file:///tmp/somewhere", "plain path"),
        ("databricks", "is not supported"),
        ("databricks://profile", "is not supported"),
    ],
)
def test_unusable_uris_are_one_sentence_and_write_nothing(uri, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in refused(uri)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "uri", ["file://alice:hunter2@host/path", "postgresql://user:hunter2@host/db", "mysql://u:hunter2@h/d"]
)
def test_credentials_are_refused_with_the_password_masked(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(uri)
    assert "hunter2" not in message and "***" in message and "credentials" in message
    assert list(tmp_path.iterdir()) == []


def test_a_folder_a_foreign_file_and_a_missing_store(tmp_path):
    assert "names a folder" in refused(f"sqlite:///{tmp_path}")
    foreign = tmp_path / "notes.db"
    foreign.write_text("not a database at all")
    assert "is not an SQLite database" in refused(f"sqlite:///{foreign}")
    missing = tmp_path / "missing.db"
    assert "no store at" in refused(f"sqlite:///{missing}", writing=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.db"]


def test_an_sqlite_database_that_is_not_an_mlflow_store(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE notes (text)")
    before = other.read_bytes()
    assert "not an MLflow store" in refused(f"sqlite:///{other}")
    assert other.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_a_corrupted_store_is_one_sentence(damage, store_copy):
    data = store_copy.read_bytes()
    assert data.startswith(SQLITE_HEADER)
    if damage == "truncated":
        store_copy.write_bytes(data[: len(data) // 3])
    else:
        # Header intact, b-tree pages overwritten: quick_check finds it.
        store_copy.write_bytes(data[:4096] + bytes([0x5A]) * 16384 + data[4096 + 16384 :])
    started = time.monotonic()
    for writing in (True, False):
        message = refused(f"sqlite:///{store_copy}", writing=writing)
        assert "damaged" in message or "not an MLflow store" in message, message
    assert time.monotonic() - started < 10
    assert sorted(path.name for path in store_copy.parent.iterdir()) == ["mlflow.db"]


def test_the_cli_reports_a_corrupted_store_in_one_sentence(store_copy, tmp_path):
    store_copy.write_bytes(store_copy.read_bytes()[:20000])
    for arguments in (["inspect", "abc"], ["report", "--no-log"], TINY_ABLATE):
        result, seconds = cli(*arguments, "--tracking-uri", f"sqlite:///{store_copy}", cwd=tmp_path)
        assert "damaged" in one_sentence(result)
        assert seconds < 15
    assert sorted(path.name for path in store_copy.parent.iterdir()) == ["mlflow.db"]


# --- read-only stores ---------------------------------------------------------------------------------


def read_only(folder: Path):
    """Make `folder` read-only for this process; a context manager, or skip where that cannot be done."""
    import contextlib

    @contextlib.contextmanager
    def chmod():
        folder.chmod(0o555)
        for path in folder.iterdir():
            path.chmod(0o444)
        try:
            yield
        finally:
            folder.chmod(0o755)

    @contextlib.contextmanager
    def bind_mount():
        # Root ignores permission bits; a read-only bind mount binds everyone.
        mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"running as root and cannot bind-mount: {mounted.stderr.decode().strip()}")
        try:
            remounted = subprocess.run(
                ["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True, check=False
            )
            if remounted.returncode != 0:
                pytest.skip(f"cannot remount read-only: {remounted.stderr.decode().strip()}")
            yield
        finally:
            subprocess.run(["umount", "--lazy", str(folder)], check=False)

    return bind_mount() if os.geteuid() == 0 else chmod()


def test_a_read_only_store_reads_but_refuses_writing_in_one_sentence(store_copy):
    with read_only(store_copy.parent):
        assert not os.access(store_copy.parent, os.W_OK)
        started = time.monotonic()
        assert "read-only" in refused(f"sqlite:///{store_copy}")
        assert time.monotonic() - started < 10
        store = open_store(f"sqlite:///{store_copy}", writing=False)
        assert "faults" in store.list_experiments()
        store.existing_experiment_id("faults")
        close(store)
    assert sorted(path.name for path in store_copy.parent.iterdir()) == ["mlflow.db"]


# --- a held write lock --------------------------------------------------------------------------------


def test_a_held_write_lock_is_one_sentence_within_10_s(store_copy, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('held', flush=True)\n"
            "time.sleep(30)\n",
            str(store_copy),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert "write lock" in refused(f"sqlite:///{store_copy}")
        assert time.monotonic() - started < 10
        result, seconds = cli(*TINY_ABLATE, "--tracking-uri", f"sqlite:///{store_copy}", cwd=tmp_path)
        assert "write lock" in one_sentence(result)
        assert seconds < 10
    finally:
        holder.kill()
        holder.wait()


# --- creation: all or nothing -------------------------------------------------------------------------


def test_two_processes_creating_one_store_at_once_both_succeed(tmp_path):
    database = tmp_path / "mlflow.db"
    script = (
        "import sys; from tracking.store import open_store\n"
        "store = open_store(sys.argv[1]); print(store.experiment_id('together'))\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"sqlite:///{database}"],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    assert len({stdout.strip() for stdout, _ in outputs}) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlflow.db"]


@pytest.fixture
def small_tmpfs(tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=False)


@pytest.mark.parametrize("schema_from", ["migrations", "template"])
def test_a_full_disk_at_creation_leaves_nothing_and_a_retry_works(
    schema_from, small_tmpfs, tmp_path, monkeypatch
):
    """MLflow's migrations fill a 3 MiB disk; a copy of the empty-store template (0.9 MiB) fills 512 KiB."""
    uri = f"sqlite:///{small_tmpfs / 'mlflow.db'}"
    if schema_from == "migrations":
        monkeypatch.setenv("POLYLAB_STORE_TEMPLATE", "off")
    else:
        close(open_store(f"sqlite:///{tmp_path / 'elsewhere.db'}"))  # makes the template if none yet
        assert store_template_path().is_file()
        subprocess.run(["mount", "-o", "remount,size=512k", str(small_tmpfs)], check=True)
    result, seconds = cli(*TINY_ABLATE, "--tracking-uri", uri, cwd=tmp_path, timeout=120)
    assert "the disk is full" in one_sentence(result)
    assert seconds < 30
    assert list(small_tmpfs.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    result, _ = cli(*TINY_ABLATE, "--tracking-uri", uri, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    store = open_store(uri, writing=False)
    assert store.client.search_runs([store.existing_experiment_id(None)], max_results=5)
    close(store)


# --- faults mid-command -------------------------------------------------------------------------------


SMALL_SWEEP = ["sweep", "--seeds", "2", "--epochs", "20", "--sae-epochs", "10", "--samples", "64"]


def identities(uri: str) -> tuple[dict, list, list]:
    """({status: count of ablation runs}, [(config hash, seed) of FINISHED seed runs], [RUNNING run ids])
    of the store's default experiment."""
    store = open_store(uri, writing=False)
    runs = store.client.search_runs([store.existing_experiment_id(None)], max_results=1000)
    if uri.startswith("sqlite:"):
        close(store)
    statuses = Counter(run.info.status for run in runs if run.data.tags.get("kind") == "ablation")
    seeds = [
        (run.data.tags["config_hash"], run.data.tags["seed"])
        for run in runs
        if run.data.tags.get("kind") == "seed" and run.info.status == "FINISHED"
    ]
    running = [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    return dict(statuses), seeds, running


def test_a_disk_filling_mid_sweep_is_one_sentence_and_the_resume_completes(small_tmpfs, tmp_path):
    """The store and its artifacts on a tmpfs with room for the new store and a little more: the sweep
    runs out of space while recording and ends with one sentence (exit 1); after remounting larger, the
    same command completes with every identity FINISHED once and nothing left RUNNING."""
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    uri = f"sqlite:///{small_tmpfs / 'mlflow.db'}"
    close(open_store(uri))
    used_kib = int(
        subprocess.run(["du", "-sk", str(small_tmpfs)], capture_output=True, text=True).stdout.split()[0]
    )
    # Room for a few seed runs' artifacts (checkpoint, overlap picture, curves), not for 16.
    subprocess.run(["mount", "-o", f"remount,size={used_kib + 400}k", str(small_tmpfs)], check=True)
    result, seconds = cli(*SMALL_SWEEP, "--tracking-uri", uri, cwd=small_tmpfs, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "the disk holding the store is full" in errors[0], result.stderr[-2000:]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    # Runs the full disk kept from being closed stay RUNNING until the next command, which sees their
    # owner is gone: the resume closes them before it trains.
    result, _ = cli(*SMALL_SWEEP, "--tracking-uri", uri, cwd=small_tmpfs, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    statuses, seeds, running = identities(uri)
    assert running == [] and statuses["FINISHED"] == 8
    assert len(seeds) == 16 and len(set(seeds)) == 16


def test_a_server_lost_mid_sweep_is_one_sentence_and_a_restarted_one_resumes(tmp_path):
    """The server stops for good while the sweep records: one sentence, exit 1, soon (not after MLflow's
    minutes of retries); a server started again on the same folder resumes the sweep."""
    servers = pytest.importorskip("tests.servers")
    folder = tmp_path / "server"
    with servers.running_server(folder) as server:
        uri = server.uri
        process = subprocess.Popen(
            [sys.executable, str(PROJECT / "cli.py"), *SMALL_SWEEP, "--no-artifacts", "--tracking-uri", uri],
            cwd=tmp_path,
            # Two retries instead of the five open_store sets (about 30 s of waiting, measured 32 s from the
            # stop to the exit): the same path, a shorter test.
            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
            | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Stopped once the sweep has recorded something: its first ablation run exists.
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            experiment = client.get_experiment_by_name("taming")
            if experiment and client.search_runs(
                [experiment.experiment_id], "tags.kind = 'seed'", max_results=1
            ):
                break
            time.sleep(0.2)
        stopped = time.monotonic()
    stdout, stderr = process.communicate(timeout=300)
    seconds = time.monotonic() - stopped
    assert process.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "stopped answering" in errors[0], stderr[-2000:]
    print(f"\nserver lost: the sweep ended {seconds:.1f} s later")
    assert seconds < 30, seconds
    with servers.running_server(folder) as server:
        result, _ = cli(
            *SMALL_SWEEP, "--no-artifacts", "--tracking-uri", server.uri, cwd=tmp_path, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        _, finished, running = identities(server.uri)
        assert running == []
        assert len(finished) == 16 and len(set(finished)) == 16


def test_store_failures_are_described_in_one_sentence():
    from mlflow.exceptions import MlflowException

    def raised(message: str, cause: BaseException) -> MlflowException:
        try:
            raise MlflowException(message) from cause
        except MlflowException as error:
            return error

    uri = "postgresql://user:hunter2@host/db"
    cases = {
        "the disk holding the store is full": raised(
            "x", sqlite3.OperationalError("database or disk is full")
        ),
        "write lock": raised("(sqlite3.OperationalError) database is locked", RuntimeError()),
        "stopped answering": raised("API request failed", ConnectionRefusedError(111, "refused")),
        "damaged": raised("(sqlite3.DatabaseError) database disk image is malformed", RuntimeError()),
        "read-only": raised("x", OSError(30, "Read-only file system")),
    }
    for expected, error in cases.items():
        sentence = describe_store_failure(error, uri)
        assert expected in sentence and "hunter2" not in sentence and "\n" not in sentence, sentence
        assert sentence.startswith("--tracking-uri ")


# --- reading commands through the CLI -----------------------------------------------------------


def test_inspect_on_a_missing_store_creates_nothing(tmp_path):
    result, seconds = cli(
        "inspect", "abc", "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}", cwd=tmp_path
    )
    assert "no store at" in one_sentence(result)
    assert seconds < 15 and list(tmp_path.iterdir()) == []


def test_report_no_log_reads_a_store_on_a_read_only_file_system(store_copy, tmp_path):
    with read_only(store_copy.parent):
        result, _ = cli(
            "report",
            "--no-log",
            "--experiment",
            "faults",
            "--tracking-uri",
            f"sqlite:///{store_copy}",
            cwd=tmp_path,
        )
    # The store was read: the experiment holds no seed runs, which is the only complaint.
    assert "no seed runs match" in one_sentence(result)


# --- the write-ahead log --------------------------------------------------------------------------------


def test_the_database_file_alone_has_the_runs_while_another_process_keeps_it_open(store_copy, tmp_path):
    """`mlflow ui` keeps a connection open, so closing ours does not fold the log back; the exit
    checkpoint does, and a copy of mlflow.db alone holds what the command recorded."""
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "c.execute('SELECT count(*) FROM experiments').fetchall()\n"
            "print('open', flush=True)\n"
            "time.sleep(60)\n",
            str(store_copy),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        script = "import sys; from tracking.store import open_store\nopen_store(sys.argv[1]).experiment_id('late')\n"
        subprocess.run(
            [sys.executable, "-c", script, f"sqlite:///{store_copy}"], cwd=PROJECT, check=True, timeout=60
        )
        copy = tmp_path / "copy.db"
        shutil.copy(store_copy, copy)  # the database file only, as a backup or scp would take it
        with sqlite3.connect(copy) as connection:
            names = {row[0] for row in connection.execute("SELECT name FROM experiments")}
        assert "late" in names
    finally:
        reader.kill()
        reader.wait()


def test_bounded_http_retries_are_defaults_a_user_setting_overrides(monkeypatch):
    from tracking import store as store_module

    for name in store_module.HTTP_RETRIES:
        monkeypatch.delenv(name, raising=False)  # restored (absent) after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with pytest.raises(TrackingError):
        open_store("http://127.0.0.1:9")  # nothing listens there: refused at the health check
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == store_module.HTTP_RETRIES["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
