"""Broker URLs and paho-mqtt client construction shared by every networked component.

``--broker`` takes ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...`` (TLS).  TLS
options ride in the query string: ``?ca=/path/ca.pem&cert=...&key=...&insecure=0``;
``?protocol=3.1.1`` selects MQTT 3.1.1 for brokers without MQTT 5 (the amqtt fallback:
no shared subscriptions there, so run one collector).
Passwords may be ``${ENV_VAR}`` references.  ``BrokerURL.redacted()`` is what may be
logged or recorded; the password never leaves this object otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flywheel.base.config import ConfigError, expand_env
from flywheel.base.errors import FlywheelError

log = logging.getLogger("flywheel.mqtt")

DEFAULT_URL = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    protocol: str = "5"

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        if isinstance(url, BrokerURL):
            return url
        parts = urlsplit(url.strip())
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"broker URL {redact_url(url)!r} must start with mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ConfigError(f"broker URL {redact_url(url)!r} has no host (example: mqtt://127.0.0.1:1883)")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {redact_url(url)!r} has an invalid port") from None
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(q) - {"ca", "cert", "key", "insecure", "protocol"}
        if unknown:
            raise ConfigError(f"broker URL has unknown options {sorted(unknown)}; "
                              "known: ca, cert, key, insecure, protocol")
        protocol = q.get("protocol", "5")
        if protocol not in ("5", "3.1.1"):
            raise ConfigError(f"broker URL protocol must be 5 or 3.1.1, got {protocol!r}")
        username = expand_env(unquote(parts.username)) if parts.username else None
        password = expand_env(unquote(parts.password)) if parts.password else None
        return cls(host=parts.hostname, port=port, tls=tls, username=username, password=password,
                   ca_file=q.get("ca"), cert_file=q.get("cert"), key_file=q.get("key"),
                   insecure=q.get("insecure", "0").lower() in ("1", "true", "yes"), protocol=protocol)

    def redacted(self) -> str:
        """The URL with the password replaced by ``***`` (safe for logs, MLflow, reports)."""
        auth = ""
        if self.username:
            auth = f"{self.username}:***@" if self.password else f"{self.username}@"
        query = "?protocol=3.1.1" if self.protocol != "5" else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}{query}"

    def resolved_url(self) -> str:
        """The URL with ``${ENV}`` references already resolved, password included.

        For handing the broker to components this process starts (Ray actors on other
        nodes may not have the variable); never log it: ``str()`` and ``redacted()`` are
        for messages.
        """
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        opts = {"ca": self.ca_file, "cert": self.cert_file, "key": self.key_file,
                "insecure": "1" if self.insecure else None, "protocol": None if self.protocol == "5" else self.protocol}
        query = urlencode({k: v for k, v in opts.items() if v is not None})
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.redacted()


def redact_url(url: str) -> str:
    """Any URL (broker, MLflow, object store) with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password:
        return url.replace(f":{password}@", ":***@", 1)
    return url


_counter = itertools.count()


def unique_client_id(prefix: str) -> str:
    """A client id no other process will pick (same id = the broker kicks the older client)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def _no_delay(client, userdata, sock) -> None:
    """Turn Nagle's algorithm off on the client's socket (paho's ``on_socket_open``).

    The stack's small messages often wait for an answer (the simulator's lockstep waits for
    a prediction, the bridge for its next window): with Nagle on, a small write that follows
    an unacknowledged one waits for the peer's delayed ACK, up to 40 ms on Linux.  Measured
    through Mosquitto (a stride's 38 QoS 1 messages out, a command and a prediction back):
    88 ms a round with Nagle on both sides, 48 ms with it off on one side, 5 ms with it off
    on the clients and the broker (``set_tcp_nodelay true``, :mod:`flywheel.base.broker`).
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):   # not a TCP socket (a Unix socket, a websocket wrapper)
        pass


#: Packets one wake-up of the network loop reads at most (see :class:`Client`).
READ_BURST = 100


