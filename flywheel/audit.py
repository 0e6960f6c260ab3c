"""The audit trail: from a stopped machine back to the model, its data and its base model.

The lake holds every link (docs/architecture.md, "The audit trail"):

* ``raw/commands`` - every ``maintain`` command, with the model version that sent it and the
  risk and threshold that triggered it (landed by ingest like telemetry);
* ``raw/events`` - the ``maintenance_start`` that applied it (its ``command_id``);
* ``ledger/serving`` - which version served on which endpoint from when to when (plant time
  and wall clock), written here by the orchestrator as versions go live and are replaced;
* ``ledger/models`` - each registered version's run, snapshots with their content hash, base
  model (source, digest, licence) and warm-start parent, written here when a version is
  registered (facts from :func:`finetune.lineage_record`).

:data:`LINEAGE_SQL` joins them with DuckDB alone; the architecture doc quotes it verbatim and a
test runs the doc's copy.  ``flywheel lineage --machine ID --at TIME`` runs the same text
(:func:`lineage`) and prints the chain (:func:`format_lineage`).

    SET VARIABLE machine = 'mill-01';  SET VARIABLE at_ts = 1728134400;  SET VARIABLE within_s = 3600;
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from flywheel.base.contract import MAX_TS
from flywheel.base.errors import FlywheelError

#: How far before ``--at`` a command may lie and still be the one that ordered the stop (plant seconds).
DEFAULT_WITHIN_S = 3600.0

# The query of "The audit trail" in docs/architecture.md (quoted there verbatim; a test runs the doc's copy).
LINEAGE_SQL = """\
WITH RECURSIVE
command AS (   -- the last maintain command for the machine at or before the time
    SELECT command_id, ts, line, machine, model_version, risk, threshold, reason
    FROM 'raw/commands/*/*.parquet'
    WHERE machine = getvariable('machine') AND command = 'maintain'
      AND ts <= getvariable('at_ts') AND ts > getvariable('at_ts') - getvariable('within_s')
    ORDER BY ts DESC, received_at
    LIMIT 1
),
stop AS (      -- the maintenance it started, once the plant applied it
    SELECT min(e.ts) AS stop_ts, arg_min(e.finding, e.ts) AS finding
    FROM 'raw/events/*/*.parquet' e JOIN command c
      ON e.command_id = c.command_id AND e.machine = c.machine
    WHERE e.type = 'maintenance_start'
),
periods AS (   -- a serving period is its start row plus, once it ended, its end row
    SELECT period_id, any_value(model_name) AS model_name, any_value(version) AS version,
           any_value(endpoint) AS endpoint, any_value(app_name) AS app_name, any_value(site) AS site,
           max(from_ts) AS from_ts, max(to_ts) AS to_ts, max(from_wall) AS from_wall, max(to_wall) AS to_wall
    FROM 'ledger/serving/*.parquet'
    GROUP BY period_id
),
period AS (    -- the period of that version that covers the command
    SELECT p.* FROM periods p JOIN command c
      ON p.version = c.model_version AND c.ts >= p.from_ts AND (p.to_ts IS NULL OR c.ts <= p.to_ts)
    ORDER BY p.from_ts DESC
    LIMIT 1
),
models AS (    -- the newest ledger row of each version
    SELECT * FROM 'ledger/models/*.parquet'
    QUALIFY row_number() OVER (PARTITION BY model_name, version ORDER BY recorded_at DESC) = 1
),
chain(depth, model_name, version) AS (   -- the version, then its warm-start parents
    SELECT 0, coalesce((SELECT model_name FROM period),
                       (SELECT min(model_name) FROM models WHERE version = c.model_version)), c.model_version
    FROM command c
    UNION ALL
    SELECT chain.depth + 1, m.model_name, m.parent_version
    FROM chain JOIN models m ON m.model_name = chain.model_name AND m.version = chain.version
    WHERE m.parent_version IS NOT NULL AND chain.depth < 50
)
SELECT c.command_id, c.ts AS command_ts, c.line, c.machine, c.risk, c.threshold, c.reason,
       stop.stop_ts, stop.finding,
       p.endpoint, p.app_name, p.site, p.from_ts AS served_from_ts, p.to_ts AS served_to_ts,
       p.from_wall AS served_from_wall, p.to_wall AS served_to_wall,
       chain.depth, chain.model_name, chain.version, m.run_id, m.family, m.registered_at,
       m.train_dataset, m.calibration_dataset, m.eval_dataset, m.dataset_hash,
       m.base_model, m.base_model_source, m.base_model_package, m.base_model_version,
       m.base_model_sha256, m.base_model_licence, m.parent_version
