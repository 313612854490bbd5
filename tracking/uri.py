"""Tracking URI resolution and checks, importable without MLflow (which takes about 2 s to import).

The sweep command checks the URI and decides how to start its workers before it imports MLflow, so a
mistyped URI is reported at once; `tracking.store` uses the same checks when it opens the store.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(option: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else MLflow 3's default `sqlite:///mlflow.db`."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_database(uri: str) -> Path:
    """The database file of a `sqlite:///path?options` URI."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def is_new_sqlite_store(uri: str) -> bool:
    """True when `uri` names an SQLite database file that does not exist yet: a store that cannot hold
    any run to reuse."""
    if not uri.startswith("sqlite:///"):
        return False
    database = sqlite_database(uri)
    return database.parent.is_dir() and not database.exists()


SUPPORTED_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql")
# The /health check tries this often, backing off from 0.25 s, on a refused or reset connection or a
# 502/503/504 (a server or its proxy restarting): about 0.75 s more before a down server is reported.
HEALTH_ATTEMPTS = 3
RETRIED_STATUSES = (502, 503, 504)
CREDENTIALS_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
)


class TrackingError(ValueError):
    """The tracking store cannot be used as given; the message names the option."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError if `uri` is malformed or unreachable; writes nothing.

    sqlite: the database's folder must exist. file: a path (the folder may be created). http(s): no
    credentials in the URI, and the server must answer its /health endpoint within `timeout` seconds
    (a refused connection or a 502/503/504 is retried briefly with backoff).
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if not scheme:
        # A bare path is MLflow's file store; accept it like file://.
        return
    if scheme not in SUPPORTED_SCHEMES:
        raise TrackingError(
            f"--tracking-uri must start with one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}; got {uri!r}"
        )
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise TrackingError(
                f"--tracking-uri for SQLite must look like sqlite:///path/to/mlflow.db; got {uri!r}"
            )
        database = sqlite_database(uri)
        if not database.parent.is_dir():
            raise TrackingError(f"--tracking-uri points into a folder that does not exist: {database.parent}")
    elif scheme in ("http", "https"):
        if not parsed.netloc:
            raise TrackingError(f"--tracking-uri must name a host, e.g. http://127.0.0.1:5000; got {uri!r}")
        if parsed.username is not None or parsed.password is not None:
            # Not echoed: the URI holds a secret, which would also end up in shell history, process
            # lists and the run links MLflow prints.
            raise TrackingError(
                f"--tracking-uri must not carry credentials (user:password@); {CREDENTIALS_HINT}"
            )
        health = urllib.parse.urljoin(uri.rstrip("/") + "/", "health")
        try:
            _get_with_retries(health, timeout)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise TrackingError(
                f"--tracking-uri {uri} is unreachable ({error}); is the MLflow server running?"
            ) from error


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