class Client(paho.Client):
    """paho's client, reading every packet already on the socket per wake-up of its loop.

    paho's ``loop_read`` reads one packet per ``select()`` unless messages of its own are in
    flight, so a subscriber pays a ``select()`` and a pass through the loop for every message
    it receives.  Measured with ``benchmarks/bench_mqtt_receive.py`` (QoS 1, MQTT 5, 20,000
    queued messages): 62 us a message with paho's ``loop_read``, 45 us reading up to
    :data:`READ_BURST` packets a wake-up.  The cap bounds how long queued writes (acknowledgements,
    the bridge's orders) wait behind a flood: ~5 ms.  Nothing else differs from paho's client; a
    paho without the two internals this uses reads as paho does.
    """

    _burst = all(hasattr(paho.Client, name) for name in ("_packet_read", "_loop_rc_handle"))

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if not self._burst:
            return super().loop_read(max_packets)
        for _ in range(max(max_packets, READ_BURST)):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def make_client(url: BrokerURL | str, client_id: str | None = None, *, prefix: str = "flywheel",
                protocol: int | None = None, manual_ack: bool = False,
                max_inflight: int = 1000, max_queued: int = 0) -> paho.Client:
    """A paho client (callback API v2, :class:`Client`) with credentials and TLS from ``url``; not yet
    connected.  TLS files of the URL that do not read raise :class:`ConnectError` naming them."""
    url = BrokerURL.parse(url)
    if protocol is None:
        protocol = paho.MQTTv5 if url.protocol == "5" else paho.MQTTv311
    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id or unique_client_id(prefix),
                    protocol=protocol, manual_ack=manual_ack)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        try:
            ctx = ssl.create_default_context(cafile=url.ca_file)
            if url.cert_file:
                ctx.load_cert_chain(url.cert_file, url.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot use the TLS files of broker {url.redacted()}: {exc}; "
                               "check ?ca=, ?cert= and ?key= in the broker URL") from None
        if url.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        client.tls_set_context(ctx)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(max_queued)
    client.on_socket_open = _no_delay   # every (re)connect: see _no_delay
    return client


class ConnectError(FlywheelError, ConnectionError):
    """The broker refused or could not be reached; the message says which and why."""