FROM command c
CROSS JOIN stop
LEFT JOIN period p ON true
JOIN chain ON true
LEFT JOIN models m ON m.model_name = chain.model_name AND m.version = chain.version
ORDER BY chain.depth
"""


class LineageError(FlywheelError):
    """The audit trail cannot answer for this machine and time; the message names the fix."""

    exit_code = 2


# --------------------------------------------------------------------------- writing the ledgers
def record_version(lake_uri: str, tracking_uri: str, model_name: str, version: str) -> list[str]:
    """Write ``version`` (and its warm-start parents the ledger lacks) to ``ledger/models``;
    returns the versions written."""
    from finetune import lineage_record
    from ingest import Lake

    lake = Lake.open(lake_uri)
    known = {(r["model_name"], r["version"]) for r in lake.read_ledger("models").select(
        ["model_name", "version"]).to_pylist()}
    rows, todo = [], str(version)
    while todo and (model_name, todo) not in known and len(rows) < 50:
        row = lineage_record(tracking_uri, model_name, todo)
        rows.append(row)
        known.add((model_name, todo))
        todo = row["parent_version"]
    if rows:
        lake.append_ledger("models", rows)
    return [r["version"] for r in rows]


class ServingLedger:
    """Opens and closes the campaign's serving periods in ``ledger/serving`` (append-only).

    A period opens when a version starts serving the plant and closes when another replaces it
    or serving stops; plant times are the plant's (``ts`` of the lake), wall times UTC."""

    def __init__(self, lake_uri: str, model_name: str, campaign: str, site: str = "local"):
        self.lake_uri, self.model_name, self.campaign, self.site = lake_uri, model_name, campaign, site
        self.current: dict | None = None   # the open period this process started

    def _lake(self):
        from ingest import Lake

        return Lake.open(self.lake_uri)

    def close_dangling(self, plant_ts: float, turn: int) -> int:
        """Close the periods of this campaign a killed process left open, at ``plant_ts`` (the committed
        boundary the campaign resumes from: what served after it was set aside). Returns how many."""
        rows = self._lake().read_ledger("serving").to_pylist()
        ended = {r["period_id"] for r in rows if r["to_ts"] is not None}
        dangling = [r for r in rows if r["campaign"] == self.campaign and r["model_name"] == self.model_name
                    and r["to_ts"] is None and r["period_id"] not in ended]
        seen: set[str] = set()
        out = []
        for r in dangling:
            if r["period_id"] in seen:
                continue
            seen.add(r["period_id"])
            out.append({**r, "turn": turn, "to_ts": max(float(plant_ts), float(r["from_ts"] or plant_ts)),
                        "to_wall": datetime.now(timezone.utc), "note": "closed at restart"})
        if out:
            self._lake().append_ledger("serving", out)
        return len(out)

    def serve(self, version: str, *, endpoint: str, app_name: str, plant_ts: float, turn: int) -> None:
        """``version`` serves from ``plant_ts`` on (nothing when it already does at this endpoint)."""
        cur = self.current
        if cur is not None and cur["version"] == str(version) and cur["endpoint"] == endpoint:
            return
        rows = []
        if cur is not None:
            rows.append(self._end(cur, plant_ts, turn, f"replaced by v{version}"))
        self.current = {"period_id": uuid.uuid4().hex, "model_name": self.model_name, "version": str(version),
                        "alias": "champion", "endpoint": endpoint, "app_name": app_name, "site": self.site,
                        "campaign": self.campaign, "turn": turn, "from_ts": float(plant_ts), "to_ts": None,
                        "from_wall": datetime.now(timezone.utc), "to_wall": None, "note": None}
        rows.append(self.current)
        self._lake().append_ledger("serving", rows)

    def stop(self, plant_ts: float, turn: int, note: str = "serving stopped") -> None:
        """Close the open period (serving stopped)."""
        if self.current is not None:
            self._lake().append_ledger("serving", [self._end(self.current, plant_ts, turn, note)])
            self.current = None

    @staticmethod
    def _end(cur: dict, plant_ts: float, turn: int, note: str) -> dict:
        return {**cur, "turn": turn, "to_ts": max(float(plant_ts), cur["from_ts"]),
                "to_wall": datetime.now(timezone.utc), "note": note}


