"""Tracking URI resolution and checks, importable without MLflow (which takes about 2 s to import).

The sweep command checks the URI and decides how to start its workers before it imports MLflow, so a
mistyped URI is reported at once; `tracking.store` uses the same checks when it opens the store.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(option: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else MLflow 3's default `sqlite:///mlflow.db`.

    An explicit `--tracking-uri ''` is kept as given (check_tracking_uri refuses it) rather than silently
    meaning the default store: the user asked for some store, not for ./mlflow.db.
    """
    if option is not None:
        return option
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_database(uri: str) -> Path:
    """The database file of a `sqlite:///path?options` URI."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def is_new_sqlite_store(uri: str) -> bool:
    """True when `uri` names an SQLite database file that does not exist yet (or is still empty): a store
    that cannot hold any run to reuse."""
    if not uri.startswith("sqlite:///"):
        return False
    database = sqlite_database(uri)
    return database.parent.is_dir() and _holds_no_store(database)


def _holds_no_store(database: Path) -> bool:
    """Missing, or an empty file (`touch mlflow.db`): SQLite reads both as a database without tables."""
    try:
        return database.stat().st_size == 0 and database.is_file()
    except FileNotFoundError:
        return True


SUPPORTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
SQLITE_HEADER = b"SQLite format 3\x00"
# How long a writing command waits for another process's write lock before saying so: SQLite commits
# take milliseconds, so a lock held this long belongs to a stuck or long transaction, and the command
# still ends within a few seconds instead of in MLflow's retry loops.
LOCK_WAIT_S = 3.0
# The /health check tries this often, backing off from 0.25 s, on a refused or reset connection or a
# 502/503/504 (a server or its proxy restarting): about 0.75 s more before a down server is reported.
HEALTH_ATTEMPTS = 3
RETRIED_STATUSES = (502, 503, 504)
CREDENTIALS_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
)
DATABASE_CREDENTIALS_HINT = {
    "postgresql": "put the password in PGPASSWORD or ~/.pgpass",
    "mysql": "put the password in ~/.my.cnf",
    "mssql": "use the driver's integrated or environment-based authentication",
}
ACCEPTED = "sqlite:///, http://, https://, postgresql://, mysql:// or mssql://"


class TrackingError(ValueError):
    """The tracking store cannot be used as given; the message names the option."""


def masked(uri: str) -> str:
    """`uri` fit to print: a password in it replaced by ***."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.password is None:
        return uri
    host = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{parsed.username}:***@{host}"))