def check_reachable(url: BrokerURL | str, timeout: float = 5.0,
                    fix: str = "start it (`flywheel broker` runs one) or check --broker") -> None:
    """Raise :class:`ConnectError` (:func:`connect`'s words, then what to do) unless the broker
    accepts this client: a command that starts Ray on this machine for clients of the broker
    checks it first, instead of after Ray's start-up (seconds, and its lines).

    First a TCP connection (nothing there: ``fix``), then a real MQTT CONNECT with the URL's user,
    password and TLS, ended at once with a clean DISCONNECT (a clean session: nothing stays on the
    broker), so that a wrong password, a certificate the client does not trust, or plain MQTT to
    a TLS port is said here too, in :func:`connect`'s words with their fix."""
    url = BrokerURL.parse(url)
    try:
        socket.create_connection((url.host, url.port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectError(f"cannot reach broker {url.redacted()}: {exc}; {fix}") from None
    client = make_client(url, prefix="flywheel-probe")
    try:
        connect(client, url, timeout=timeout)
    finally:
        client.disconnect()
        client.loop_stop()


class PublishTimeout(ConnectError):
    """QoS 1 messages the broker did not acknowledge in time (``pending`` of ``total``).

    Not a loss by itself: paho keeps them and sends them again after a reconnect, for as long as
    the process lives.  Whoever must not lose them keeps its own copy until they are acknowledged
    (the serving bridge keeps them in its outbox, :mod:`serve.bridge`)."""

    def __init__(self, pending: int, total: int, timeout: float):
        self.pending, self.total, self.timeout = pending, total, timeout
        super().__init__(f"the broker acknowledged {total - pending} of {total} messages in {timeout:g} s; "
                         f"the other {pending} wait for it (is the broker up and reachable?)")


def connect(client: paho.Client, url: BrokerURL | str, *, keepalive: int = 30, timeout: float = 10.0,
            clean_start: bool = True, session_expiry_s: int | None = None,
            receive_maximum: int | None = None) -> None:
    """Connect, start the network loop, and wait for CONNACK; raise ConnectError on refusal.

    ``receive_maximum`` (MQTT 5) caps the QoS 1/2 messages the broker sends before this
    client acknowledges them; a consumer that acks in batches sets it to fit its batches.
    """
    url = BrokerURL.parse(url)
    done = threading.Event()
    result: dict = {}
    prev = client.on_connect

    def on_connect(c, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()
        if prev is not None:
            prev(c, userdata, flags, reason_code, properties)

    prev_disconnect = client.on_disconnect

    def on_disconnect(c, userdata, flags, reason_code, properties):
        # Dropped before CONNACK (e.g. plain MQTT to a TLS port): fail now, not at the timeout.
        if "rc" not in result:  # a refusal's CONNACK came first: keep its reason
            result["rc"] = reason_code
            result["dropped"] = True
        done.set()
        if prev_disconnect is not None:
            prev_disconnect(c, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    props = None
    if client.protocol == paho.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry_s is not None:
            props.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
    if client.protocol != paho.MQTTv5:
        # MQTT 3.1.1 fixes the session flag at construction; mirror clean_start onto it.
        client._clean_session = clean_start
    try:
        if client.protocol == paho.MQTTv5:
            client.connect(url.host, url.port, keepalive=keepalive, clean_start=clean_start, properties=props)
        else:
            client.connect(url.host, url.port, keepalive=keepalive)
    except (OSError, ssl.SSLError) as exc:
        client.on_connect = prev
        client.on_disconnect = prev_disconnect
        fix = ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            fix = "; check ?ca= in the broker URL (the CA that signed the broker's certificate) and its host name"
        elif isinstance(exc, ssl.SSLError) or (url.tls and isinstance(exc, ConnectionResetError)):
            fix = "; check mqtt:// vs mqtts:// and the port"   # a TLS handshake with a plain listener
        else:   # nothing listens there, or no route to it
            fix = "; check that an MQTT broker runs there (`flywheel broker` starts one) and the broker URL"
        raise ConnectError(f"cannot reach broker {url.redacted()}: {exc}{fix}") from None
    client.loop_start()
    ok = done.wait(timeout)
    client.on_connect = prev
    client.on_disconnect = prev_disconnect
    if not ok:
        client.loop_stop()
        raise ConnectError(f"no answer from broker {url.redacted()} within {timeout:.0f}s; "
                           "check that an MQTT broker listens on that port")
    rc = result["rc"]
    if result.get("dropped"):
        client.loop_stop()
        raise ConnectError(f"broker {url.redacted()} closed the connection before accepting it ({rc}); "
                           "check mqtt:// vs mqtts:// and the port")
    if getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc != 0):
        client.loop_stop()
        # MQTT 5 "Not authorized" (135) / "Bad user name or password" (134); MQTT 3.1.1's 4 and 5
        value = getattr(rc, "value", rc)
        fix = "; check the user and password in the broker URL" if value in (4, 5, 134, 135) else ""
        raise ConnectError(f"broker {url.redacted()} refused the connection: {rc}{fix}")


class Subscriptions:
    """Subscribe on every (re)connect, and know when the broker confirmed it.

    paho reconnects a dropped connection by itself, but a clean session comes back without
    its subscriptions: a client that subscribed once, after its first connect, goes deaf after
    a broker restart.  Made before :func:`connect`; :meth:`wait` after it returns once the
    broker's SUBACK came, and raises :class:`ConnectError` when the broker refused a filter or
    did not answer.  ``on_connect(client)`` runs after each successful (re)connect, e.g. to
    publish an online state again::

        subs = Subscriptions(client, [("factory/+/+/command", 1)])
        connect(client, url)
        subs.wait(url, "the gateway")
    """

    def __init__(self, client: paho.Client, filters: list[tuple[str, int]],
                 on_connect: Callable[[paho.Client], None] | None = None):
        self.filters = list(filters)
        self.refused: str | None = None
        self.connects = 0
        self._mid: int | None = None
        self._acked = threading.Event()
        prev_connect, prev_subscribe = client.on_connect, client.on_subscribe

        def _on_connect(c, userdata, flags, reason_code, properties):
            if prev_connect is not None:
                prev_connect(c, userdata, flags, reason_code, properties)
            if getattr(reason_code, "is_failure", False):
                return
            self.connects += 1
            self._acked.clear()
            _, self._mid = c.subscribe(self.filters)   # the SUBACK comes on this same network thread
            if on_connect is not None:
                on_connect(c)

        def _on_subscribe(c, userdata, mid, reason_codes, properties):
            if mid != self._mid:
                if prev_subscribe is not None:
                    prev_subscribe(c, userdata, mid, reason_codes, properties)
                return
            refused = [f"{f} ({rc})" for (f, _q), rc in zip(self.filters, reason_codes)
                       if getattr(rc, "is_failure", False)]
            self.refused = ", ".join(refused) or None
            if refused and self.connects > 1:   # a first connect's refusal is raised by wait()
                log.error("the broker refused the subscriptions %s after a reconnect", self.refused)
            self._acked.set()

        client.on_connect = _on_connect
        client.on_subscribe = _on_subscribe

    @property
    def active(self) -> bool:
        """The broker confirmed this connection's subscriptions and refused none."""
        return self._acked.is_set() and self.refused is None

    def wait(self, url: BrokerURL | str, who: str, timeout: float = 10.0) -> None:
        where = f"broker {BrokerURL.parse(url).redacted()}"
        if not self._acked.wait(timeout):
            raise ConnectError(f"{where} did not confirm the subscriptions of {who} within {timeout:.0f} s; "
                               "check that it is up and not overloaded, then start again")
        if self.refused:
            raise ConnectError(f"{where} refused the subscriptions of {who}: {self.refused}; give this user "
                               "read (subscribe) access to those topics in the broker's ACL")


#: What paho's ``publish()`` answers for a QoS 1 or 2 message it could not write: the connection
#: was down (``NO_CONN``) or broke during the write (``CONN_LOST``).  paho keeps such a message and
#: sends it again after its next CONNACK (with the DUP flag where it had gone out), but the
#: returned ``MQTTMessageInfo`` keeps the error, so ``is_published()`` and ``wait_for_publish()``
#: raise ``RuntimeError`` even once the broker has acknowledged it.
REQUEUED = (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST)


def publish(client: paho.Client, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
    """``client.publish`` for a client that reconnects: a QoS 1 or 2 message paho kept for after the
    reconnect (:data:`REQUEUED`) gets a clean ``MQTTMessageInfo``, so waiting on it waits for
    its PUBACK instead of failing at once while the message is still on its way."""
    info = client.publish(topic, payload, qos=qos, retain=retain)
    if qos > 0 and info.rc in REQUEUED:
        info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
    return info


def end_session(client: paho.Client) -> Properties | None:
    """DISCONNECT properties that end the client's MQTT 5 session at once (session expiry 0), so
    the broker keeps neither its subscriptions nor messages for it; None over MQTT 3.1.1.

        client.disconnect(properties=end_session(client))
    """
    if client.protocol != paho.MQTTv5:
        return None
    props = Properties(PacketTypes.DISCONNECT)
    props.SessionExpiryInterval = 0
    return props


def drop_session(url: BrokerURL | str, client_id: str, timeout: float = 10.0) -> None:
    """End whatever session the broker keeps for ``client_id`` (and the subscriptions and queued
    messages in it): connect with a clean start and no expiry, then disconnect.

    A client that wants a new session which still outlives a broker restart needs this first:
    Mosquitto 2.0 saves only sessions that did not ask for a clean start."""
    client = make_client(url, client_id)
    connect(client, url, clean_start=True, session_expiry_s=0, timeout=timeout)
    client.disconnect()
    client.loop_stop()


def wait_published(infos, timeout: float = 30.0) -> None:
    """Block until every MQTTMessageInfo in ``infos`` was acknowledged (QoS 1) or sent, for at most
    ``timeout`` seconds in all; raises :class:`PublishTimeout` (how many are still waiting) when
    some were not by then, :class:`ConnectError` when paho refused one outright."""
    infos = list(infos)
    for info in infos:
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectError(f"publish failed: {paho.error_string(info.rc)}")
    deadline = time.monotonic() + timeout
    for info in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        info.wait_for_publish(left)
    pending = sum(not info.is_published() for info in infos)
    if pending:
        raise PublishTimeout(pending, len(infos), timeout)


def publish_retained(url: BrokerURL | str, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    """Publish one retained QoS 1 message over MQTT 5 and wait for its PUBACK; a broker that
    refuses it (an ACL: "not authorized") raises :class:`ConnectError` naming the user to use."""
    publish_once(url, topic, payload, timeout=timeout, retain=True)


def publish_once(url: BrokerURL | str, topic: str, payload: bytes, timeout: float = 10.0, retain: bool = False) -> None:
    """Publish one QoS 1 message over MQTT 5 and wait for its PUBACK; a broker that refuses it
    (an ACL: "not authorized") raises :class:`ConnectError` naming the user to use."""
    url = BrokerURL.parse(url)
    client = make_client(url, protocol=paho.MQTTv5, prefix="flywheel-control")
    acked = threading.Event()
    result: dict = {}

    def on_publish(c, userdata, mid, reason_code, properties):
        result["rc"] = reason_code
        acked.set()

    client.on_publish = on_publish
    connect(client, url, timeout=timeout)
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if not acked.wait(timeout):
            raise ConnectError(f"broker {url.redacted()} did not acknowledge {topic} within {timeout:.0f}s")
        rc = result.get("rc")
        if getattr(rc, "is_failure", False):
            raise ConnectError(f"broker {url.redacted()} refused {topic} ({rc}); connect as a user the ACL lets "
                               f"write it (the operator identity: mqtts://operator:...@host)")
    finally:
        client.disconnect()
        client.loop_stop()


_PUBACK = struct.Struct("!BBH")


def ack_many(client: paho.Client, acks: list[tuple[int, int]]) -> int:
    """Acknowledge many manually-acked messages, ``acks`` as ``(mid, qos)``; returns how many.

    ``Client.ack`` queues one 4-byte PUBACK packet per message and wakes the network
    thread for each; after a batch of thousands that is thousands of wake-ups and socket
    writes competing for the GIL with the thread reading the next messages (measured:
    ~12 % of a single collector's time under a flood).  This queues the same PUBACK bytes
    (MQTT 3.1.1 and 5: type, length 2, packet id; "success" needs no reason code) as one
    write, through the packet queue ``Client.ack`` itself uses.  QoS 2 messages, and any
    paho without that queue, go through ``Client.ack`` one by one.
    """
    qos1 = [mid for mid, qos in acks if qos == 1]
    queue_packet = getattr(client, "_packet_queue", None)
    if qos1 and queue_packet is not None and getattr(client, "_manual_ack", False):
        packet = b"".join(_PUBACK.pack(paho.PUBACK, 2, mid) for mid in qos1)
        queue_packet(paho.PUBACK, packet, 0, 0)
    else:
        for mid in qos1:
            client.ack(mid, 1)
    for mid, qos in acks:
        if qos == 2:
            client.ack(mid, 2)
    return sum(1 for _mid, qos in acks if qos > 0)
