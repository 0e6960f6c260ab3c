"""Collectors on real Mosquitto and real Ray: bad input, a killed actor, a restarted broker."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_plantgen import Incident, day_start, encoded, stream, write_lake
from ingest_strategies import malformed

from flywheel.base import contract
from flywheel.base.features import WindowConfig
from ingest import BuildConfig, IngestConfig, build_snapshot, start_ingest
from ingest.lake import Lake

T0 = day_start()
BUILD = BuildConfig(window=WindowConfig(length=5, stride_s=300, horizon_s=1800), engine="local")


def _lake_ids(lake_dir, table="telemetry") -> pd.Series:
    path = lake_dir / ("raw/" + table if table != "deadletter" else "deadletter")
    return pd.read_parquet(path)["event_id"] if path.exists() else pd.Series([], dtype=object)


# ------------------------------------------------------------------ bad input next to good input
@pytest.fixture(scope="module")
def running(broker, ray_local, tmp_path_factory):
    """Two collectors on the session broker under a topic root of their own."""
    import uuid

    root = f"t{uuid.uuid4().hex[:8]}"
    lake = tmp_path_factory.mktemp("ingest") / "lake"
    config = IngestConfig(collectors=2, client_prefix=root, deadletter_max_bytes=256, batch_max_age_s=0.2)
    handle = start_ingest(broker.url, str(lake), config, topic_root=root)
    yield {"handle": handle, "root": root, "lake": lake, "sent": [0], "examples": [0]}
    handle.stop(drain=True)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_malformed_payloads_are_dead_lettered_while_valid_ones_land(running, publish, broker, data):
    n = running["examples"][0] = running["examples"][0] + 1
    root, handle, lake = running["root"], running["handle"], running["lake"]
    line, machine = f"x{n}", "p1"
    bad = data.draw(st.lists(malformed(line, machine, root), min_size=80, max_size=120))
    valid = encoded(stream([(line, machine, "pump")], T0 + n * 86400, 40 * 60, seed=n, part_every_s=0), root)
    items = list(valid)
    for topic, payload, _ in bad:
        items.insert(data.draw(st.integers(0, len(items))), (topic, payload))
    assert len(publish(broker.url, items)) == len(items)
    running["sent"][0] += len(items)
    status = handle.wait_landed(running["sent"][0], timeout_s=60)

    dead = pd.read_parquet(lake / "deadletter")
    mine = dead[dead["topic"] == f"{root}/{line}/{machine}/telemetry"]
    assert sorted(mine["payload"].map(bytes)) == sorted(p[:256] for _, p, _ in bad)
    assert mine["reason"].isin(contract.ContractError.REASONS).all() and mine["message"].str.len().gt(0).all()
    landed = set(_lake_ids(lake))
    assert {contract.decode(t, p, topics=contract.Topics(root)).event_id for t, p in valid} <= landed
    assert status["restarts"] == 0 and all(c["connected"] for c in status["collectors"])


def test_status_counts_and_retained_status_topics(running, broker):
    from ingest.status import read_statuses, summarise

    handle = running["handle"]
    s = handle.status()
    assert s["landed"] + s["deadlettered"] == running["sent"][0] >= 25 * 80
    assert sum(s["by_reason"].values()) == s["deadlettered"] > 2000
    assert {"not_json", "missing_field", "wrong_type", "too_large", "topic_mismatch"} <= set(s["by_reason"])
    assert s["lag_s"] < 5 and len(s["collectors"]) == 2
    assert all(c["landed"] + c["deadlettered"] > 0 for c in s["collectors"])  # the shared subscription split it
    deadline = time.monotonic() + 10
    while True:  # the retained status follows the last batch within status_interval_s
        retained = read_statuses(broker.url, running["root"])
        if summarise(retained)["landed"] == s["landed"] or time.monotonic() > deadline:
            break
    assert set(retained) == {"ingest-0", "ingest-1"} and all(r.online for r in retained.values())
    assert summarise(retained)["landed"] == s["landed"]
    assert summarise(retained)["by_reason"] == s["by_reason"]


# ------------------------------------------------------------------ faults
def _published_plant(root, hours, seed):
    msgs = stream([("l1", "m1", "milling"), ("l1", "p1", "pump")], T0, hours * 3600, seed=seed,
                  incidents=[Incident("m1", T0 + 2 * 3600 + 17, "failure", "TWF")])
    return msgs, encoded(msgs, root)


def _assert_dataset_equals_clean_build(lake_dir, msgs, tmp_path):
    """The ingested lake (maybe with duplicates) builds the same dataset as a clean lake of the messages."""
    got = build_snapshot(str(lake_dir), BUILD)
    clean = build_snapshot(str(write_lake(str(tmp_path / "clean"), msgs).uri), BUILD)
    assert got.manifest["events"]["unique"] == len(msgs)
    assert got.dataset_id == clean.dataset_id
    train = pd.read_parquet(got.train_path)
    assert not train.duplicated(["machine", "end_seq"]).any()
    return got


def test_killed_collector_restarts_and_loses_nothing(broker, ray_local, publish, uid, tmp_path):
    import ray

    lake = tmp_path / "lake"
    # Batches of 200 that wait long when not full: the kill lands after some batches were
    # written and acknowledged, while the rest is received but not yet written or acknowledged.
    cfg = IngestConfig(client_prefix=uid, batch_max_messages=200, batch_max_age_s=6, idle_flush_s=6)
    handle = start_ingest(broker.url, str(lake), cfg, topic_root=uid)
    msgs, items = _published_plant(uid, 8, seed=11)
    half = len(items) // 2
    try:
        assert len(publish(broker.url, items[:half])) == half
        deadline = time.monotonic() + 5
        while handle.status()["landed"] < half // 200 * 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = handle.status()
        assert before["landed"] == half // 200 * 200 > 0  # whole batches landed and acknowledged ...
        assert before["received"] > before["landed"]  # ... and a partial one is in flight, unacknowledged
        ray.kill(handle.actors[0], no_restart=False)
        assert len(publish(broker.url, items[half:])) == len(items) - half
        after = handle.wait_landed(len(items), timeout_s=90)
        assert after["restarts"] == 1
    finally:
        handle.stop(drain=True)
    assert set(_lake_ids(lake)) | set(_lake_ids(lake, "events")) == {m.event_id for m in msgs}
    _assert_dataset_equals_clean_build(lake, msgs, tmp_path)
    # A clean stream leaves the dead-letter store empty; plain DuckDB still reads it, as zero rows.
    import duckdb

    assert duckdb.sql(f"select count(*) from '{lake}/deadletter/*/*.parquet'").fetchall() == [(0,)]
    assert duckdb.sql(f"select count(distinct event_id) from '{lake}/raw/telemetry/*/*.parquet'").fetchall() == \
        [(len(set(_lake_ids(lake))),)]


def test_broker_restart_mid_stream_loses_no_acknowledged_event(broker_factory, ray_local, uid, tmp_path):
    from flywheel.base.mqtt import connect, make_client

    b = broker_factory()  # persistence on: sessions and queued messages survive the restart
    lake = tmp_path / "lake"
    handle = start_ingest(b.url, str(lake), IngestConfig(client_prefix=uid), topic_root=uid)
    msgs, items = _published_plant(uid, 8, seed=12)
    pub = make_client(b.url, f"{uid}-publisher")
    pub.reconnect_delay_set(min_delay=1, max_delay=2)
    acked_mids: set[int] = set()  # PUBACKs the publisher received, also for messages it queued while offline
    pub.on_publish = lambda client, userdata, mid, reason_code, properties: acked_mids.add(mid)
    connect(pub, b.url, clean_start=False, session_expiry_s=600)
    infos = []
    restart_at = len(items) // 3

    def restart_broker():
        b.stop()          # SIGTERM: Mosquitto saves sessions and queued messages
        time.sleep(1.0)
        b.start()

    restarter = threading.Thread(target=restart_broker)
    try:
        for i, (topic, payload) in enumerate(items):
            infos.append(pub.publish(topic, payload, qos=1))
            if i == restart_at:
                restarter.start()
            if i % 200 == 0:
                time.sleep(0.05)  # a plant publishes over time, not in one burst
        restarter.join()
        deadline = time.monotonic() + 60
        while len(acked_mids) < len(infos) and time.monotonic() < deadline:
            time.sleep(0.1)
        acked = [m for m, info in zip(msgs, infos) if info.mid in acked_mids]
        assert len(acked) > restart_at
        handle.wait_landed(len(acked), timeout_s=90)
    finally:
        pub.disconnect()
        pub.loop_stop()
        handle.stop(drain=True)
    landed = set(_lake_ids(lake)) | set(_lake_ids(lake, "events"))
    assert {m.event_id for m in acked} <= landed
    landed_msgs = [m for m in msgs if m.event_id in landed]
    _assert_dataset_equals_clean_build(lake, landed_msgs, tmp_path)


def test_scale_down_drains_the_share_of_a_retired_collector(broker, ray_local, publish, uid, tmp_path):
    """2 collectors stop (sessions kept), the plant publishes, 1 collector starts: nothing is stranded."""
    lake = tmp_path / "lake"
    two = start_ingest(broker.url, str(lake), IngestConfig(collectors=2, client_prefix=uid, batch_max_age_s=0.2),
                       topic_root=uid)
    two.stop(drain=True)  # sessions kept: each member's share of what comes next waits for it
    msgs, items = _published_plant(uid, 4, seed=13)
    assert len(publish(broker.url, items)) == len(items)
    one = start_ingest(broker.url, str(lake), IngestConfig(collectors=1, client_prefix=uid, batch_max_age_s=0.2),
                       topic_root=uid)
    try:
        deadline = time.monotonic() + 30
        while len(set(_lake_ids(lake)) | set(_lake_ids(lake, "events"))) < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        one.stop(drain=True, leave=True)
    assert set(_lake_ids(lake)) | set(_lake_ids(lake, "events")) == {m.event_id for m in msgs}
    from ingest.status import read_statuses

    assert set(read_statuses(broker.url, uid)) == {"ingest-0"}  # the retired collector's status is gone


# ------------------------------------------------------------------ the audit trail: predictions and commands
def _served(root, machines, t0, hours, seed):
    """A plant stream and what a served model said of it: a prediction per 10 plant minutes and
    machine, and a maintain command where the risk reached the threshold (as the bridge sends them)."""
    msgs = stream(machines, t0, hours * 3600, seed=seed, part_every_s=0)
    topics = contract.Topics(root)
    preds, cmds = [], []
    for k, (line, machine, _kind) in enumerate(machines):
        for i in range(hours * 6):
            ts, risk = t0 + 600 * (i + 1), round(((i * 7 + k * 3) % 10) / 10, 3)
            preds.append(contract.Prediction(ts=ts, line=line, machine=machine, model_version="3",
                                             probs={"ok": 1 - risk, "BRG": risk}, window_end_seq=10 * (i + 1)))
            if risk >= 0.6:
                cmds.append(contract.Command(command_id=f"maintain-{line}-{machine}-{10 * (i + 1)}", line=line,
                                             machine=machine, command="maintain", reason=f"risk {risk} >= 0.6",
                                             model_version="3", ts=ts, risk=risk, threshold=0.6))
    return msgs, preds, cmds, [(topics.for_message(m), contract.encode(m)) for m in preds + cmds]


def test_predictions_and_commands_land_beside_their_dead_letters_and_leave_snapshots_alone(
        broker, ray_local, publish, uid, tmp_path):
    import json

    import duckdb

    machines = [("l1", "p1", "pump"), ("l1", "p2", "pump")]
    msgs, preds, cmds, audit = _served(uid, machines, T0, 6, seed=21)
    # a command sent by a person, before commands carried a risk and a threshold: still valid
    manual = {"schema": "command/1", "command_id": "manual-1", "line": "l1", "machine": "p2",
              "command": "maintain", "reason": "operator heard a bearing"}
    audit.append((f"{uid}/l1/p2/command", json.dumps(manual).encode()))
    good_pred = contract.to_dict(preds[0])
    good_cmd = contract.to_dict(cmds[0])
    bad = [  # (topic, payload, reason) each breaks one rule of the prediction or command schema
        (f"{uid}/l1/p1/prediction", json.dumps({**good_pred, "probs": {"ok": 0.5, "BRG": 0.2}}).encode(), "bad_value"),
        (f"{uid}/l1/p1/prediction", json.dumps({**good_pred, "model_version": 3}).encode(), "wrong_type"),
        (f"{uid}/l1/p2/prediction", json.dumps(good_pred).encode(), "topic_mismatch"),
        (f"{uid}/l1/p1/command", json.dumps({**good_cmd, "command": "explode"}).encode(), "bad_value"),
        (f"{uid}/l1/p1/command", json.dumps({**good_cmd, "risk": 1.5}).encode(), "bad_value"),
        (f"{uid}/l1/p1/command", json.dumps({k: v for k, v in good_cmd.items() if k != "command_id"}).encode(),
         "missing_field"),
        (f"{uid}/l1/p1/command", b"{not json", "not_json"),
        (f"{uid}/l1/p1/command", json.dumps({**good_cmd, "schema": "command/2"}).encode(), "unknown_schema"),
    ]
    items = encoded(msgs, uid)
    for i, (topic, payload, _reason) in enumerate(bad + [(t, p, None) for t, p in audit]):
        items.insert((i * 37) % (len(items) + 1), (topic, payload))   # interleaved with the plant's stream
    lake = tmp_path / "lake"
    handle = start_ingest(broker.url, str(lake), IngestConfig(client_prefix=uid, batch_max_age_s=0.2),
                          topic_root=uid)
    try:
        assert len(publish(broker.url, items)) == len(items)
        deadline = time.monotonic() + 60
        while True:
            s = handle.status()
            if s["landed"] + s["deadlettered"] + s["predictions"] + s["commands"] >= len(items) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        handle.stop(drain=True)
    # counted apart: `landed` stays what the plant published (the loop waits on it)
    assert (s["landed"], s["predictions"], s["commands"], s["deadlettered"]) == \
        (len(msgs), len(preds), len(cmds) + 1, len(bad))

    got_preds = duckdb.sql(f"select machine, ts, model_version, window_end_seq, risk, probs['BRG'] as brg "
                           f"from '{lake}/raw/predictions/*/*.parquet' order by machine, ts").fetchall()
    assert got_preds == sorted((p.machine, p.ts, "3", p.window_end_seq, pytest.approx(p.probs["BRG"]),
                                p.probs["BRG"]) for p in preds)
    got_cmds = duckdb.sql(f"select command_id, machine, ts, model_version, risk, threshold, reason "
                          f"from '{lake}/raw/commands/*/*.parquet' order by command_id").fetchall()
    want = sorted([(c.command_id, c.machine, c.ts, "3", c.risk, 0.6, c.reason) for c in cmds]
                  + [("manual-1", "p2", None, None, None, None, manual["reason"])])
    assert got_cmds == want
    assert all(c[4] >= c[5] for c in got_cmds if c[4] is not None)   # each command's risk reached its threshold
    dead = duckdb.sql(f"select topic, reason from '{lake}/deadletter/*/*.parquet'").fetchall()
    assert sorted(dead) == sorted((t, r) for t, _p, r in bad)
    # snapshots read telemetry and events only: the same dataset as a lake without any of it
    _assert_dataset_equals_clean_build(lake, msgs, tmp_path)


# ------------------------------------------------------------------ a broker that refuses the subscriptions
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_refused_subscription_stops_the_collector_with_the_filters_and_the_fix(refusing_broker, uid, tmp_path,
                                                                                 protocol):
    from flywheel.base.mqtt import ConnectError
    from ingest.collector import Collector

    url = refusing_broker.url + ("?protocol=3.1.1" if protocol == "3.1.1" else "")
    collector = Collector(url, str(tmp_path / "lake"), IngestConfig(client_prefix=uid), index=0, topic_root=uid)
    with pytest.raises(ConnectError) as err:
        collector.start()
    msg = str(err.value)
    assert "refused the subscriptions of collector" in msg and f"{uid}/+/+/telemetry" in msg and f"{uid}/+/+/event" in msg, msg
    assert ("Not authorized" if protocol == "5" else "Unspecified error") in msg, msg
    assert "read (subscribe) access" in msg and "ACL" in msg, msg


def test_start_ingest_says_in_one_line_which_subscriptions_the_broker_refused(refusing_broker, ray_local, uid,
                                                                               tmp_path):
    """The reason comes back from the collector actor as the stack's own error, not as Ray's
    traceback of a failed actor constructor (``flywheel ingest`` prints it on one line)."""
    from flywheel.base.mqtt import ConnectError

    with pytest.raises(ConnectError) as err:
        start_ingest(refusing_broker.url, str(tmp_path / "lake"), IngestConfig(client_prefix=uid), topic_root=uid)
    msg = str(err.value)
    assert msg.startswith(f"broker {refusing_broker.url} refused the subscriptions of collector {uid}-collector-0: "
                          f"{uid}/+/+/telemetry (Not authorized)"), msg
    assert "\n" not in msg and "Traceback" not in msg, msg


def test_collectors_a_ray_cannot_place_end_start_ingest_with_what_they_reserve(broker, ray_local, uid, tmp_path):
    """Ray never places an actor whose CPUs it lacks: start_ingest ended with Ray's GetTimeoutError
    and its traceback (``flywheel ingest ingest.collectors=20`` on two cores, after 60 s)."""
    import ray

    from ingest.service import IngestStartError

    cpus, free = ray.cluster_resources()["CPU"], ray.available_resources().get("CPU", 0)
    config = IngestConfig(client_prefix=uid, collectors=2, actor_num_cpus=cpus)
    with pytest.raises(IngestStartError) as err:
        start_ingest(broker.url, str(tmp_path / "lake"), config, topic_root=uid, start_timeout_s=3)
    assert str(err.value) == (f"the 2 collector(s) did not start within 3 s: they reserve {2 * cpus:g} CPUs "
                              f"(ingest.collectors x ingest.actor_num_cpus={cpus:g}) of a Ray with {cpus:g}; lower "
                              "ingest.collectors or ingest.actor_num_cpus, or give Ray more CPUs (its logs say why "
                              "an actor waits)")
    deadline = time.monotonic() + 30     # any that started is stopped again: its CPUs are free
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free


def test_what_is_published_as_soon_as_start_ingest_returns_lands(broker, ray_local, publish, uid, tmp_path):
    """start_ingest returns after the broker confirmed every collector's subscriptions: a fresh
    session (a topic root nobody used) loses nothing published the moment it returns."""
    lake = tmp_path / "lake"
    handle = start_ingest(broker.url, str(lake), IngestConfig(collectors=2, client_prefix=uid, batch_max_age_s=0.2),
                          topic_root=uid)
    msgs, items = _published_plant(uid, 1, seed=5)
    try:
        assert len(publish(broker.url, items)) == len(items)
        handle.wait_landed(len(items), timeout_s=60)
    finally:
        handle.stop(drain=True)
    assert set(_lake_ids(lake)) | set(_lake_ids(lake, "events")) == {m.event_id for m in msgs}
