"""Collector status on the broker: read the retained ``<root>/_status/ingest-<i>`` topics.

Each collector publishes a retained ``contract.Status`` after every batch and every
``status_interval_s``; its will message marks it offline if it dies.  Reading them
needs nothing but the broker, so ``flywheel ingest --status`` works from any machine::

    statuses = read_statuses("mqtt://127.0.0.1:1883", "factory")
    print_table(statuses)
"""

from __future__ import annotations

import threading
import time

from flywheel.base import contract
from flywheel.base.mqtt import connect, make_client

COUNTER_COLUMNS = ("received", "landed", "deadlettered", "lag_s", "batches", "restarts")


def read_statuses(broker_url: str, topic_root: str = "factory", *, prefix: str = "ingest-",
                  wait_s: float = 0.5, timeout_s: float = 10.0) -> dict[str, contract.Status]:
    """The retained status of every component whose name starts with ``prefix``."""
    topics = contract.Topics(topic_root)
    found: dict[str, contract.Status] = {}
    subscribed = threading.Event()
    client = make_client(broker_url, prefix="flywheel-ingest-status")

    def on_message(c, userdata, msg):
        try:
            status = contract.decode(msg.topic, msg.payload, topics=topics)
        except contract.ContractError:
            return  # someone else's junk on a status topic is not ours to report
        if isinstance(status, contract.Status) and status.component.startswith(prefix):
            found[status.component] = status

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    connect(client, broker_url, timeout=timeout_s)
    try:
        client.subscribe(topics.pattern("status"), qos=1)
        subscribed.wait(timeout_s)
        time.sleep(wait_s)  # retained messages follow the SUBACK
    finally:
        client.disconnect()
        client.loop_stop()
    return dict(sorted(found.items()))


def restore_counters(broker_url: str, topic_root: str, component: str, lake_uri: str | None = None,
                     client_id: str | None = None) -> dict[str, float]:
    """The counters a restarted collector continues from.

    The landed and dead-lettered counts are recounted from the lake files this collector
    wrote (their names start with its client id): the lake is the truth, while the retained
    status can lag one batch behind it, or carry no counters at all once the will message
    of a crashed collector replaced it.  Restarts, batches and acks come from the retained
    status when it still has them.
    """
    try:
        status = read_statuses(broker_url, topic_root, prefix=component, wait_s=0.3).get(component)
    except ConnectionError:  # the broker is restarting too: the lake still has the counts
        status = None
    counters = dict(status.counters) if status is not None else {}
    if lake_uri is None or client_id is None:
        return counters
    import pyarrow.parquet as pq

    from ingest.lake import Lake

    lake = Lake.open(lake_uri)
    files = {t: lake.readable(t, lake.writer_files(t, client_id))
             for t in ("telemetry", "events", "predictions", "commands", "deadletter")}
    telemetry = sum(lake.count_rows(p) for p in files["telemetry"])
    events = sum(lake.count_rows(p) for p in files["events"])
    predictions = sum(lake.count_rows(p) for p in files["predictions"])
    commands = sum(lake.count_rows(p) for p in files["commands"])
    reasons: dict[str, int] = {}
    for path in files["deadletter"]:
        with lake.fs.open_input_file(path) as f:
            for reason in pq.read_table(f, columns=["reason"]).column("reason").to_pylist():
                reasons[reason] = reasons.get(reason, 0) + 1
    counters = {k: v for k, v in counters.items() if not k.startswith("deadlettered.")}
    counters.update({
        "landed_telemetry": telemetry, "landed_events": events, "landed_predictions": predictions,
        "landed_commands": commands, "files": sum(len(f) for f in files.values()),
        # What was received but not landed before the crash is redelivered and counted again.
        "received": telemetry + events + predictions + commands + sum(reasons.values()),
    })
    counters.update({f"deadlettered.{k}": v for k, v in reasons.items()})
    return counters


def summarise(statuses: dict[str, contract.Status]) -> dict:
    """Totals over collectors, in the shape of ``IngestHandle.status()``."""
    total = {"received": 0, "landed": 0, "deadlettered": 0, "by_reason": {}, "lag_s": 0.0}
    for s in statuses.values():
        c = s.counters
        total["received"] += int(c.get("received", 0))
        total["landed"] += int(c.get("landed", 0))
        total["deadlettered"] += int(c.get("deadlettered", 0))
        total["lag_s"] = max(total["lag_s"], float(c.get("lag_s", 0.0)))
        for k, v in c.items():
            if k.startswith("deadlettered."):
                reason = k.split(".", 1)[1]
                total["by_reason"][reason] = total["by_reason"].get(reason, 0) + int(v)
    return total


def render_table(rows: list[dict], title: str = "ingest collectors"):
    """A rich Table of per-collector counters (rows: dicts with component/online and counters)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("collector", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for col in COUNTER_COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("dead letters by reason", overflow="fold")
    for r in rows:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.get("by_reason", {}).items())) or "-"
        table.add_row(r["component"], "online" if r.get("online", True) else "offline",
                      *[_fmt(r.get(col, 0)) for col in COUNTER_COLUMNS], reasons)
    return table


def status_rows(statuses: dict[str, contract.Status]) -> list[dict]:
    rows = []
    for name, s in statuses.items():
        c = s.counters
        rows.append({"component": name, "online": s.online, **{k: c.get(k, 0) for k in COUNTER_COLUMNS},
                     "by_reason": {k.split(".", 1)[1]: int(v) for k, v in c.items()
                                   if k.startswith("deadlettered.")}})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.2f}"
    return f"{int(v):,}"
