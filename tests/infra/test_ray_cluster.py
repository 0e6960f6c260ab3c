"""The flywheel's CLI against a real multi-process Ray cluster (``--ray-address``).

A head (``ray start --head``) and a worker node (``ray start --address``) run as separate
processes on this machine (``raycluster.RayCluster``); ingest, training (Ray Train, 2
workers) and serving run as ``flywheel`` subprocesses connected to it, exactly as an
operator would run them against a remote cluster.  The pytest process never joins this
cluster (the session's own local Ray stays untouched); it asks the cluster questions
through short-lived client subprocesses.

    python -m pytest tests/infra/test_ray_cluster.py -q
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load(name: str, path: Path):
    """A helper module beside the tests, loaded by path (tests/ is not a package under importlib mode)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rc_mod = _load("flywheel_infra_test_raycluster", HERE / "raycluster.py")
pytestmark = [pytest.mark.slow, pytest.mark.serial]  # a head and a worker node of its own


@pytest.fixture(scope="module")
def cluster():
    from serve.handle import DIRECT_INGRESS_ENV

    # Ray Serve's direct ingress on every node, as infra/README.md says for serve.ingress=direct;
    # the proxy keeps working beside it (the serve test uses both).
    with rc_mod.RayCluster(num_cpus=2, workers=1, extra_env=DIRECT_INGRESS_ENV) as rc:
        yield rc


def flywheel(rc, *args: str, timeout_s: float = 400.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(rc_mod.BIN / "flywheel"), *args], cwd=REPO, env=rc.env(), capture_output=True,
                          text=True, timeout=timeout_s)


class Background:
    """A ``flywheel`` command running in the background; its output goes to a file we can poll."""

    def __init__(self, rc, log: Path, *args: str):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([str(rc_mod.BIN / "flywheel"), *args], cwd=REPO, env=rc.env(),
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} from {self.proc.args[1]} (exit {self.proc.poll()}):\n"
                                     + self.output()[-4000:])
            time.sleep(0.5)

    def interrupt(self, timeout_s: float = 120.0) -> int:
        """Ctrl-C, as an operator stops it; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_cluster_has_a_head_and_a_separate_worker_node(cluster):
    nodes = [n for n in cluster.nodes() if n["alive"]]
    assert len(nodes) == 2 and sum(n["head"] for n in nodes) == 1
    assert all(n["cpus"] == 2 for n in nodes)
    # what a failed test of this module carries (tests/infra/conftest.py): both nodes' processes, alive
    # (a start that failed and was tried again is in it too, as exited: its log says why)
    report = cluster.report()
    latest = {name: p for name, p, _ in cluster.procs}
    assert sorted(latest) == ["head", "worker0"], report
    for name, p in latest.items():
        assert f"== {name} (`ray start`, pid {p.pid}): running;" in report, report


def test_ingest_lands_published_telemetry_in_the_lake(cluster, broker, tmp_path):
    import pyarrow.parquet as pq

    from flywheel.base.mqtt import connect, make_client

    plantgen = _load("flywheel_ingest_plantgen", REPO / "tests" / "ingest" / "ingest_plantgen.py")
    from flywheel.base import contract

    uid = f"rc{uuid.uuid4().hex[:8]}"
    machines = [("l1", "m1", "milling"), ("l1", "p1", "pump")]
    telemetry = [m for m in plantgen.stream(machines, plantgen.day_start(), 3 * 3600)
                 if isinstance(m, contract.Telemetry)][:300]
    items = plantgen.encoded(telemetry, uid)
    assert len(items) == 300

    ing = Background(cluster, tmp_path / "ingest.log", "ingest", "--ray-address", cluster.address,
                     "--broker", broker.url, "--workdir", str(tmp_path), "--topic-root", uid,
                     f"client_prefix={uid}", "batch_max_age_s=0.5")
    try:
        ing.wait_for(r"ingesting .* Ctrl-C stops", timeout_s=180)
        collectors = cluster.actors("CollectorActor")
        assert [a["state"] for a in collectors] == ["ALIVE"], collectors  # the collector runs on the cluster

        pub = make_client(broker.url, prefix=f"{uid}-pub")
        connect(pub, broker.url)
        try:
            infos = [pub.publish(t, p, qos=1) for t, p in items]
            for info in infos:
                info.wait_for_publish(60)
            assert all(i.is_published() for i in infos)
        finally:
            pub.disconnect()
            pub.loop_stop()

        want = {m.event_id for m in telemetry}
        lake = tmp_path / "lake" / "raw" / "telemetry"
        deadline = time.monotonic() + 120
        got: set = set()
        while got != want and time.monotonic() < deadline:
            time.sleep(1.0)
            files = [f for f in lake.rglob("*.parquet") if not f.name.startswith((".", "_"))]
            got = {e for f in files for e in pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()}
        assert got == want, f"{len(got)} of {len(want)} published readings in the lake:\n{ing.output()[-3000:]}"

        assert ing.interrupt() == 0, ing.output()[-3000:]
        assert "stopped: 300 landed, 0 dead-lettered" in ing.output()
    finally:
        ing.kill()


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """``flywheel train`` with 2 Ray Train workers on the cluster: (workdir, mlflow uri, completed process)."""
    from finetune.synthetic import write_snapshot

    work = tmp_path_factory.mktemp("rc-train")
    snap = write_snapshot(work / "lake" / "datasets" / "ds-rc", n_train=120, n_eval=40, seed=3)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = flywheel(cluster, "train", "--dataset", snap.name, "--workdir", str(work), "--mlflow-uri", uri,
                    "--ray-address", cluster.address, "--num-workers", "2", "--no-progress",
                    "max_steps=4", "batch_size=8", "checkpoint_every=0", "num_threads=1", "min_eval_windows=20")
    return work, uri, proc


def test_train_runs_two_ray_train_workers_on_the_cluster(cluster, trained):
    from mlflow import MlflowClient

    work, uri, proc = trained
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    versions = client.search_model_versions("name='fault-detector'")
    assert [str(v.version) for v in versions] == ["1"]
    run = client.get_run(versions[0].run_id)
    assert run.data.metrics["train.num_workers"] == 2
    assert run.data.tags["flywheel.model_version"] == "1"
    # The two Train workers were actors of this cluster (the state API keeps finished actors).
    workers = cluster.actors("RayTrainWorker")
    node_ids = {n["id"] for n in cluster.nodes()}
    assert len(workers) == 2, workers
    assert {w["node"] for w in workers} <= node_ids
    assert len({w["pid"] for w in workers}) == 2  # two separate worker processes


def test_serve_answers_health_and_predict_from_the_cluster(cluster, trained, tmp_path):
    import requests

    from finetune.synthetic import make_rows
    from flywheel.base.contract import LABELS

    work, uri, proc = trained
    assert proc.returncode == 0, "training failed; see the test above"
    srv = Background(cluster, tmp_path / "serve.log", "serve", "--ray-address", cluster.address,
                     "--workdir", str(work), "--mlflow-uri", uri, "--port", str(rc_mod.free_port()),
                     # A 4-step challenger need not pass the gate; every trained version gets this alias.
                     "--alias", "challenger", "serve.ingress=direct")
    try:
        m = srv.wait_for(r"the replica answers at (http://\S+); Ray Serve's proxy at (http://\S+)", timeout_s=240)
        rows = make_rows(3, seed=7, failure_frac=0.5)
        for url in m.groups():              # the replica's own port, and the proxy beside it
            assert requests.get(f"{url}/health", timeout=30).status_code == 200
            r = requests.post(f"{url}/predict", json={"windows": [{"kind": row["kind"], "readings": json.loads(row["readings"])}
                                                          for row in rows]},
                              timeout=60)
            assert r.status_code == 200, r.text
            preds = r.json()["predictions"]
            assert len(preds) == 3
            assert all(p["label"] in LABELS and p["model_version"] == "1" and 0.0 <= p["risk"] <= 1.0 for p in preds)
            assert abs(sum(preds[0]["probs"].values()) - 1.0) < 1e-3
        assert srv.interrupt() == 0, srv.output()[-3000:]
    finally:
        srv.kill()


OTHER_APP = """
from ray import serve
from ray.serve.context import _get_global_client