# --------------------------------------------------------------------------- reading the chain
def parse_time(text: str) -> float:
    """Plant time as the lake stores it (epoch seconds, UTC), from epoch seconds or ISO-8601
    (a time without a zone is UTC)."""
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise LineageError(f"--at {text!r} is neither plant epoch seconds (e.g. 1728134400) nor ISO-8601 "
                               "(e.g. 2024-10-05T13:20:00Z); pass one of those") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        value = when.timestamp()
    if not math.isfinite(value):
        raise LineageError(f"--at {text!r} is not a finite time; pass plant epoch seconds or ISO-8601")
    if not 0 <= value < MAX_TS:      # the lake's days run from 1970 to 9999, as plant times do
        raise LineageError(f"--at {text!r} is no plant time: pass epoch seconds from 0 to before the year 10000 "
                           "(e.g. 1728134400), or ISO-8601")
    return value


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Lineage:
    """The chain for one command: ``rows[0]`` the version that sent it, then its warm-start parents."""

    rows: list[dict] = field(default_factory=list)

    @property
    def command(self) -> dict:
        return self.rows[0]


def run_lineage_sql(lake_root: str, machine: str, at: float, within_s: float = DEFAULT_WITHIN_S) -> list[dict]:
    """:data:`LINEAGE_SQL` over the lake at ``lake_root`` (a local directory), as dicts."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET file_search_path = ?", [lake_root])
        con.execute("SET VARIABLE machine = ?", [machine])
        con.execute("SET VARIABLE at_ts = ?", [float(at)])
        con.execute("SET VARIABLE within_s = ?", [float(within_s)])
        cur = con.execute(LINEAGE_SQL)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()


def _machines_and_span(lake_root: str, machine: str) -> tuple[set, tuple]:
    """The machines in the lake's commands and events, and ``machine``'s maintain commands' (first ts,
    last ts, count)."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET file_search_path = ?", [lake_root])
        machines = {r[0] for r in con.execute(
            "SELECT DISTINCT machine FROM 'raw/commands/*/*.parquet' UNION "
            "SELECT DISTINCT machine FROM 'raw/events/*/*.parquet'").fetchall()}
        span = con.execute("SELECT min(ts), max(ts), count(*) FROM 'raw/commands/*/*.parquet' "
                           "WHERE machine = ? AND command = 'maintain'", [machine]).fetchone()
    finally:
        con.close()
    return machines, span


