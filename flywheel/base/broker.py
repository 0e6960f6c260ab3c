"""The embedded MQTT broker: Mosquitto as a child process, or amqtt when Mosquitto is absent.

``flywheel broker`` runs one in the foreground and prints its URL; ``flywheel demo`` and
the tests start one with :class:`EmbeddedBroker`.  The Mosquitto config written here is
the one the stack needs to lose nothing: persistence on (so a restart keeps queued QoS 1
messages and persistent sessions), and per-client queue limits raised well above the
default 1000 messages, which otherwise drops QoS 1 messages to a slow subscriber under a
flood.  Production brokers: see ``infra/mosquitto/``.

The in-Python broker (amqtt, for a laptop without Mosquitto: ``pip install`` is all it
needs) is run with the settings the stack relies on, checked by ``tests/flywheel/test_broker.py``:
QoS 1, persistent sessions that queue QoS 1 messages while a client is away, retained
messages, wills.  What it lacks, and what the stack does instead (:data:`AMQTT_LIMITS`,
logged once at start-up):

* MQTT 3.1.1 only: the URL carries ``?protocol=3.1.1`` so every client speaks it.  No
  shared subscriptions, so ingest runs one collector (``collectors>1`` is refused with a
  ConfigError naming the fix), and no will delay or session expiry.
* Sessions, queued messages and retained messages live in memory: a restart of the
  broker (``EmbeddedBroker.restart()``) loses them.  A campaign resumed after a crash
  starts a new broker and replays the dead attempt's period, so it should not need them
  (the resume tests run on Mosquitto only).
* A QoS 1 message the client has not acknowledged within 5 s is not redelivered later
  (amqtt gives up on it); the collectors acknowledge each batch within about a second.
* No in-flight limit: collectors need not flush at every short pause of the stream
  (:attr:`EmbeddedBroker.collector_idle_flush_s`).

Which implementation: ``prefer`` (``flywheel broker --impl``, ``flywheel demo|run|turn
--embedded-broker``), else the environment variable ``FLYWHEEL_EMBEDDED_BROKER``, else
``auto`` (Mosquitto when installed, on PATH or at Debian's /usr/sbin/mosquitto).

Run it::

    flywheel broker --port 1884           # prints mqtt://127.0.0.1:1884, Ctrl-C stops it
    flywheel broker --impl amqtt          # the in-Python broker even where Mosquitto is installed
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from flywheel.base.errors import FlywheelError

#: Queue limits per client.  A collector that falls behind for a while must not lose
#: QoS 1 messages; memory is the cost (~1 KB a message), bounded by max_queued_bytes.
MAX_QUEUED_MESSAGES = 2_000_000
MAX_QUEUED_BYTES = 1_000_000_000
MAX_INFLIGHT = 1000
#: how many ports a broker that picks its own port tries before it gives up
PICKS = 3


class BrokerError(FlywheelError, RuntimeError):
    """The broker could not be started; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def port_bindable(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (as Mosquitto binds: with SO_REUSEADDR).

    False also where nothing listens there but a socket holds the port: another process's
    bound socket, or a client connection that the kernel gave it as its ephemeral port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class _PortTaken(BrokerError):
    """The broker's port was taken; where the broker picked the port itself, it picks another."""


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def mosquitto_config(port: int, data_dir: Path, host: str = "127.0.0.1", persistence: bool = True,
                     extra: str = "") -> str:
    import pwd

    lines = [
        "# Written by flywheel.base.broker for the embedded broker.",
        # Run as the invoking user: as root, Mosquitto would otherwise switch to the
        # `mosquitto` user, which cannot write the persistence file into our data dir.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"listener {port} {host}",
        "allow_anonymous true",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT}",
        "max_keepalive 600",
        # Nagle's algorithm off on client sockets: a prediction or a command is one small packet
        # that someone waits for; with Nagle it can sit out the receiver's delayed ACK (~40 ms).
        "set_tcp_nodelay true",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {data_dir}/",
        "autosave_interval 1",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    return "\n".join(lines) + "\n" + extra


#: Implementations ``prefer`` / ``--impl`` / ``--embedded-broker`` / FLYWHEEL_EMBEDDED_BROKER accept.
IMPLS = ("auto", "mosquitto", "amqtt")
ENV_IMPL = "FLYWHEEL_EMBEDDED_BROKER"

#: One line for logs and the live view when the in-Python broker runs: what it lacks.
#: It fits a terminal line; the module docstring and the README say more.
AMQTT_LIMITS = "in-Python MQTT broker (amqtt): MQTT 3.1.1 only, one ingest collector, sessions in memory"


def default_impl() -> str:
    """The implementation asked for by FLYWHEEL_EMBEDDED_BROKER (``auto`` when unset)."""
    value = os.environ.get(ENV_IMPL, "").strip().lower() or "auto"
    if value not in IMPLS:
        raise BrokerError(f"{ENV_IMPL}={value!r}: must be one of {', '.join(IMPLS)}")
    return value


def amqtt_config(host: str, port: int) -> dict:
    """The amqtt broker config: one listener, one plugin (:class:`_OpenAuth`), nothing else.

    amqtt's default plugin set (loaded from entry points by its legacy ``auth`` section)
    marks every client of an anonymous listener ``is_anonymous``, and amqtt neither queues
    messages for an offline anonymous session nor keeps it: persistent sessions silently
    do not work.  It also runs a packet logger, an event logger, a $SYS publisher and two
    topic checkers, each an asyncio task per packet or message (measured: a QoS 1 stream to
    two subscribers cost ~30 % more broker CPU).  Naming the plugins replaces all of that.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {f"{__name__}._OpenAuth": {}},
    }


def _amqtt_classes():  # pragma: no cover - runs in the broker's child process
    """Build the amqtt plugin and broker subclass (amqtt is imported only in that process)."""
    from amqtt.broker import Broker
    from amqtt.plugins.base import BaseAuthPlugin

    class _OpenAuth(BaseAuthPlugin):
        """Accept every client without marking it anonymous (so its persistent session is kept)."""

        async def authenticate(self, *, session) -> bool:
            return True

    class _Broker(Broker):
        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            # amqtt 0.12 calls this on every connect for every filter any client subscribed,
            # so a client got retained messages for topics it never subscribed to.  Only a
            # filter this session holds may deliver retained messages to it.
            if any(s is session for s, _qos in self._subscriptions.get(subscription[0], ())):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return _OpenAuth, _Broker


def _die_with(parent: int) -> None:  # pragma: no cover - runs in the broker's child process
    """SIGTERM this process when ``parent`` dies (Linux), as the Mosquitto child gets it."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


def _run_amqtt(host: str, port: int, ready=None, parent: int | None = None) -> None:  # pragma: no cover
    import asyncio
    import logging

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if parent is not None:
        _die_with(parent)

    global _OpenAuth
    _OpenAuth, broker_cls = _amqtt_classes()  # found by amqtt under this module's name
    # amqtt logs every refused or probing connection as a warning; errors still show.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.WARNING)  # amqtt's session state machine

    async def main():
        broker = broker_cls(amqtt_config(host, port))
        await broker.start()
        if ready is not None:
            ready.set()
        while True:
            await asyncio.sleep(3600)

    try:  # uvloop (Linux, macOS; Ray Serve installs it with uvicorn[standard]): ~25 % less broker CPU
        import uvloop
    except ImportError:  # Windows
        asyncio.run(main())
    else:
        uvloop.run(main())


class EmbeddedBroker:
    """A broker for one laptop: Mosquitto child process if installed, else amqtt in a process.

    Use as a context manager; ``url`` is ready once ``start()`` returns.  ``restart()``
    stops and starts it on the same port and data directory (persistence survives).
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", data_dir: str | os.PathLike | None = None,
                 prefer: str | None = None, persistence: bool = True, extra_config: str = ""):
        if prefer is None:
            prefer = default_impl()
        if prefer not in IMPLS:
            raise BrokerError(f"broker implementation must be auto, mosquitto or amqtt, got {prefer!r}")
        self.host = host
        self.port = port or free_port(host)
        # A port picked here may be taken before the broker binds it (the kernel hands it to some
        # client as its ephemeral port, or another process picks it too): start() then picks again.
        self._picked = not port
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flywheel-broker-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.persistence = persistence
        self.extra_config = extra_config
        binary = mosquitto_path()
        if prefer == "mosquitto" and not binary:
            raise BrokerError("mosquitto is not on PATH; install it (Debian: apt-get install -y mosquitto) "
                              "or use the in-Python broker (--impl amqtt)")
        self.impl = "mosquitto" if binary and prefer != "amqtt" else "amqtt"
        self._binary = binary
        self._proc: subprocess.Popen | mp.Process | None = None
        self._log = None
        self._ready = None

    @property
    def notice(self) -> str | None:
        """What this broker lacks that the stack would otherwise use (one line), or None."""
        return AMQTT_LIMITS if self.impl == "amqtt" else None

    @property
    def collector_idle_flush_s(self) -> float | None:
        """``IngestConfig.idle_flush_s`` for collectors on this broker; None: their default.

        Over MQTT 3.1.1 a collector flushes after 0.05 s without a message, because a 3.1.1
        broker may stop sending at its in-flight limit until a batch is acked.  amqtt has no
        such limit, and at 0.05 s a lockstep period (bursts between short waits for the
        model) was flushed at nearly every wait: the tiny campaign's turn 1 wrote 286 batches
        instead of 42, the lake held 589 Parquet files instead of 102, and its final dataset
        build took 111 s instead of 23 s.  0.25 s, as over MQTT 5: 62 batches, 138 files, 26 s.
        """
        return 0.25 if self.impl == "amqtt" else None

    @property
    def url(self) -> str:
        # amqtt speaks MQTT 3.1.1 only; the query tells our clients to do the same.
        suffix = "?protocol=3.1.1" if self.impl == "amqtt" else ""
        return f"mqtt://{self.host}:{self.port}{suffix}"

    def start(self, timeout: float | None = None) -> "EmbeddedBroker":
        for attempt in range(1, PICKS + 1):
            try:
                self._start(timeout)
            except _PortTaken as exc:
                if not self._picked:
                    raise
                if attempt == PICKS:    # no --port to change here: the demo's and the tests' brokers pick their own
                    raise BrokerError(f"{exc.args[0].split(';')[0]}, as were the {PICKS - 1} ports picked before it "
                                      "(another process is taking ports fast); try again, or start a broker with "
                                      "`flywheel broker --port N` and pass --broker") from None
                self.port = free_port(self.host)
                continue
            self._picked = False          # a restart keeps the port its clients know
            return self
        raise AssertionError("unreachable")

    def _start(self, timeout: float | None) -> None:
        if port_open(self.host, self.port) or not port_bindable(self.host, self.port):
            raise _PortTaken(f"port {self.port} on {self.host} is already in use; pick another with --port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_from = 0
        if self.impl == "mosquitto":
            conf = self.data_dir / "mosquitto.conf"
            conf.write_text(mosquitto_config(self.port, self.data_dir, self.host, self.persistence,
                                             self.extra_config))
            self._log = open(self.data_dir / "mosquitto.log", "ab")
            log_from = self._log.tell()           # what this start writes, for the error below
            from flywheel.base.rayinit import die_with_parent  # SIGTERM if this process dies (Linux)

            self._proc = subprocess.Popen([self._binary, "-c", str(conf)], stdout=self._log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent())
        else:
            ctx = mp.get_context("spawn")
            self._ready = ctx.Event()
            # Die with this process (the signal follows the forking thread: only from the main one).
            parent = os.getpid() if threading.current_thread() is threading.main_thread() else None
            self._proc = ctx.Process(target=_run_amqtt, args=(self.host, self.port, self._ready, parent),
                                     daemon=True, name="flywheel-amqtt")
            self._proc.start()
        if timeout is None:  # a fresh interpreter importing amqtt takes seconds on a busy laptop
            timeout = 10.0 if self.impl == "mosquitto" else 60.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready is not None:   # amqtt says when it listens (a probe would log a warning there)
                if self._ready.wait(0.05):
                    return
            elif port_open(self.host, self.port):
                return
            if not self.alive():
                break
            time.sleep(0.05)
        detail = ""
        if self.impl == "mosquitto" and (self.data_dir / "mosquitto.log").exists():
            with open(self.data_dir / "mosquitto.log", "rb") as f:
                f.seek(log_from)
                detail = f.read().decode(errors="replace")[-500:]
        self.stop()
        # its one listener's bind refused (the listeners of an extra config have ports of their own)
        if "Address already in use" in detail and "listener" not in self.extra_config:
            raise _PortTaken(f"port {self.port} on {self.host} is already in use; pick another with --port")
        raise BrokerError(f"{self.impl} did not start listening on {self.host}:{self.port}. {detail}".strip())

    def alive(self) -> bool:
        if self._proc is None:
            return False
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll() is None
        return self._proc.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: Mosquitto saves its persistence file on the way out
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        else:
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self._log:
            self._log.close()
            self._log = None
        deadline = time.monotonic() + 5
        while port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if isinstance(self._proc, subprocess.Popen) and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def restart(self) -> None:
        """Stop and start on the same port; Mosquitto keeps sessions and queues, amqtt does not."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def run_foreground(port: int | None, host: str, impl: str | None, data_dir: str | None, print_fn=print) -> int:
    """``flywheel broker``: run until Ctrl-C / SIGTERM, printing the URL."""
    broker = EmbeddedBroker(port=port, host=host, data_dir=data_dir, prefer=impl)
    stop = {"flag": False}

    def handler(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, handler)
    # Also SIGINT explicitly: a process started in the background by a non-interactive shell
    # inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, handler)
    broker.start()
    print_fn(f"{broker.impl} broker listening at {broker.url}  (data in {broker.data_dir}; Ctrl-C stops)")
    if broker.notice:
        print_fn(broker.notice)
    try:
        while not stop["flag"]:
            if not broker.alive():
                print_fn("broker process exited unexpectedly")
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        broker.close()
        print_fn("broker stopped")
    return 0