def check_tracking_uri(uri: str, timeout: float = 5.0, *, writing: bool = True) -> None:
    """Raise TrackingError if `uri` is malformed, unreachable or unusable; writes nothing.

    Accepted: sqlite:/// (a file in an existing folder; for a writing command a writable location and no
    write lock held past LOCK_WAIT_S, for a reading one an existing store), http(s) (no credentials in
    the URI; the server must answer /health within `timeout` seconds, a refused connection or a
    502/503/504 retried briefly) and database URLs (no password in the URI; the server's port must
    accept a connection). Bare paths and file:// (MLflow's deprecated file store) are refused: none of the
    checks or the all-or-nothing store creation covers them.
    """
    if not uri.strip():
        raise TrackingError(
            "--tracking-uri is empty; give a store such as sqlite:///mlflow.db or http://127.0.0.1:5000, "
            "or leave the option out for sqlite:///mlflow.db"
        )
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.split("+")[0].lower()
    if parsed.password is not None or (scheme == "file" and parsed.username is not None):
        # Never echoed: the URI holds a secret, which would also end up in shell history, process lists
        # and the run links MLflow prints.
        hint = CREDENTIALS_HINT if scheme in ("http", "https") else DATABASE_CREDENTIALS_HINT.get(scheme)
        raise TrackingError(
            f"--tracking-uri {masked(uri)} must not carry credentials (user:password@); "
            f"{hint or 'give them to the store another way'}, never on the command line"
        )
    if uri in ("databricks", "databricks-uc", "uc"):
        # MLflow's names for Databricks workspaces: none of this project's store checks reach them.
        raise TrackingError(f"--tracking-uri must start with one of {ACCEPTED}; {uri!r} is not supported")
    if not scheme or len(scheme) == 1 or scheme == "file":
        # A bare path or file:// is MLflow's file store (a drive letter parses as a one-letter scheme).
        path = uri.removeprefix("file://") if scheme == "file" else uri
        raise TrackingError(
            f"--tracking-uri {uri!r} is a plain path, which MLflow reads as its deprecated file store; "
            f"use an SQLite store instead, e.g. sqlite:///{path}"
        )
    if scheme not in SUPPORTED_SCHEMES:
        raise TrackingError(
            f"--tracking-uri must start with one of {ACCEPTED}; {parsed.scheme}:// is not supported"
        )
    if scheme == "sqlite":
        _check_sqlite(uri, writing)
    elif scheme in ("http", "https"):
        if not parsed.netloc:
            raise TrackingError(f"--tracking-uri must name a host, e.g. http://127.0.0.1:5000; got {uri!r}")
        health = urllib.parse.urljoin(uri.rstrip("/") + "/", "health")
        try:
            _get_with_retries(health, timeout)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise TrackingError(
                f"--tracking-uri {uri} is unreachable ({error}); is the MLflow server running?"
            ) from error
    elif parsed.hostname:
        # MLflow would retry a database it cannot reach for about 100 s; one connection attempt says it.
        try:
            with socket.create_connection(
                (parsed.hostname, parsed.port or DATABASE_PORTS[scheme]), timeout=timeout
            ):
                pass
        except OSError as error:
            raise TrackingError(
                f"--tracking-uri {uri}: the database server is unreachable ({error}); is it running?"
            ) from None


def _check_sqlite(uri: str, writing: bool) -> None:
    """The checks of an sqlite:/// URI, with the stdlib's sqlite3 only (read-only, short timeouts)."""
    if not uri.startswith("sqlite:///"):
        raise TrackingError(
            f"--tracking-uri for SQLite must look like sqlite:///path/to/mlflow.db; got {uri!r}"
        )
    database = sqlite_database(uri)
    if str(database) in ("", ".", ":memory:") or uri.removeprefix("sqlite:///").startswith(("?", "file:")):
        # MLflow would open an in-memory database, and every run would vanish with the process.
        raise TrackingError(
            f"--tracking-uri {uri!r} names no database file, so runs would be lost when the command ends; "
            "name one, e.g. sqlite:///mlflow.db"
        )
    if not database.parent.is_dir():
        raise TrackingError(f"--tracking-uri points into a folder that does not exist: {database.parent}")
    if database.is_dir():
        raise TrackingError(
            f"--tracking-uri {uri} names a folder, not a database file; use sqlite:///{database}/mlflow.db"
        )
    if _holds_no_store(database):
        if not writing:
            raise TrackingError(
                f"--tracking-uri {uri}: there is no store at {database} yet; record runs there first "
                "or point --tracking-uri at an existing mlflow.db"
            )
        if not os.access(database.parent, os.W_OK):
            raise TrackingError(
                f"--tracking-uri {uri}: the folder {database.parent} is read-only, so no store can be "
                "created there; make it writable or point --tracking-uri at a writable folder"
            )
        return
    try:
        with database.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        raise TrackingError(f"--tracking-uri {uri}: {database} cannot be read ({error.strerror})") from None
    if header != SQLITE_HEADER:
        raise TrackingError(
            f"--tracking-uri {uri}: {database} is not an SQLite database; point --tracking-uri at an "
            "mlflow.db file"
        )
    if writing and not (os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)):
        # The folder too: SQLite writes its journal or write-ahead log beside the database.
        place = database if not os.access(database, os.W_OK) else database.parent
        raise TrackingError(
            f"--tracking-uri {uri}: {place} is read-only, so this command cannot record its runs; make it "
            "writable or point --tracking-uri at a writable store (reading commands work as they are)"
        )
    _check_sqlite_database(uri, database, writing)


