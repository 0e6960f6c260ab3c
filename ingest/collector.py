"""One MQTT collector: QoS 1 messages in, atomic Parquet batches out, acks last.

Message path, and why each step is where it is:

1. paho's network thread calls ``_on_message``, which only enqueues
   ``(topic, payload, mid, qos, received_at, generation)``: the network loop stays free
   to read the socket and answer keep-alives however slow the disk is.
2. The writer thread takes messages off the queue into a batch, and flushes it when it
   is full (``IngestConfig.flush_at``) or old (``batch_max_age_s``).  The collector
   announces an MQTT 5 Receive Maximum of twice the batch size, so the broker keeps
   sending while a batch is written, and never more than the collector can hold
   unacked.  Flushing decodes and validates every payload once (``ingest.batch``),
   writes the valid rows and the dead letters atomically (``ingest.lake``), publishes
   the retained status, and only then acknowledges the messages (paho ``manual_ack``).
   A crash before the ack makes the broker redeliver: duplicates are possible, loss of
   an acknowledged message is not; the dataset builder removes duplicates by ``event_id``.
3. Acks belong to one connection: a message received before a reconnect is written but
   never acked on the new connection (its packet id may by then name another message);
   the broker redelivers it and the copy is removed downstream.

The session is persistent (``clean_start=False``, session expiry, a stable client id
per collector index), so a collector that reconnects - after a broker restart or a
Ray restart of its actor - receives what was queued for it while it was away.
Several collectors split the stream with an MQTT 5 shared subscription (an MQTT 3.1.1
broker has none: :func:`check_broker_support` refuses several collectors there); a single one
subscribes plainly, because Mosquitto 2.0.11 does not restore shared subscriptions from
its persistence file: after a broker restart it drops (while acknowledging them to the
publisher) messages published before the members subscribe again.

Run one without Ray (the Ray actor in ``ingest.service`` wraps exactly this)::

    c = Collector("mqtt://127.0.0.1:1883", "./lake", IngestConfig(), index=0)
    c.start(); ...; c.stop(drain=True)
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flywheel.base import contract
from flywheel.base.mqtt import BrokerURL, ConnectError, Subscriptions, ack_many, connect, end_session, make_client
from ingest.batch import decode_batch
from ingest.config import IngestConfig
from ingest.lake import Lake

#: How long :meth:`Collector.start` waits for the broker to confirm its subscriptions.
SUBACK_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)

_STOP = object()


def status_component(index: int) -> str:
    return f"ingest-{index}"


def check_broker_support(broker_url: str | BrokerURL, config: IngestConfig) -> None:
    """Refuse a collector set-up the broker cannot carry (ConfigError naming the fix).

    Several collectors split the stream with an MQTT 5 shared subscription.  An MQTT 3.1.1
    broker (the in-Python amqtt one a laptop without Mosquitto gets) has none: each plain
    subscriber would receive every message, so every message would be written once per
    collector.  One collector lands the tiny and demo plants with room to spare.
    """
    from flywheel.base.config import ConfigError

    url = BrokerURL.parse(broker_url)
    if url.protocol != "5" and config.shared:
        what = f"collectors={config.collectors}" if config.collectors > 1 else "subscription=shared"
        raise ConfigError(
            f"{what} needs MQTT 5 shared subscriptions, and broker {url.redacted()} speaks MQTT 3.1.1 (the "
            "in-Python broker, used when Mosquitto is not installed); set collectors=1, or install Mosquitto "
            "(apt-get install mosquitto / brew install mosquitto) or pass --broker with an MQTT 5 broker")


class Collector:
    """A shared-subscription member that lands QoS 1 messages in the lake before acking them."""

    def __init__(self, broker_url: str, lake_uri: str, config: IngestConfig = IngestConfig(), *,
                 index: int = 0, topic_root: str = "factory", initial_counters: dict | None = None,
                 restarts: int = 0, on_fatal: Callable[[BaseException], None] | None = None):
        self.url = BrokerURL.parse(broker_url)
        check_broker_support(self.url, config)
        self.lake = Lake.open(lake_uri)
        self.lake.ensure_readable_when_empty()
        self.config = config
        self.index = index
        self.client_id = config.client_id(index)
        # A killed predecessor with this client id may have left a write half done: its rows
        # were not acknowledged, the broker redelivers them, so the partial file goes.
        self.lake.remove_partials(self.client_id)
        self.topics = contract.Topics(topic_root)
        self.component = status_component(index)
        self.restarts = restarts
        self._on_fatal = on_fatal  # under Ray: end the process so the actor is restarted
        self._error: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._gen_lock = threading.Lock()
        self._generation = 0
        self._connected = False
        self._drain_on_stop = True
        self._writer: threading.Thread | None = None
        self._batch_no = 0
        self._oldest_pending: float | None = None
        self._last_status = 0.0
        c = initial_counters or {}
        self._landed_at = float(c.get("landed_at", 0.0))  # wall time of the last batch made durable
        self._received = int(c.get("received", 0))
        self._telemetry = int(c.get("landed_telemetry", 0))
        self._events = int(c.get("landed_events", 0))
        self._predictions = int(c.get("landed_predictions", 0))
        self._commands = int(c.get("landed_commands", 0))
        self._batches = int(c.get("batches", 0))
        self._files = int(c.get("files", 0))
        self._acked = int(c.get("acked", 0))
        self._write_errors = int(c.get("write_errors", 0))
        self._by_reason: Counter = Counter({k.split(".", 1)[1]: int(v) for k, v in c.items()
                                            if k.startswith("deadlettered.")})
        self._client = self._make_client()

    # ------------------------------------------------------------------ MQTT side
    def _make_client(self) -> paho.Client:
        client = make_client(self.url, self.client_id, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        offline = contract.Status(component=self.component, online=False, info={"client_id": self.client_id})
        will_props = None
        if client.protocol == paho.MQTTv5 and self.config.offline_after_s > 0:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.WillDelayInterval = self.config.offline_after_s  # a quick restart does not flap offline
        client.will_set(self.topics.status(self.component), contract.encode(offline), qos=1, retain=True,
                        properties=will_props)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # Subscribed on every connect, after _on_connect: harmless when the session survived, needed
        # when it did not (Mosquitto 2.0.11 restores plain subscriptions after a restart, not shared
        # ones).  start() waits for the broker's SUBACK: what is published after it returns reaches
        # this collector, or waits for it in its session.
        self._subs = Subscriptions(client, [(f, 1) for f in self._filters(client)[0]])
        return client

    def _filters(self, client: paho.Client) -> tuple[list[str], list[str]]:
        """(filters to subscribe, filters to drop from a session an earlier run may have left)."""
        # Predictions (the champion's and a shadow challenger's) and commands too: the lake keeps the
        # audit trail (which model ordered what, and what a shadow would have said).
        plain = [self.topics.pattern(ch) for ch in ("telemetry", "event", "prediction", "prediction/shadow", "command")]
        shared = [f"$share/{self.config.share_group}/{f}" for f in plain]
        if client.protocol != paho.MQTTv5:  # MQTT 3.1.1 has no shared subscriptions
            return plain, []
        return (shared, plain) if self.config.shared else (plain, shared)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if getattr(reason_code, "is_failure", False):
            return
        with self._gen_lock:
            self._generation += 1
            self._connected = True
        # A session left by a run with the other subscription form would double-deliver: drop it
        # (self._subs subscribes right after this).
        _, stale = self._filters(client)
        if stale:
            client.unsubscribe(stale)
        log.info("%s connected (session present: %s)", self.client_id, getattr(flags, "session_present", "?"))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._gen_lock:
            self._generation += 1
            self._connected = False
        log.info("%s disconnected: %s", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg):
        # Keep the network loop free: no decoding, no I/O here.
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = repr(msg._topic)
        self._queue.put((topic, msg.payload, msg.mid, msg.qos, time.time(), self._generation))

    # ------------------------------------------------------------------ lifecycle
    def start(self, retry_s: float = 0.0) -> "Collector":
        """Connect (retrying for ``retry_s`` seconds, e.g. while a broker restarts) and start writing.

        Returns once the broker confirmed the subscriptions (SUBACK): a message published after
        that reaches this collector.  A broker that refuses them (an ACL that checks SUBSCRIBE)
        or does not answer raises :class:`ConnectError` with the reason.
        """
        deadline = time.monotonic() + retry_s
        while True:
            try:
                connect(self._client, self.url, clean_start=False, session_expiry_s=self.config.session_expiry_s,
                        receive_maximum=self.config.inflight_window)
                break
            except ConnectError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        try:
            self._subs.wait(self.url, f"collector {self.client_id}", max(SUBACK_TIMEOUT_S, deadline - time.monotonic()))
        except ConnectError:
            self._client.disconnect()
            self._client.loop_stop()
            raise
        self._publish_status(online=True)
        self._writer = threading.Thread(target=self._run_writer, name=f"{self.client_id}-writer", daemon=True)
        self._writer.start()
        return self

    def stop(self, drain: bool = True, leave: bool = False, timeout_s: float = 60.0) -> dict:
        """Flush and ack what arrived (``drain``), publish an offline status and disconnect.

        The broker keeps the session, so messages published while the collector is away
        wait for it.  ``leave=True`` is for a collector that will not come back (scale-down,
        benchmarks): it unsubscribes, writes and acks what was still in flight, and ends its
        session, so an offline shared-subscription member strands nothing.
        """
        if self._writer is None:
            return self.status()
        self._drain_on_stop = drain or leave
        if not self._drain_on_stop:
            self._client.disconnect()  # unacked messages wait in the session for the next start
        self._queue.put(_STOP)
        self._writer.join(timeout_s)
        self._writer = None
        if leave:
            self._leave(timeout_s)
        if self._drain_on_stop:
            self._publish_status(online=False)
            self._client.disconnect(properties=end_session(self._client) if leave else None)
        self._client.loop_stop()
        return self.status()

    def _leave(self, timeout_s: float) -> None:
        done = threading.Event()
        self._client.on_unsubscribe = lambda *args: done.set()
        wanted, _ = self._filters(self._client)
        self._client.unsubscribe(wanted)
        done.wait(timeout_s)
        time.sleep(0.2)  # anything sent before the UNSUBACK is in the queue by now
        self._drain([])  # the broker sends nothing more: write and ack the rest

    # ------------------------------------------------------------------ writer thread
    def _run_writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:  # noqa: BLE001 - a dead writer would stall the stream silently
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("%s writer thread failed; unacknowledged messages stay with the broker", self.client_id)
            if self._on_fatal is not None:
                self._on_fatal(exc)

    def _write_loop(self) -> None:
        cfg = self.config
        idle_s = cfg.idle_flush_s
        if idle_s is None:
            idle_s = 0.25 if self._client.protocol == paho.MQTTv5 else 0.05
        batch: list[tuple] = []
        while True:
            timeout = cfg.status_interval_s
            if batch:
                age = time.time() - batch[0][4]
                timeout = max(0.0, min(idle_s, cfg.batch_max_age_s - age))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._drain(batch)
                return
            if item is not None:
                if not batch:
                    self._oldest_pending = item[4]
                batch.append(item)
                self._received += 1
                # Take what is already queued without waiting (up to the batch size).
                while len(batch) < cfg.flush_at:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        self._queue.put(_STOP)
                        break
                    batch.append(more)
                    self._received += 1
            if batch and ((item is None and idle_s < cfg.batch_max_age_s) or len(batch) >= cfg.flush_at
                          or time.time() - batch[0][4] >= cfg.batch_max_age_s):
                self._flush_until_done(batch)
                batch = []
            elif not batch and time.time() - self._last_status >= cfg.status_interval_s:
                self._publish_status(online=True)

    def _drain(self, batch: list) -> None:
        if self._drain_on_stop:  # written even when disconnected: durable now, redelivered and deduplicated later
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is not _STOP:
                    batch.append(more)
                    self._received += 1
            for i in range(0, len(batch), self.config.flush_at):
                self._flush_until_done(batch[i:i + self.config.flush_at], attempts=5)

    def _flush_until_done(self, batch: list, attempts: int | None = None) -> None:
        """Write the batch, retrying on storage errors; nothing is acked until it is written."""
        delay = 0.2
        tries = 0
        while True:
            try:
                self._flush(batch)
                self._oldest_pending = None
                return
            except OSError as exc:  # disk full, object store down: keep the batch, retry, never ack
                self._write_errors += 1
                tries += 1
                log.error("%s could not write a batch of %d to %s (try %d): %s", self.client_id, len(batch),
                          self.lake.uri, tries, exc)
                if (attempts is not None and tries >= attempts) or not self._drain_on_stop:
                    return  # left unacked: the broker redelivers after the next start
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _flush(self, batch: list) -> None:
        result = decode_batch(((t, p, r) for t, p, _m, _q, r, _g in batch), collector=self.client_id,
                              topics=self.topics, max_payload_bytes=self.config.max_payload_bytes,
                              deadletter_max_bytes=self.config.deadletter_max_bytes)
        self._batch_no += 1
        stamp = f"{int(time.time() * 1000):013d}-{self._batch_no:06d}-{uuid.uuid4().hex[:6]}"
        for table, day, rows in result.tables:
            path = self.lake.file(table, day, f"{self.client_id}-{stamp}.parquet")
            self.lake.write_table(rows, path)
            self._files += 1
        # Durable now.  Count it, tell the status topic, then acknowledge.
        self._telemetry += result.telemetry
        self._events += result.events
        self._predictions += result.predictions
        self._commands += result.commands
        self._by_reason.update(result.by_reason)
        self._batches += 1
        self._landed_at = time.time()
        self._publish_status(online=True)
        with self._gen_lock:  # a reconnect cannot slip in between the check and the acks
            if not self._connected:
                return
            gen = self._generation
            self._acked += ack_many(self._client, [(mid, qos) for _t, _p, mid, qos, _r, g in batch
                                                   if qos > 0 and g == gen])

    # ------------------------------------------------------------------ status
    def counters(self) -> dict[str, float]:
        oldest = self._oldest_pending
        lag = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        c = {
            "received": self._received, "landed": self._telemetry + self._events,
            "landed_telemetry": self._telemetry, "landed_events": self._events,
            "landed_predictions": self._predictions, "landed_commands": self._commands,
            "deadlettered": sum(self._by_reason.values()), "lag_s": round(lag, 3),
            "batches": self._batches, "files": self._files, "acked": self._acked,
            "write_errors": self._write_errors, "restarts": self.restarts, "landed_at": self._landed_at,
        }
        c.update({f"deadlettered.{k}": v for k, v in sorted(self._by_reason.items())})
        return c

    def status(self) -> dict:
        c = self.counters()
        return {
            "component": self.component, "client_id": self.client_id, "connected": self._client.is_connected(),
            "received": c["received"], "landed": c["landed"], "deadlettered": c["deadlettered"],
            "predictions": c["landed_predictions"], "commands": c["landed_commands"],
            "by_reason": dict(self._by_reason), "lag_s": c["lag_s"], "batches": c["batches"],
            "files": c["files"], "acked": c["acked"], "write_errors": c["write_errors"],
            "restarts": self.restarts, "landed_at": self._landed_at,
        }

    def _publish_status(self, online: bool) -> None:
        self._last_status = time.time()
        msg = contract.Status(component=self.component, online=online, ts=self._last_status,
                              counters={k: float(v) for k, v in self.counters().items()},
                              info={"client_id": self.client_id, "lake": self.lake.uri, "broker": self.url.redacted(),
                                    "host": socket.gethostname(), "pid": os.getpid()})
        self._client.publish(self.topics.status(self.component), contract.encode(msg), qos=1, retain=True)


def collector_metrics(status: dict) -> list:
    """A collector's :meth:`Collector.status` (wherever it runs: a thread, a Ray actor) under the
    public metric names (:mod:`flywheel.base.metrics`): messages in and landed, dead letters by
    reason, the lag of what waits to land."""
    from flywheel.base.metrics import Sample, by_reason

    name = status["component"]
    return [Sample("flywheel_up", float(bool(status["connected"])), {"component": name}),
            Sample("flywheel_events", float(status["received"]), {"component": name, "direction": "in"}),
            Sample("flywheel_events", float(status["landed"]), {"component": name, "direction": "out"}),
            Sample("flywheel_lag_seconds", float(status["lag_s"]), {"component": name}),
            *by_reason("flywheel_dead_letters", name, status["by_reason"])]
