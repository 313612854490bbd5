"""Tracking URI resolution, importable without MLflow (which takes about 2 s to import).

The sweep command decides how to start its workers before it opens the store; this module is what it
needs for that.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(option: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else MLflow 3's default `sqlite:///mlflow.db`."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_new_sqlite_store(uri: str) -> bool:
    """True when `uri` names an SQLite database file that does not exist yet: a store that cannot hold
    any run to reuse."""
    if not uri.startswith("sqlite:///"):
        return False
    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])  # drop ?timeout=… and the like
    return database.parent.is_dir() and not database.exists()