def _check_sqlite_database(uri: str, database: Path, writing: bool) -> None:
    """An existing database: intact (quick_check), an MLflow store, and (for writing) not write-locked."""
    import sqlite3

    # Read-only, and with no -wal file (no other connection and a clean last close) also immutable: a
    # read-only connection to a write-ahead-log database would otherwise create -wal and -shm files it
    # cannot remove. With a -wal file present those files exist already and may hold the newest pages.
    wal = database.with_name(database.name + "-wal").exists()
    readonly = f"file:{urllib.parse.quote(str(database.resolve()))}?mode=ro" + ("" if wal else "&immutable=1")
    try:
        connection = sqlite3.connect(readonly, uri=True, timeout=LOCK_WAIT_S)
    except sqlite3.Error as error:
        raise TrackingError(f"--tracking-uri {uri}: {database} cannot be opened ({error})") from None
    try:
        problems = [row[0] for row in connection.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(problems[0])
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and not {"alembic_version", "experiments", "runs"} <= tables:
            raise TrackingError(
                f"--tracking-uri {uri}: {database} is an SQLite database but not an MLflow store; point "
                "--tracking-uri at an mlflow.db file"
            )
        if not tables and not writing:
            raise TrackingError(
                f"--tracking-uri {uri}: the database {database} holds no runs yet; record runs there first "
                "or point --tracking-uri at an existing mlflow.db"
            )
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            raise TrackingError(_locked(uri)) from None
        raise TrackingError(_damaged(uri, database, error)) from None
    except sqlite3.DatabaseError as error:
        raise TrackingError(_damaged(uri, database, error)) from None
    finally:
        connection.close()
    if writing:
        _check_write_lock(uri, database)


def _check_write_lock(uri: str, database: Path) -> None:
    """Take and release SQLite's write lock (BEGIN IMMEDIATE … ROLLBACK: nothing is written), waiting at
    most LOCK_WAIT_S; MLflow's own connections would wait 5 s per statement, then fail with a traceback."""
    import sqlite3

    try:
        connection = sqlite3.connect(database, timeout=LOCK_WAIT_S, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            raise TrackingError(_locked(uri)) from None
        raise TrackingError(f"--tracking-uri {uri}: the store cannot be written ({error})") from None


def _locked(uri: str) -> str:
    return (
        f"--tracking-uri {uri}: another process has held the store's write lock for over {LOCK_WAIT_S:.0f} s; "
        "wait for it to finish (or stop it) and re-run the command"
    )


def _damaged(uri: str, database: Path, error: Exception) -> str:
    return (
        f"--tracking-uri {uri}: {database} is damaged ({str(error).splitlines()[0]}); restore it from a copy "
        "or point "
        "--tracking-uri at another store"
    )


def _get_with_retries(url: str, timeout: float) -> None:
    """GET `url`, retrying transient failures (HEALTH_ATTEMPTS tries in all) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.25
    for attempt in range(1, HEALTH_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(  # noqa: S310 (user-given URI)
                url, timeout=max(deadline - time.monotonic(), 0.1)
            ) as response:
                response.read()
            return
        except urllib.error.HTTPError as error:
            failure, transient = error, error.code in RETRIED_STATUSES
        except urllib.error.URLError as error:
            # Refused, reset or aborted connections are retried; DNS, TLS and timeouts are not.
            failure, transient = error, isinstance(error.reason, ConnectionError)
        except ConnectionError as error:
            failure, transient = error, True
        if not transient or attempt == HEALTH_ATTEMPTS or time.monotonic() + delay >= deadline:
            raise failure
        time.sleep(delay)
        delay *= 2
