"""A new SQLite MLflow store starts as a copy of an empty one MLflow migrated once
(``flywheel.base.tracking.seed_sqlite_store``): real MLflow opens it as one it built itself."""

from __future__ import annotations

import sqlite3
import threading

import pytest


def _schema_and_rows(db) -> tuple[list, dict]:
    """Every table and index statement (its clauses as a set: MLflow's own builds of one revision
    list a table's CHECK constraints in varying order) and every table's row count."""
    with sqlite3.connect(db) as con:
        schema = sorted((name, frozenset((sql or "").split(", \n")))
                        for name, sql in con.execute("SELECT name, sql FROM sqlite_master"))
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: con.execute(f"SELECT count(*) FROM '{t}'").fetchone()[0] for t in tables}
        rows["revision"] = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return schema, rows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FLYWHEEL_CACHE_DIR", str(path))
    return path


def test_a_seeded_store_is_the_store_mlflow_builds_and_takes_runs_and_models(tmp_path, cache):
    from mlflow import MlflowClient

    from flywheel.base.tracking import client_for, seed_sqlite_store

    seeded, built = tmp_path / "seeded.db", tmp_path / "built.db"
    assert seed_sqlite_store(f"sqlite:///{seeded}")
    assert len(list(cache.glob("mlflow-empty-*.db"))) == 1
    MlflowClient(f"sqlite:///{built}").search_experiments()      # MLflow builds this one itself
    client = client_for(f"sqlite:///{seeded}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert _schema_and_rows(seeded) == _schema_and_rows(built)
    exp = client.create_experiment("flywheel-x", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.0)
    client.create_registered_model("fd")
    client.create_model_version("fd", source=(tmp_path / "art").as_uri(), run_id=run.info.run_id)
    assert client.get_metric_history(run.info.run_id, "m")[0].value == 1.0
    assert client.get_model_version("fd", "1").run_id == run.info.run_id


def test_an_existing_store_is_never_replaced(tmp_path, cache):
    from flywheel.base.tracking import client_for, seed_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_for(uri).create_experiment("kept")
    assert not seed_sqlite_store(uri)
    assert "kept" in [e.name for e in client_for(uri).search_experiments()]


def test_threads_seeding_one_store_at_once_leave_one_whole_store(tmp_path, cache):
    from flywheel.base.tracking import client_for, seed_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seed_sqlite_store(f"sqlite:///{tmp_path / 'first.db'}")           # the cache's empty store exists
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(seed_sqlite_store(uri))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["first.db", "mlflow.db"]
    assert [e.name for e in client_for(uri).search_experiments()] == ["Default"]


def test_a_damaged_cached_store_is_built_again(tmp_path, cache):
    from flywheel.base.tracking import client_for, seed_sqlite_store

    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'a.db'}")
    (template,) = cache.glob("mlflow-empty-*.db")
    template.write_bytes(b"not a database")
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'b.db'}")
    assert [e.name for e in client_for(f"sqlite:///{tmp_path / 'b.db'}").search_experiments()] == ["Default"]
    assert _schema_and_rows(template)[0] == _schema_and_rows(tmp_path / "b.db")[0]


def test_no_seeding_without_a_cache_a_folder_or_a_plain_path(tmp_path, monkeypatch):
    from flywheel.base.tracking import seed_sqlite_store

    monkeypatch.setenv("FLYWHEEL_CACHE_DIR", "")
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'off.db'}")
    assert not (tmp_path / "off.db").exists()
    monkeypatch.setenv("FLYWHEEL_CACHE_DIR", str(tmp_path / "cache"))
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    assert not (tmp_path / "missing").exists()
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'opts.db'}?timeout=30")
    assert not seed_sqlite_store("sqlite:///:memory:")
    assert list(tmp_path.glob("*.db")) == []


def test_a_cache_that_cannot_be_written_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    from flywheel.base.tracking import client_for, seed_sqlite_store

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FLYWHEEL_CACHE_DIR", str(blocker / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not seed_sqlite_store(uri)
    assert not (tmp_path / "mlflow.db").exists()
    assert [e.name for e in client_for(uri).search_experiments()] == ["Default"]   # MLflow built it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "not-a-folder"]


@pytest.mark.parametrize("damage", ["another file", "cut short"])
def test_a_store_that_is_not_a_sqlite_database_is_named_with_the_fix_in_one_line(tmp_path, cache, capsys, damage):
    """MLflow's own error for a damaged store is a SQLAlchemy traceback from its first query; the
    stack names the file and the fix, and leaves the file as it is."""
    from flywheel.base.tracking import client_for
    from flywheel.cli import main

    wd = tmp_path / "wd"
    wd.mkdir()
    db = wd / "mlflow.db"
    client_for(f"sqlite:///{db}").create_experiment("kept")
    data = db.read_bytes()
    db.write_bytes(b"not a database, " * 512 if damage == "another file" else data[:len(data) // 3])
    left = db.read_bytes()
    capsys.readouterr()   # MLflow's own lines while it made the store
    rc = main(["train", "rollback", "--workdir", str(wd)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"flywheel train: the MLflow store {db} is not a readable SQLite database (")
    assert err[0].endswith("put back a good copy of it, or run in a new --workdir"), err
    # a campaign says so before it starts a broker or Ray
    from flywheel.campaign import default_config_path

    rc = main(["run", "--config", str(default_config_path("tiny")), "--workdir", str(wd), "--no-live"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(f"flywheel run: the MLflow store {db} is not a readable SQLite database")
    assert not (wd / "broker").exists()
    assert db.read_bytes() == left
