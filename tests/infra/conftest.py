"""Fixtures for the infra tests: a real Mosquitto running the PRODUCTION config.

``secured_broker`` reads infra/mosquitto/mosquitto.conf and infra/mosquitto/acl, rewrites only
the paths and ports (the container paths /mosquitto/... become a temp dir, 1883/8883 become free
loopback ports), makes the password file with infra/mosquitto/make-passwd.sh and the TLS files
with infra/mosquitto/make_certs.py, and starts Mosquitto on it.  Anything else in the production
files (anonymous access, ACL rules, TLS settings, queue limits) is exactly what the tests run.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MOSQUITTO_DIR = INFRA / "mosquitto"
USERS = ("sim", "ingest", "serve", "operator", "campaign")


def adapt_mosquitto_config(text: str, *, plain_port: int, tls_port: int, root: Path) -> str:
    """The production config with container paths and ports swapped for test ones.

    Fails loudly when a line it must rewrite is missing, so the test never runs a config
    that silently differs from the production file.
    """
    swaps = [
        ("listener 1883 127.0.0.1\n", f"listener {plain_port} 127.0.0.1\n"),
        ("listener 8883\n", f"listener {tls_port} 127.0.0.1\n"),
        ("/mosquitto/config/", f"{root}/config/"),
        ("/mosquitto/secrets/", f"{root}/secrets/"),
        ("/mosquitto/data/", f"{root}/data/"),
        ("/mosquitto/certs/", f"{root}/certs/"),
    ]
    for old, new in swaps:
        if old not in text:
            raise AssertionError(f"infra/mosquitto/mosquitto.conf no longer contains {old!r}; "
                                 "update adapt_mosquitto_config with the new layout")
        text = text.replace(old, new)
    return text


def run_make_passwd(out: Path, passwords: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    env.update({f"MQTT_{u.upper()}_PASSWORD": pw for u, pw in passwords.items()})
    return subprocess.run(["sh", str(MOSQUITTO_DIR / "make-passwd.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=30)


def run_make_certs(out: Path, *hosts: str) -> None:
    subprocess.run([sys.executable, str(MOSQUITTO_DIR / "make_certs.py"), "--out", str(out),
                    *[a for h in hosts for a in ("--host", h)]], check=True, capture_output=True, timeout=60)


@dataclass
class SecuredBroker:
    root: Path
    plain_port: int
    tls_port: int
    passwords: dict[str, str]
    proc: subprocess.Popen | None = None
    log_path: Path = field(default=None)

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.pem"

    def url(self, user: str | None = None, password: str | None = None, *, tls: bool = False) -> str:
        auth = ""
        if user:
            auth = f"{user}:{self.passwords[user] if password is None else password}@"
        if tls:
            return f"mqtts://{auth}localhost:{self.tls_port}?ca={self.ca}"
        return f"mqtt://{auth}127.0.0.1:{self.plain_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _hand_to_broker_user(root: Path) -> None:
    """Mosquitto started as root drops to the 'mosquitto' user before it reads the password
    file, ACL and certificates; give it the files, as the container image does."""
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        return  # no such user: Mosquitto stays root and can read everything
    for dirpath, _dirs, files in os.walk(root):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)


def start_secured_broker(root: Path, passwords: dict[str, str] | None = None) -> SecuredBroker:
    from flywheel.base.broker import free_port, mosquitto_path, port_open

    binary = mosquitto_path()
    if binary is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto and mosquitto_passwd are needed: run the tests with ./dev.sh test "
                    "(installs them as root) or apt-get install -y mosquitto")
    passwords = passwords or {u: secrets.token_urlsafe(12) for u in USERS}
    for sub in ("config", "secrets", "data", "certs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    res = run_make_passwd(root / "secrets" / "passwd", passwords)
    assert res.returncode == 0, res.stderr
    shutil.copy(MOSQUITTO_DIR / "acl", root / "config" / "acl")
    run_make_certs(root / "certs", "localhost", "127.0.0.1")
    plain_port, tls_port = free_port(), free_port()
    while tls_port == plain_port:
        tls_port = free_port()
    conf = adapt_mosquitto_config((MOSQUITTO_DIR / "mosquitto.conf").read_text(),
                                  plain_port=plain_port, tls_port=tls_port, root=root)
    (root / "config" / "mosquitto.conf").write_text(conf)
    _hand_to_broker_user(root)
    b = SecuredBroker(root, plain_port, tls_port, passwords, log_path=root / "mosquitto.log")
    with open(b.log_path, "wb") as log:
        b.proc = subprocess.Popen([binary, "-c", str(root / "config" / "mosquitto.conf")], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", plain_port) and port_open("127.0.0.1", tls_port):
            return b
        if b.proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_broker(b)
    pytest.fail(f"Mosquitto with infra/mosquitto/mosquitto.conf did not start:\n{b.log()[-2000:]}")


def stop_broker(b: SecuredBroker) -> None:
    if b.proc is not None and b.proc.poll() is None:
        b.proc.terminate()
        try:
            b.proc.wait(10)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            b.proc.wait()


MLFLOW_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _mlflow_credentials_put_back():
    """Clear MLflow's credential variables, and afterwards put them back as they were.

    ``flywheel.base.tracking.plain_uri`` writes a URI's user and password into ``os.environ``.
    pytest's monkeypatch only undoes what it set itself, so a test that lets plain_uri run
    would leave them behind, and every Ray worker started later inherits them (and, since
    set variables win over a URI's credentials, logs in to the next server with them).
    Request it before ``monkeypatch``: teardown runs in reverse, so this puts things back last.
    """
    saved = {k: os.environ.pop(k) for k in MLFLOW_CREDENTIAL_VARS if k in os.environ}
    try:
        yield
    finally:
        for k in MLFLOW_CREDENTIAL_VARS:
            os.environ.pop(k, None)
        os.environ.update(saved)


@pytest.fixture
def no_mlflow_credentials():
    yield from _mlflow_credentials_put_back()


@pytest.fixture(scope="module")
def no_mlflow_credentials_module():
    yield from _mlflow_credentials_put_back()


@pytest.fixture
def broker_root():
    """A private dir directly under the system temp dir: pytest's own tmp dirs sit below a
    0700 directory that Mosquitto, once it dropped to its own user, could not enter."""
    root = Path(tempfile.mkdtemp(prefix="flywheel-infra-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def secured_broker():
    """Mosquitto on the production config, ACL and TLS listener (module-scoped)."""
    root = Path(tempfile.mkdtemp(prefix="flywheel-infra-"))
    b = start_secured_broker(root)
    yield b
    stop_broker(b)
    shutil.rmtree(root, ignore_errors=True)


class Inbox:
    """A connected client collecting what it receives, with SUBACK/PUBACK results."""

    def __init__(self, url: str, prefix: str):
        from flywheel.base.mqtt import connect, make_client

        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client = make_client(url, prefix=prefix)
        self.client.on_message = self._on_message
        self._suback: dict[int, list] = {}
        self._puback: dict[int, object] = {}
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        connect(self.client, url)

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._suback[mid] = list(reason_codes)
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._puback[mid] = reason_code
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0):
        """Subscribe and return the broker's reason code for it (SUBACK)."""
        _rc, mid = self.client.subscribe(topic, qos=qos)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._suback, timeout), f"no SUBACK for {topic}"
            return self._suback[mid][0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 5.0):
        """Publish and return the PUBACK reason code (QoS 1) once the broker answered."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._puback, timeout), f"no PUBACK for {topic}"
            return self._puback[info.mid]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _p, _r in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def inbox_factory():
    made: list[Inbox] = []

    def make(url: str, prefix: str = "infra-test") -> Inbox:
        box = Inbox(url, prefix)
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()


@pytest.fixture
def make_certs():
    """Run infra/mosquitto/make_certs.py: ``make_certs(out_dir, *hosts)``."""
    return run_make_certs


def _load_servers():
    """tests/infra/servers.py, loaded by path (tests/ is not a package under importlib mode)."""
    import importlib.util

    name = "flywheel_infra_test_servers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("servers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def infra_servers():
    return _load_servers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used a ``RayCluster`` (``test_ray_cluster.py``'s ``cluster``) carries the
    cluster's report in its failure: its nodes' processes and the ends of their logs, which go
    with the cluster's temp dir when the module ends."""
    outcome = yield
    rep = outcome.get_result()
    rc = getattr(item, "funcargs", {}).get("cluster")
    if rep.failed and hasattr(rc, "report"):
        try:
            rep.sections.append(("the Ray cluster's nodes and logs", rc.report()))
        except Exception as exc:  # noqa: BLE001 - a report must never hide the failure itself
            rep.sections.append(("the Ray cluster's nodes and logs", f"no report: {exc!r}"))