if _get_global_client(raise_if_no_controller_running=False) is None:
    serve.start(http_options={"host": "127.0.0.1", "port": %d})

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    def __call__(self, request):
        return "still here"

serve.run(Other.bind(), name="other-team", route_prefix="/other-team", blocking=False)
print(json.dumps(serve.status().applications["other-team"].status))
"""
OTHER_STATUS = """
from ray import serve
app = serve.status().applications.get("other-team")
print(json.dumps(app and app.status))
"""


def test_a_campaign_joins_the_cluster_in_ray_address_and_leaves_its_other_apps_running(cluster, tmp_path):
    """With no ``--ray-address``, a campaign joins the cluster ``RAY_ADDRESS`` names, as every other
    command does (it asked ``ray.init`` for a local Ray's CPU count there, which Ray refuses when it
    joins a cluster), and records that cluster on its run. When it ends it leaves Serve on the
    cluster, and the applications of others on it, running (it shut Serve down, deleting them all)."""
    import mlflow

    from flywheel.campaign import default_config_path

    assert cluster.python(OTHER_APP % rc_mod.free_port(), timeout_s=240) in ("DEPLOYING", "RUNNING")
    work = tmp_path / "work"
    proc = subprocess.run([str(rc_mod.BIN / "flywheel"), "run", "--config", str(default_config_path("tiny")),
                           "--workdir", str(work), "--no-live", "turns=0"],
                          cwd=REPO, env=cluster.env(RAY_ADDRESS=cluster.address), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`flywheel.campaign` = 'tiny'")
    assert {r.data.tags["flywheel.ray_address"] for r in runs if "flywheel.ray_address" in r.data.tags} == \
        {cluster.address}
    assert cluster.python(OTHER_STATUS) == "RUNNING"