def lineage(lake_uri: str, machine: str, at: float, within_s: float = DEFAULT_WITHIN_S) -> Lineage:
    """The chain behind the command that stopped ``machine`` at plant time ``at``; a
    :class:`LineageError` naming the fix when the lake cannot answer."""
    import duckdb

    root = lake_uri
    if "://" in root:
        raise LineageError(f"the lake {lake_uri} is not a local directory; `flywheel lineage` reads a local lake "
                           "(run the documented DuckDB query with its httpfs extension for an object store)")
    if not os.path.isdir(root) or not os.path.isdir(os.path.join(root, "raw")):
        raise LineageError(f"no lake at {root}: pass the --workdir a campaign ran in (flywheel demo --workdir W "
                           "writes W/lake)")
    if not os.path.isdir(os.path.join(root, "raw", "commands")):
        raise LineageError(f"the lake at {root} has no commands table (raw/commands): it was written before ingest "
                           "kept commands; run a campaign (flywheel run/turn) with this version to record them")
    from ingest import Lake

    lake = Lake.open(root)   # DuckDB stops at a file that is not Parquet: such a file goes to quarantine
    # The ledgers first: DuckDB would read a ledger file changed after it was written (one that no
    # longer matches its sha256) as other rows; such a file, or one that does not read, is named.
    lake.check_ledgers()
    tables = ("commands", "events")
    # Each file read whole first, its pages' CRCs checked: DuckDB checks none, and would read bytes
    # changed inside a page as other values (a risk, a time) without an error.
    files = {table: lake.readable_files(table, whole=True) for table in tables}
    while True:
        try:
            machines, span = _machines_and_span(root, machine)
            rows = run_lineage_sql(root, machine, at, within_s) if machine in machines and span[2] else []
            break
        except duckdb.Error:   # a file damaged since it was checked: quarantine it, ask again
            sound = {table: lake.readable(table, files[table], whole=True) for table in tables}
            if sound == files:   # every file sound, the ledgers checked above: DuckDB's own error
                raise
            files = sound
    if machine not in machines:
        known = ", ".join(sorted(machines)[:20]) or "none"
        raise LineageError(f"machine {machine!r} is not in the lake at {root} (machines there: {known}); "
                           "pass one of them to --machine")
    if not span[2]:
        raise LineageError(f"machine {machine!r} never received a maintain command (no model ordered it to stop: "
                           "it ran before a model served, or is in the control fleet); pick a machine with "
                           "commands")
    if not rows:
        raise LineageError(f"no maintain command for {machine!r} in the {within_s:g} s of plant time up to {iso(at)} "
                           f"({at:.0f}); its commands run from {iso(span[0])} ({span[0]:.0f}) to {iso(span[1])} "
                           f"({span[1]:.0f}): pass an --at in that range, the time of the stop or later, or widen "
                           "--within")
    return Lineage(rows)


def format_lineage(chain: Lineage) -> str:
    c = chain.command
    out = [f"command {c['command_id']} to {c['line']}/{c['machine']} at {iso(c['command_ts'])} "
           f"(plant ts {c['command_ts']:.0f})"
           + (f": risk {c['risk']:.3f} >= threshold {c['threshold']:.3f}" if c["risk"] is not None
              and c["threshold"] is not None else f": {c['reason']}")]
    if c["stop_ts"] is not None:
        out.append(f"  the plant stopped the machine at {iso(c['stop_ts'])} (maintenance; inspection found "
                   f"{c['finding'] or '-'})")
    else:
        out.append("  no maintenance_start in the lake names this command (not applied, or not landed yet)")
    if c["served_from_ts"] is not None:
        until = iso(c["served_to_ts"]) if c["served_to_ts"] is not None else "still serving"
        wall_to = c["served_to_wall"].isoformat(timespec="seconds") if c["served_to_wall"] else "-"
        out.append(f"ordered by {c['model_name']} v{c['version']}, served at {c['endpoint']} (app {c['app_name']}, "
                   f"site {c['site']}) from {iso(c['served_from_ts'])} to {until} in plant time "
                   f"(wall {c['served_from_wall'].isoformat(timespec='seconds')} to {wall_to})")
    else:
        out.append(f"ordered by {c['model_name'] or 'model'} v{c['version']} (no serving period in the lake's "
                   "ledger covers it)")
    for r in chain.rows:
        indent = "  " * (r["depth"] + 1)
        if r["depth"] > 0:
            out.append(f"{indent[:-2]}warm-started from v{r['version']}")
        if r["run_id"] is None:
            out.append(f"{indent}v{r['version']} is not in the lake's model ledger (registered outside a campaign)")
            continue
        registered = r["registered_at"].isoformat(timespec="seconds") if r["registered_at"] else "-"
        out.append(f"{indent}run {r['run_id']} ({r['family']}), registered {registered}")
        out.append(f"{indent}trained on snapshot {r['train_dataset']} (content hash {r['dataset_hash']}); "
                   f"calibrated on {r['calibration_dataset']}, evaluated on {r['eval_dataset']}")
        package = f" {r['base_model_package']}" if r["base_model_package"] else ""
        out.append(f"{indent}base model {r['base_model']}: {r['base_model_source']}{package} "
                   f"{r['base_model_version']}, sha256 {r['base_model_sha256']}, licence {r['base_model_licence']}")
    return "\n".join(out)


__all__ = ["LINEAGE_SQL", "LineageError", "ServingLedger", "record_version", "lineage", "run_lineage_sql",
           "format_lineage", "parse_time", "DEFAULT_WITHIN_S"]
