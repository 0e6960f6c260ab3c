"""The MQTT bridge: plant telemetry in, predictions and maintenance commands out.

It subscribes (QoS 1) to every machine's telemetry and events, builds per-machine
rolling windows with :class:`flywheel.base.features.WindowBuilder` (the same code the
dataset builder uses), asks the serve app for predictions in batches (all windows that
are ready), and for each window publishes

1. a ``maintain`` Command when the policy says so (:mod:`serve.policy`), carrying the
   model version, the window's risk and the threshold it reached, then
2. its Prediction (``model_version``, ``window_end_seq``),

both QoS 1 on one client, in that order: the simulator's lockstep mode waits for the
prediction of every window and relies on the command arriving first.

A batch is sent as soon as it is complete: every machine the bridge knows has sent
telemetry at or after the newest pending window's end, or is down (a failure or
maintenance event, or silent; :mod:`serve.policy`), so no further window for that moment
can come.  Otherwise it goes once no telemetry arrived for ``flush_idle_ms`` (a machine
that stopped reporting) or when ``max_pending`` windows wait.  In the simulator's lockstep
every stride's batch is complete when the last machine's reading arrives: the plant, which
waits for these predictions, never waits out the idle timer.

The model carries its input pipeline: at start the bridge reads, from the app's
``/version``, the window config and the featuriser the served version was trained with,
windows the telemetry with that config and sends each window's raw readings, which the
app featurises with that version's featuriser.  So a bridge started with no window
settings of its own feeds the model exactly its training input.  A version that records
no window config needs ``BridgeConfig.window``; a configured window that differs from
the one the version records, or a featuriser this release does not know, is refused
(:class:`BridgeError`).  When a hot swap brings a version trained on another window
config, the bridge re-reads it and starts its windows afresh.

**Restarts lose nothing.**  The bridge connects under a stable client id (``BridgeConfig.client_id``,
default ``flywheel-bridge-{topic root}``) with a persistent session (MQTT 5 ``clean_start=False`` and
``session_expiry_s``; MQTT 3.1.1 ``clean_session=False``) and QoS 1 subscriptions, so the broker queues
what arrives while it is away.  It acknowledges a message only once it answered the windows that
message completes and, with ``state_dir``, wrote its state file (:mod:`serve.bridge_state`): a bridge
killed at any moment restarts from that state, the broker redelivers everything after it, and every
window that arrived meanwhile gets its prediction and the decision an uninterrupted bridge would take.
Outputs are at least once: a window answered just before a kill may be answered again, with the same
``command_id`` (consumers drop a command id they already applied; the simulator does).
``start(fresh=True)`` drops the session and the state instead (a campaign's period starts afresh).

Telemetry that fails the contract is counted by reason and skipped.  Counters are
published retained on ``{root}/_status/serve-bridge``; the will marks it offline.

The orders pass the policy's guardrails (:mod:`serve.policy`: orders per line per plant hour,
machines down at once per line, the off switch); refusals are counted by reason
(``suppressed_<reason>``).  The off switch is a retained :class:`~flywheel.base.contract.Control`
on ``{root}/_control/serve-bridge`` (``flywheel serve pause|resume``; under the broker's ACL only
the operator identity may write it): while paused, predictions still flow, no order is sent.

A shadow (``BridgeConfig.shadow_adapter``, e.g. the ``shadow`` adapter that ``serve.shadow=challenger``
serves): the bridge asks that adapter for the same windows too, once per batch and without retries,
and publishes its Predictions (``role`` shadow) on ``{root}/{line}/{machine}/prediction/shadow``
before the champion's.  A shadow's risk never reaches the policy: it commands nothing, proposes
nothing, and a failed shadow call (``shadow_errors``) costs the champion one try, no retry.  A shadow
the app does not serve, or one trained on another window config than the champion's, is not asked
(``shadow_refused`` counts its windows): its input would not be its training input.

A canary (``BridgeConfig.canary_adapter`` with ``canary_machines``, e.g. the ``canary`` adapter that
``serve.canary_share`` serves): the windows of those machines go to that adapter instead of the
champion, and its risk drives the policy for them: its orders carry its version, and its Predictions
(``role`` canary) go on the usual ``{root}/{line}/{machine}/prediction`` topic, so the plant still
gets one prediction per window.  The other machines are the champion's.  A canary the app does not
serve, or one trained on another window config, is not asked: the champion answers its machines
(``canary_fallback`` counts those windows), as it does for a batch the canary failed to answer
after the usual retries: the champion takes the machines back rather than leave them unanswered.

``BridgeConfig.mode`` decides what an order does: ``auto`` sends it; ``approve`` proposes it
(the Command, on ``{root}/_review/serve-bridge``) and sends it only when an Approval with its
``command_id`` arrives on ``{root}/_approve/serve-bridge`` within ``proposal_ttl_s`` plant seconds
of its window (``flywheel serve approve COMMAND_ID``); ``dry_run`` only counts it
(``would_order``): the plant runs as without the model while the model's record builds up.

    b = Bridge("mqtt://127.0.0.1:1883", "http://127.0.0.1:8000", BridgeConfig(threshold=0.5))
    b.start(); b.window; ...; print(b.stats()); b.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque

import msgspec
import paho.mqtt.client as paho

from flywheel.base import contract
from flywheel.base.errors import FlywheelError
from flywheel.base.features import FeaturiserError, Window, WindowBuilder, WindowConfig, get_featuriser
from flywheel.base.mqtt import (ConnectError, PublishTimeout, Subscriptions, ack_many, connect, drop_session,
                                end_session, make_client, publish, wait_published)
from serve import bridge_state
from serve.client import ServeClient, ServeHTTPError
from serve.config import BridgeConfig
from serve.policy import MaintenancePolicy

log = logging.getLogger(__name__)

#: The session expiry of a fresh bridge (a campaign period's): long enough to ride out a broker
#: restart (a plant stops after ``broker_timeout_s`` = 300 s without its broker), short enough
#: that a killed period's session does not queue telemetry for a day.
FRESH_SESSION_EXPIRY_S = 300

#: How often the bridge warns while the broker has not acknowledged what it sent (its outbox).
SEND_WARN_S = 30.0


class BridgeError(FlywheelError, RuntimeError):
    """The served model cannot be fed safely (unknown featuriser, no or another window config)."""


class Bridge:
    def __init__(self, broker_url: str, serve_url: str, config: BridgeConfig | None = None,
                 topic_root: str = "factory", resolve_url=None, api_token: str | None = None):
        """``resolve_url``: where the app answers now (``ServingHandle.current_url``), asked when
        ``serve_url`` stops answering, e.g. a replica restarted on another port under direct ingress.
        ``api_token``: the app's ``serve.api_token`` (None: ``$FLYWHEEL_API_TOKEN`` if set)."""
        self.config = config or BridgeConfig()
        self.broker_url = broker_url
        self.topics = contract.Topics(topic_root)
        self.serve = ServeClient(serve_url, timeout_s=self.config.http_timeout_s, resolve=resolve_url, token=api_token)
        self.policy = MaintenancePolicy(self.config)
        self._builders: dict[tuple[str, str], WindowBuilder] = {}
        self._pending: list[Window] = []
        self._pending_end_ts = float("-inf")   # newest end among the pending windows
        self._complete = False                 # no other window can join the pending ones
        self._seen_ts: dict[tuple[str, str], float] = {}   # machine -> newest telemetry time
        self._cond = threading.Condition()
        self._last_arrival = 0.0
        self._stop = threading.Event()
        self._period_session = False
        self._counts: Counter = Counter()
        self._decode_errors: Counter = Counter()
        self._recent: deque[Window] = deque(maxlen=4096)
        self._proposals: dict[str, contract.Command] = {}   # approve mode: command_id -> the proposed order
        self.model_version: str | None = None
        self.shadow_version: str | None = None   # the version the shadow adapter answered with last
        self.window: WindowConfig | None = None   # the served version's, read at start()
        self.featuriser: str | None = None
        self._client = None
        self._threads: list[threading.Thread] = []
        self._synced_version: str | None = None
        root = topic_root.replace("/", "-")
        self.client_id = self.config.client_id or f"flywheel-bridge-{root}"
        self._state_dirty = False                 # decisions taken since the last state write
        self._outbox: list[tuple[str, bytes]] = []   # decided, not yet confirmed sent
        self._outbox_kept = False   # stopping with an unacknowledged outbox: decide nothing more (_send)
        self._last_checkpoint = 0.0
        self._acks: list[tuple[int, int]] = []   # (mid, qos) of messages handled, not yet acknowledged
        self._state_path = (bridge_state.state_path(self.config.state_dir, self.client_id)
                            if self.config.state_dir else None)
        self.restored_from: str | None = None    # the state file this bridge resumed from
        self._shadow_ok = False   # the shadow adapter serves and windows as the champion does (_sync_model)
        self._canary_ok = False   # the canary adapter serves and windows as the champion does (_sync_model)
        self.canary_version: str | None = None   # the version the canary adapter answered with last
        self._canary = frozenset(self.config.canary_machines)

    # ------------------------------------------------------------------ lifecycle
    def start(self, fresh: bool = False) -> "Bridge":
        """Connect and subscribe; resume the session and the state file unless ``fresh``."""
        cfg = self.config
        self._sync_model(self.serve.version())   # before subscribing: no telemetry without a window config
        if self._state_path is not None:         # before connecting: the session's backlog flows at once
            if fresh:
                self._state_path.unlink(missing_ok=True)
            else:
                self._restore()
        self._client = make_client(self.broker_url, self.client_id, manual_ack=True)
        self._client.will_set(self.topics.status(cfg.component), self._status_payload(online=False), qos=1,
                              retain=True)
        self._client.on_message = self._on_message
        # (Re)subscribed on every connect (a clean session forgets subscriptions), then said online.
        subs = Subscriptions(self._client, [(self.topics.pattern("telemetry"), 1), (self.topics.pattern("event"), 1),
                                            (self.topics.control(cfg.component), 1)]
                             + ([(self.topics.approve(cfg.component), 1)] if cfg.mode == "approve" else []),
                             on_connect=self._online)
        # receive_maximum: the broker may send up to this many QoS 1 messages we have not acknowledged
        # yet (we acknowledge after answering them); Mosquitto's own default would be 20.
        # fresh: the previous session is dropped, and a new one starts that outlives a broker restart
        # mid-period (the telemetry published before the bridge is back waits in it: Mosquitto saves
        # only sessions that did not ask for a clean start, hence the drop first); stop() ends it.
        # MQTT 3.1.1 (the in-Python broker, which keeps nothing across its own restart) starts clean.
        self._period_session = fresh and self._client.protocol == paho.MQTTv5
        if self._period_session:
            drop_session(self.broker_url, self.client_id)
        connect(self._client, self.broker_url, clean_start=fresh and not self._period_session,
                session_expiry_s=FRESH_SESSION_EXPIRY_S if fresh else cfg.session_expiry_s, receive_maximum=65535)
        # Return only once the broker confirmed the subscriptions: telemetry published after
        # start() returns is then guaranteed to reach the bridge.
        try:
            subs.wait(self.broker_url, "the bridge", timeout=10.0)
        except ConnectError:
            self._client.loop_stop()
            raise
        if self._outbox:   # decided before the restart, maybe not sent: send again (same ids)
            self._counts["resent"] += len(self._outbox)
            if self._send(self._outbox):
                with self._cond:
                    self._outbox = []
                    self._state_dirty = True
        for target, name in ((self._work, "bridge-worker"), (self._report, "bridge-status")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Send what is pending, publish the offline status, disconnect."""
        deadline = time.monotonic() + drain_timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=drain_timeout_s)
        if self._client is not None:
            try:
                info = self._client.publish(self.topics.status(self.config.component),
                                            self._status_payload(online=False), qos=1, retain=True)
                wait_published([info], timeout=5)
            except Exception as exc:  # noqa: BLE001 - the broker may already be gone
                log.debug("offline status not published: %s", exc)
            # the session stays on the broker (a restart resumes it), unless it was a period's: that
            # one ends with its bridge
            self._client.disconnect(properties=end_session(self._client) if self._period_session else None)
            self._client.loop_stop()
        self.serve.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ restarts
    def _restore(self) -> None:
        st = bridge_state.read_state(self._state_path, self.window)
        if st is None:
            return
        with self._cond:
            self._builders, self._seen_ts = st.builders, st.seen_ts
            self._pending = st.pending
            if st.pending:
                self._pending_end_ts = max(w.end_ts for w in st.pending)
            self._proposals = st.proposals
            self._outbox = st.outbox
            self._counts.update({k: v for k, v in st.counts.items() if isinstance(v, int)})
            self._counts["restarts"] += 1
        self.policy.restore(st.policy)
        self.restored_from = str(self._state_path)
        log.warning("bridge %s resumed from %s: %d machines, %d windows pending", self.client_id,
                    self._state_path, len(st.builders), len(st.pending))

    def _checkpoint(self) -> None:
        """Write the state (with a state_dir), then acknowledge the messages it covers.  Runs on the
        worker thread between batches: no window is then half decided."""
        with self._cond:
            acks, self._acks = self._acks, []
            data = None
            if self._state_path is not None and (acks or self._state_dirty):
                data = bridge_state.encode_state(
                    client_id=self.client_id, window=self.window, builders=self._builders, seen_ts=self._seen_ts,
                    pending=self._pending, policy=self.policy.state(), proposals=dict(self._proposals),
                    counts=dict(self._counts), outbox=list(self._outbox))
            self._state_dirty = False
        self._last_checkpoint = time.monotonic()
        if data is not None:
            bridge_state.write_atomic(self._state_path, data)
            self._counts["state_writes"] += 1
        if acks:
            ack_many(self._client, acks)

    # ------------------------------------------------------------------ the model's input pipeline
    def _sync_model(self, info: dict) -> None:
        """Take the window config and featuriser of the version the app serves (``/version``)."""
        name = self.config.adapter or "default"
        adapter = (info.get("adapters") or {}).get(name) or {}
        version = adapter.get("version") or info.get("version")
        what = f"{info.get('model_name', 'the model')} v{version}"
        spec = adapter.get("featuriser")
        try:
            feat = get_featuriser(spec or "text-summary/1")
        except FeaturiserError as exc:
            raise BridgeError(f"{what}: {exc}") from None
        recorded = adapter.get("window")
        window = WindowConfig.from_dict(recorded) if recorded is not None else None
        configured = self.config.window
        if window is None and configured is None:
            raise BridgeError(f"{what} records no window config (trained before models carried one); set "
                              "bridge.window.length, bridge.window.stride_s and bridge.window.horizon_s to the "
                              "window it was trained on, or serve a version trained since")
        if window is not None and configured is not None and window != configured:
            raise BridgeError(f"bridge.window {configured.to_dict()} differs from the window {what} was trained "
                              f"on {window.to_dict()}: its input would not be its training input; drop "
                              "bridge.window (the bridge reads it from the model)")
        shadow_name = self.config.shadow_adapter
        shadow = (info.get("adapters") or {}).get(shadow_name) or {} if shadow_name else {}
        canary_name = self.config.canary_adapter
        canary = (info.get("adapters") or {}).get(canary_name) or {} if canary_name else {}
        others = {n: a.get("window") for n, a in (info.get("adapters") or {}).items()
                  if n not in (name, shadow_name, canary_name) and a.get("window") is not None}
        clash = {n: w for n, w in others.items() if WindowConfig.from_dict(w) != (window or configured)}
        if clash:
            raise BridgeError(f"the app's adapters were trained on different window configs ({name}: "
                              f"{(window or configured).to_dict()}, " + ", ".join(f"{n}: {w}" for n, w in clash.items())
                              + "); one bridge windows telemetry one way: serve adapters of one window config")
        window = window or configured
        shadow_window = shadow.get("window")
        self._shadow_ok = bool(shadow) and (shadow_window is None or WindowConfig.from_dict(shadow_window) == window)
        if shadow_name and not shadow:
            log.warning("the app serves no adapter %r: no shadow predictions", shadow_name)
        elif shadow and not self._shadow_ok:
            log.error("the shadow adapter %r v%s was trained on window %s, the champion on %s: the shadow is not "
                      "asked (its input would not be its training input)", shadow_name, shadow.get("version"),
                      shadow_window, window.to_dict())
        canary_window = canary.get("window")
        self._canary_ok = bool(canary) and (canary_window is None or WindowConfig.from_dict(canary_window) == window)
        if canary_name and not canary:
            log.warning("the app serves no adapter %r: the champion answers the canary machines", canary_name)
        elif canary and not self._canary_ok:
            log.error("the canary adapter %r v%s was trained on window %s, the champion on %s: the champion "
                      "answers the canary machines", canary_name, canary.get("version"), canary_window,
                      window.to_dict())
        with self._cond:
            if self.window is not None and window != self.window:
                log.warning("%s was trained on window %s (was %s): starting the windows afresh", what,
                            window.to_dict(), self.window.to_dict())
                self._builders.clear()
                self._counts["window_changes"] += 1
            self.window, self.featuriser = window, feat.spec.ref
            self._synced_version = str(version)

    # ------------------------------------------------------------------ MQTT in
    def _online(self, client) -> None:
        """After every (re)connect, once the subscriptions are sent (the broker handles one
        connection's packets in order): whoever waits for the bridge's online status to publish
        telemetry finds it subscribed, on a fresh session too."""
        client.publish(self.topics.status(self.config.component), self._status_payload(online=True), qos=1,
                       retain=True)

    def _on_message(self, client, userdata, msg):
        try:
            self._handle(msg.topic, msg.payload)
        except Exception:  # noqa: BLE001 - one bad message must never stop the MQTT thread
            self._counts["internal_errors"] += 1
            log.exception("bridge failed on a message from %s", msg.topic)
        finally:
            if msg.qos > 0:   # acknowledged at the next checkpoint, once the state includes it
                with self._cond:
                    self._acks.append((msg.mid, msg.qos))

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.control(self.config.component):
            self._control(payload)
            return
        if topic == self.topics.approve(self.config.component):
            self._approve(payload)
            return
        try:
            m = contract.decode(topic, payload, topics=self.topics)
        except contract.ContractError as exc:
            self._decode_errors[exc.reason] += 1
            if sum(self._decode_errors.values()) <= 20:   # the first few, then only counted
                log.warning("skipped a message on %s: %s", topic, exc)
            return
        if isinstance(m, contract.MachineEvent):
            self._counts["events"] += 1
            self.policy.on_event(m)
            with self._cond:   # a machine that went down will send no window: the batch may be complete now
                if self._pending and not self._complete and self._batch_complete():
                    self._complete = True
                    self._cond.notify()
            return
        self._counts["telemetry"] += 1
        self.policy.on_telemetry(m)
        key = (m.line, m.machine)
        with self._cond:   # the push and its window join the pending ones together (a checkpoint sees both or neither)
            wb = self._builders.get(key)
            if wb is None:
                wb = self._builders[key] = WindowBuilder(self.window)
            w = wb.push(m)
            self._last_arrival = time.monotonic()
            if m.ts > self._seen_ts.get(key, float("-inf")):
                self._seen_ts[key] = m.ts
            if w is not None:
                self._counts["windows"] += 1
                self._recent.append(w)
                self._pending.append(w)
                if w.end_ts > self._pending_end_ts:
                    self._pending_end_ts = w.end_ts
                    self._complete = False
                self._cond.notify()
            if self._pending and not self._complete and self._batch_complete():
                self._complete = True
                self._cond.notify()

    def _control(self, payload: bytes) -> None:
        """The off switch (a retained Control from the operator)."""
        if not payload:        # a cleared retained message: back to the configured state
            self.policy.set_paused(self.config.paused)
            return
        try:
            c = contract.decode_control(payload)
        except contract.ContractError as exc:
            self._decode_errors[exc.reason] += 1
            log.error("ignored a control message: %s", exc)
            return
        self._counts["control_messages"] += 1
        self.policy.set_paused(c.paused)
        log.warning("%s by %s%s: %s", "PAUSED" if c.paused else "resumed", c.by or "an operator",
                    f" ({c.reason})" if c.reason else "",
                    "no maintenance order is sent" if c.paused else "orders flow again")

    def _approve(self, payload: bytes) -> None:
        """An operator approved a proposal: send it to the plant (approve mode)."""
        try:
            a = contract.decode_approval(payload)
        except contract.ContractError as exc:
            self._decode_errors[exc.reason] += 1
            log.error("ignored an approval: %s", exc)
            return
        with self._cond:
            cmd = self._proposals.pop(a.command_id, None)
        if cmd is None:
            self._counts["approvals_unknown"] += 1
            log.warning("approval by %s for %r: no such proposal (never made, already sent or expired)",
                        a.by or "an operator", a.command_id)
            return
        if self.policy.plant_now_ts - (cmd.ts or 0.0) > self.config.proposal_ttl_s:
            self._counts["approvals_expired"] += 1
            log.warning("approval by %s for %s came %.0f plant s after its window (> proposal_ttl_s %g): not sent",
                        a.by or "an operator", a.command_id, self.policy.plant_now_ts - (cmd.ts or 0.0),
                        self.config.proposal_ttl_s)
            return
        approved = msgspec.structs.replace(cmd, reason=f"{cmd.reason}; approved by {a.by or 'an operator'}")
        self._client.publish(self.topics.command(cmd.line, cmd.machine), contract.encode(approved), qos=1)
        self._counts["commands"] += 1
        self._counts["approved"] += 1
        log.info("approved by %s: %s on %s", a.by or "an operator", cmd.command_id, cmd.machine)

    def _batch_complete(self) -> bool:
        """Whether every known machine is past the newest pending window's end or down (cond held)."""
        end = self._pending_end_ts
        seen = self._seen_ts
        for key in self._builders:
            if seen.get(key, float("-inf")) < end and self.policy.down_reason(*key) is None:
                return False
        return True

    # ------------------------------------------------------------------ model + MQTT out
    def _work(self) -> None:
        cfg = self.config
        idle_s = cfg.flush_idle_ms / 1000
        while (not self._stop.is_set() or self._pending) and not self._outbox_kept:
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    # No window for a while (events, partial windows): write the state and acknowledge
                    # what it holds once a second, so the session's unacknowledged messages stay few.
                    if self._acks and time.monotonic() - self._last_checkpoint >= 1.0:
                        break
                    self._cond.wait(0.5)
                # Wait for a complete batch, a quiet moment or a full batch (see the module docstring).
                while self._pending and len(self._pending) < cfg.max_pending and not self._complete \
                        and not self._stop.is_set():
                    quiet = time.monotonic() - self._last_arrival
                    if quiet >= idle_s:
                        break
                    self._cond.wait(idle_s - quiet)
                batch = self._pending[:cfg.max_pending]
                del self._pending[:cfg.max_pending]
                if not self._pending:
                    self._complete = False
                    self._pending_end_ts = float("-inf")
            if batch:
                try:
                    self._process(batch)
                except Exception:  # noqa: BLE001 - keep the worker alive
                    self._counts["internal_errors"] += 1
                    log.exception("bridge failed on a batch of %d windows", len(batch))
            try:
                self._checkpoint()
            except Exception:  # noqa: BLE001 - unacknowledged messages come back after a restart: nothing lost
                self._counts["internal_errors"] += 1
                log.exception("bridge could not write its state %s", self._state_path)
                self._stop.wait(1.0)

    def _predict(self, batch: list[Window], adapter: str | None = None, count_drops: bool = True) -> dict | None:
        """The answers of ``adapter`` (None: the configured one, the champion) for ``batch``, with
        retries; None when it refuses them or never answers (``count_drops``: the windows are lost)."""
        cfg = self.config
        for attempt in range(cfg.max_retries):
            try:
                t0 = time.perf_counter()
                try:
                    # raw readings: the app featurises them with the serving version's own featuriser
                    return self.serve.predict([{"kind": w.kind, "readings": [dict(r) for r in w.readings]}
                                               for w in batch], adapter=adapter or cfg.adapter)
                finally:
                    self._counts["serve_s"] += time.perf_counter() - t0
            except ServeHTTPError as exc:
                self._counts["serve_errors"] += 1
                if 400 <= exc.status < 500:   # the model refuses these windows: retrying cannot help
                    log.error("serve refused %d windows: %s", len(batch), exc)
                    return None
                log.warning("serve call failed (attempt %d/%d): %s", attempt + 1, cfg.max_retries, exc)
                if self._stop.wait(cfg.retry_s) and attempt >= 1:
                    break
        if not count_drops:
            return None
        self._counts["windows_dropped"] += len(batch)
        log.error("dropped %d windows: the serve app at %s did not answer", len(batch), self.serve.url)
        return None

    def _shadow_predict(self, batch: list[Window]) -> list[tuple[str, bytes]]:
        """The shadow's predictions of ``batch``, as (topic, payload) to send (one try: the champion's
        orders never wait on a retry)."""
        name = self.config.shadow_adapter
        if not name:
            return []
        if not self._shadow_ok:
            self._counts["shadow_refused"] += len(batch)
            return []
        try:
            out = self.serve.predict([{"kind": w.kind, "readings": [dict(r) for r in w.readings]} for w in batch],
                                     adapter=name)
        except ServeHTTPError as exc:
            self._counts["shadow_errors"] += 1
            if self._counts["shadow_errors"] <= 5:
                log.warning("the shadow adapter %r did not answer for %d windows: %s", name, len(batch), exc)
            return []
        messages = []
        for w, p in zip(batch, out["predictions"]):
            pred = contract.Prediction(ts=w.end_ts, line=w.line, machine=w.machine, model_version=p["model_version"],
                                       probs=p["probs"], window_end_seq=w.end_seq, role="shadow")
            messages.append((self.topics.prediction(w.line, w.machine, "shadow"), contract.encode(pred)))
            self._counts["shadow_predictions"] += 1
            self.shadow_version = p["model_version"]
        return messages

    def _answer(self, batch: list[Window]) -> list[tuple[Window, dict, str]] | None:
        """Each window of ``batch`` with the prediction that decides it and its role: the canary's for
        the canary machines (when it serves and answers), the champion's for the rest; None when the
        champion did not answer (those windows are dropped, counted)."""
        canary: list[Window] = []
        if self._canary:
            canary = [w for w in batch if w.machine in self._canary]
            if canary and not self._canary_ok:
                self._counts["canary_fallback"] += len(canary)
                canary = []
        out: list[tuple[Window, dict, str]] = []
        if canary:
            got = self._predict(canary, adapter=self.config.canary_adapter, count_drops=False)
            if got is None:   # the champion takes these machines back for this batch
                self._counts["canary_errors"] += 1
                self._counts["canary_fallback"] += len(canary)
                canary = []
            else:
                out += [(w, p, "canary") for w, p in zip(canary, got["predictions"])]
                self._counts["canary_predictions"] += len(canary)
                if got["predictions"]:
                    self.canary_version = got["predictions"][-1]["model_version"]
        taken = {id(w) for w in canary}
        rest = [w for w in batch if id(w) not in taken]
        if rest:
            champ = self._predict(rest)
            if champ is None:
                return out or None
            self._sync_if_swapped(champ)
            out += [(w, p, "champion") for w, p in zip(rest, champ["predictions"])]
        order = {id(w): i for i, w in enumerate(batch)}   # decide in arrival order, as without a canary
        return sorted(out, key=lambda a: order[id(a[0])])

    def _sync_if_swapped(self, out: dict) -> None:
        """A hot swap brought another champion version: re-read its window config and featuriser."""
        name = self.config.adapter or "default"
        served = next((p["model_version"] for p in out["predictions"] if p.get("adapter", name) == name), None)
        if served is not None and served != self._synced_version:   # a hot swap: windowed otherwise?
            try:
                self._sync_model(self.serve.version())
            except BridgeError as exc:
                self._counts["model_refused"] += 1
                log.error("bridge cannot feed the model now serving: %s", exc)

    def _process(self, batch: list[Window]) -> None:
        answers = self._answer(batch)
        if answers is None:
            return
        self._counts["batches"] += 1
        # the shadow's predictions first: sent before the champion's, which the plant waits for
        outbox: list[tuple[str, bytes]] = self._shadow_predict(batch)
        for w, p, role in answers:
            version = p["model_version"]
            if role == "champion":
                self.model_version = version
            threshold = self.config.threshold
            if role == "canary" and self.config.canary_threshold is not None:
                threshold = self.config.canary_threshold
            decision = self.policy.decide(w.line, w.machine, w.end_ts, p["risk"], threshold)
            if decision.command:
                cmd = contract.Command(command_id=f"maintain-{w.line}-{w.machine}-{w.end_seq}", line=w.line,
                                       machine=w.machine, command="maintain", model_version=version,
                                       reason=f"{decision.reason} (top {p['label']} {p['probs'][p['label']]:.3f})",
                                       ts=w.end_ts, risk=min(1.0, max(0.0, float(p["risk"]))),
                                       threshold=float(threshold))
                mode = self.config.mode
                if mode == "auto":
                    outbox.append((self.topics.command(w.line, w.machine), contract.encode(cmd)))
                    self._counts["commands"] += 1
                elif mode == "approve":
                    with self._cond:
                        self._proposals[cmd.command_id] = cmd
                    outbox.append((self.topics.review(self.config.component), contract.encode(cmd)))
                    self._counts["proposed"] += 1
                else:   # dry_run: what it would have ordered, for the record
                    self._counts["would_order"] += 1
            elif decision.reason != "below_threshold":
                self._counts[f"suppressed_{decision.reason}"] += 1
            pred = contract.Prediction(ts=w.end_ts, line=w.line, machine=w.machine, model_version=version,
                                       probs=p["probs"], window_end_seq=w.end_seq, role=role)
            outbox.append((self.topics.prediction(w.line, w.machine, role), contract.encode(pred)))
            self._counts["predictions"] += 1
        # The decisions reach the state file before they leave (an outbox): a bridge killed while sending
        # sends the same messages again after its restart instead of deciding these windows anew.
        with self._cond:
            self._outbox = outbox
            self._state_dirty = True
        self._checkpoint()
        if self._send(outbox):
            with self._cond:
                self._outbox = []
                self._state_dirty = True   # the next state write drops the sent outbox

    def _send(self, outbox: list[tuple[str, bytes]]) -> bool:
        """Publish ``outbox`` and wait until the broker acknowledged all of it: True then; False when
        the bridge stops first, and the outbox stays in the state file for the next start to send.

        During a broker restart paho keeps the messages and sends them once it is back; the wait
        lasts as long as the broker is away (the bridge's input waits on the same broker), with a
        warning every :data:`SEND_WARN_S`.  It never gives up while the bridge runs: a decision
        dropped from the outbox unacknowledged would be lost with the process, its telemetry being
        acknowledged already."""
        infos = [publish(self._client, topic, payload, qos=1) for topic, payload in outbox]
        waited = 0.0
        while True:
            try:
                wait_published(infos, timeout=1.0)
                return True
            except PublishTimeout as exc:
                waited += 1.0
                if self._stop.is_set():
                    log.warning("bridge %s stops with %d of %d messages unacknowledged: they stay in %s and are "
                                "sent at its next start", self.client_id, exc.pending, exc.total,
                                self._state_path or "its outbox (no state_dir: lost with this process)")
                    self._outbox_kept = True   # the pending windows stay in the state file too
                    return False
                if waited >= SEND_WARN_S:
                    waited = 0.0
                    log.warning("bridge %s: %s; its orders and predictions wait in its outbox until it does",
                                self.client_id, exc)

    # ------------------------------------------------------------------ status
    def stats(self) -> dict:
        s = {k: self._counts.get(k, 0) for k in ("telemetry", "events", "windows", "predictions", "commands",
                                                 "batches", "serve_errors", "windows_dropped", "internal_errors",
                                                 "suppressed_down", "suppressed_cooldown", "suppressed_paused",
                                                 "suppressed_line_order_cap", "suppressed_line_down_cap",
                                                 "control_messages", "proposed", "approved", "approvals_unknown",
                                                 "approvals_expired", "would_order", "window_changes",
                                                 "model_refused", "shadow_predictions", "shadow_errors",
                                                 "shadow_refused", "canary_predictions", "canary_errors",
                                                 "canary_fallback", "resent")}
        # wall seconds in calls to the serve app (champion and canary; the shadow's go beside them)
        s["serve_s"] = round(float(self._counts.get("serve_s", 0.0)), 3)
        # decided and published, not yet acknowledged by the broker (they stay in the state file meanwhile)
        s["outbox"] = len(self._outbox)
        s["proposals_pending"] = len(self._proposals)
        s["paused"] = int(self.policy.paused)
        s["decode_errors"] = dict(self._decode_errors)
        s["pending"] = len(self._pending)
        s["model_version"] = self.model_version
        s["shadow_version"] = self.shadow_version
        s["canary_version"] = self.canary_version
        s["canary_machines"] = len(self._canary)
        s["machines"] = len(self._builders)
        s["window"] = self.window.to_dict() if self.window is not None else None
        s["featuriser"] = self.featuriser
        s["down"] = self.policy.snapshot()["down"]
        return s

    def recent_windows(self) -> list[Window]:
        """The last windows built (newest last), for inspection and the training/serving skew test."""
        with self._cond:
            return list(self._recent)

    def _status_payload(self, online: bool) -> bytes:
        s = self.stats()
        counters = {k: float(v) for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        counters.update({f"decode_errors.{r}": float(n) for r, n in s["decode_errors"].items()})
        info = {"serve_url": self.serve.url, "model_version": s["model_version"], "down": s["down"],
                "mode": self.config.mode, "paused": bool(s["paused"]),
                "window": s["window"], "featuriser": s["featuriser"]}
        return contract.encode(contract.Status(component=self.config.component, online=online, ts=time.time(),
                                               counters=counters, info=info))

    def _report(self) -> None:
        while not self._stop.wait(self.config.status_interval_s):
            try:
                self._client.publish(self.topics.status(self.config.component), self._status_payload(True),
                                     qos=1, retain=True)
            except Exception as exc:  # noqa: BLE001 - status is best effort; the bridge goes on
                log.debug("status not published: %s", exc)


def bridge_metrics(bridge: "Bridge") -> list:
    """The bridge's counters under the public metric names (:mod:`flywheel.base.metrics`): messages
    in, predictions and orders by outcome, orders held back by reason, decode errors, its outbox, the
    version its model answers with."""
    from flywheel.base.metrics import Sample, by_reason

    s = bridge.stats()
    c = bridge.config.component
    client = getattr(bridge, "_client", None)
    try:
        version = float(s["model_version"]) if s["model_version"] is not None else 0.0
    except (TypeError, ValueError):
        version = 0.0
    out = [Sample("flywheel_up", float(client is not None and client.is_connected()), {"component": c}),
           Sample("flywheel_events", float(s["telemetry"] + s["events"]), {"component": c, "direction": "in"}),
           Sample("flywheel_outbox", float(s["outbox"]), {"component": c}),
           Sample("flywheel_model_version_served", version, {"component": c})]
    out += [Sample("flywheel_predictions", float(s[k]), {"component": c, "outcome": o})
            for k, o in (("predictions", "scored"), ("serve_errors", "error"), ("windows_dropped", "dropped"),
                         ("shadow_predictions", "shadow"), ("shadow_errors", "shadow_error"),
                         ("canary_predictions", "canary"), ("canary_errors", "canary_error"),
                         ("canary_fallback", "canary_fallback"))]
    out += [Sample("flywheel_commands", float(s[k]), {"component": c, "outcome": o})
            for k, o in (("commands", "sent"), ("proposed", "proposed"), ("approved", "approved"),
                         ("would_order", "would_order"))]
    out += by_reason("flywheel_refused_commands", c, {k.removeprefix("suppressed_"): v for k, v in s.items()
                                                      if k.startswith("suppressed_")})
    out += by_reason("flywheel_dead_letters", c, s["decode_errors"])
    return out
