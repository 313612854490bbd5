"""New SQLite stores start as a copy of the installed MLflow's empty store (tracking.store.store_template_path)."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import mlflow.store.db.utils
import pytest

from tests.test_store_faults import close
from tracking.store import open_store, store_template_path


def created(path) -> None:
    close(open_store(f"sqlite:///{path}"))


def contents(path) -> list[tuple[str, ...]]:
    """Every statement of an SQL dump of the database, experiment 0's two timestamps blanked, as sorted
    lines: MLflow's migrations do not always create indexes, or list a table's CHECK constraints, in the
    same order (two stores built through them differ so), and neither order means anything."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("UPDATE experiments SET creation_time = 0, last_update_time = 0")
        return sorted(
            tuple(sorted(line.strip().rstrip(",").strip() for line in statement.splitlines()))
            for statement in connection.iterdump()
        )
    finally:
        connection.rollback()
        connection.close()


@pytest.fixture
def template(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "template.db"
    monkeypatch.setenv("POLYLAB_STORE_TEMPLATE", str(path))
    return path


def test_a_store_copied_from_the_template_equals_one_built_by_the_migrations(template, tmp_path, monkeypatch):
    created(tmp_path / "built.db")
    assert template.is_file()
    with closing(sqlite3.connect(template)) as connection:  # the Default experiment is each store's own
        assert connection.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)

    def no_migrations(engine):
        raise AssertionError("a store copied from the template ran MLflow's migrations")

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", no_migrations)
    created(tmp_path / "copied.db")
    built, copied = contents(tmp_path / "built.db"), contents(tmp_path / "copied.db")
    assert copied == built
    assert any("INSERT INTO \"experiments\" VALUES(0,'Default'" in statement[0] for statement in copied)


def test_without_the_template_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYLAB_STORE_TEMPLATE", "off")
    assert store_template_path() is None
    created(tmp_path / "mlflow.db")
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv("POLYLAB_STORE_TEMPLATE")
    assert store_template_path().parent == tmp_path / "cache" / "polysemanticity-lab"


@pytest.mark.parametrize("damage", ["not a database", "another schema revision"])
def test_a_damaged_template_falls_back_to_the_migrations_and_is_replaced(damage, template, tmp_path):
    created(tmp_path / "first.db")
    reference = contents(tmp_path / "first.db")
    if damage == "not a database":
        template.write_bytes(b"these bytes are no SQLite database" * 100)
    else:
        with closing(sqlite3.connect(template)) as connection, connection:
            connection.execute("UPDATE alembic_version SET version_num = '0123456789ab'")
    created(tmp_path / "second.db")
    assert contents(tmp_path / "second.db") == reference
    created(tmp_path / "third.db")  # from the template the second store saved again
    assert contents(tmp_path / "third.db") == reference
    with closing(sqlite3.connect(template)) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() != ("0123456789ab",)
    assert sorted(path.name for path in template.parent.iterdir()) == [template.name]
