"""A real `mlflow server` (the cluster's tracking server) used over HTTP, as the stack uses it.

The server runs with a SQL backend and proxied artifacts (``--serve-artifacts``), exactly the
shape of infra/compose and infra/k8s (there: PostgreSQL + MinIO; here: SQLite or a throwaway
PostgreSQL + a local directory).  The client side only knows ``MLFLOW_TRACKING_URI=http://...``:
it logs a run, params, metrics and an artifact, registers a version and moves the
``champion`` alias with the stack's own registry functions (finetune.registry).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # two real servers start (each imports MLflow twice)


@pytest.fixture(scope="module")
def tracking_servers(infra_servers):
    """Both servers, started side by side (each start is mostly imports: one waits on the
    other's CPU less than twice the time in a row).  ``None`` for a backend that cannot run,
    with the reason."""
    from concurrent.futures import ThreadPoolExecutor

    roots = {b: Path(tempfile.mkdtemp(prefix=f"flywheel-mlflow-{b}-")) for b in ("sqlite", "postgresql")}
    pg, servers, reasons = None, {}, {}
    bin_dir = infra_servers.postgres_bin_dir()
    try:
        import psycopg  # noqa: F401 - SQLAlchemy 2.1's default driver for postgresql://
        has_driver = True
    except ImportError:
        has_driver = False
    try:
        backends = {"sqlite": f"sqlite:///{roots['sqlite'] / 'mlflow.db'}"}
        if bin_dir is None:
            reasons["postgresql"] = ("skip", "PostgreSQL server binaries (initdb) are not installed; "
                                             "apt-get install -y postgresql runs this test (see infra/README.md)")
        elif not has_driver:
            reasons["postgresql"] = ("fail", "psycopg is missing: MLflow on PostgreSQL needs "
                                             "`pip install 'psycopg[binary]'` (SQLAlchemy 2.1 uses it for postgresql://)")
        else:
            pg = infra_servers.start_postgres(bin_dir)
            backends["postgresql"] = pg.uri()
        with ThreadPoolExecutor(len(backends)) as pool:
            futures = {b: pool.submit(infra_servers.start_mlflow_server, roots[b], uri) for b, uri in backends.items()}
            for b, fut in futures.items():
                servers[b] = fut.result()
        yield servers, reasons
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda server: server.stop(), servers.values()))
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.root, ignore_errors=True)
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def tracking_server(request, tracking_servers):
    servers, reasons = tracking_servers
    if request.param in reasons:
        action, why = reasons[request.param]
        (pytest.skip if action == "skip" else pytest.fail)(why)
    return servers[request.param]


def test_run_metrics_artifact_registry_and_alias_over_http(tracking_server, monkeypatch, tmp_path):
    import mlflow
    import requests

    from finetune.registry import get_version, register_version, set_alias

    uri = tracking_server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # A deployed pod follows the environment variable; in a long test session another test's
    # in-process tracking URI may still be in force, so pin the same URI explicitly too.
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_tracking_uri() == uri

    experiment = f"flywheel-infra-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    report = tmp_path / "eval" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"eval.macro_f1": 0.5}))
    with mlflow.start_run(run_name="turn-1") as run:
        mlflow.set_tag("flywheel.turn", "1")
        mlflow.log_params({"train.lora_rank": 8, "data.dataset_id": "ds-test"})
        for step, loss in enumerate([1.0, 0.7, 0.5]):
            mlflow.log_metric("train.loss", loss, step=step)
        mlflow.log_metric("eval.macro_f1", 0.5)
        mlflow.log_artifacts(str(report.parent), artifact_path="model")
    run_id = run.info.run_id

    # the artifact travelled over HTTP to the server's store; the client never saw its path
    got = mlflow.get_run(run_id)
    assert got.info.artifact_uri.startswith("mlflow-artifacts:"), got.info.artifact_uri
    stored = list(tracking_server.artifacts_dir.rglob("report.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == {"eval.macro_f1": 0.5}
    assert got.data.params["train.lora_rank"] == "8"
    assert got.data.metrics["eval.macro_f1"] == 0.5
    history = mlflow.MlflowClient().get_metric_history(run_id, "train.loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0, 0.7, 0.5]
    back = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/report.json",
                                                    dst_path=str(tmp_path / "dl")))
    assert json.loads(back.read_text()) == {"eval.macro_f1": 0.5}

    # registry: a version, then the champion alias, as the turn loop's gate does
    name = f"fault-detector-{uuid.uuid4().hex[:6]}"
    v1 = register_version(uri, name, run_id, "model", tags={"flywheel.turn": 1, "dataset_id": "ds-test"})
    v2 = register_version(uri, name, run_id, "model", tags={"flywheel.turn": 2})
    set_alias(uri, name, "champion", v1.version)
    set_alias(uri, name, "champion", v2.version)
    champion = get_version(uri, name, "champion")
    assert champion.version == v2.version and champion.run_id == run_id

    # and the same answer from the plain REST API any other tool would use
    resp = requests.get(f"{uri}/api/2.0/mlflow/registered-models/alias",
                        params={"name": name, "alias": "champion"}, timeout=30)
    resp.raise_for_status()
    mv = resp.json()["model_version"]
    assert mv["version"] == v2.version and "champion" in mv["aliases"]
    assert {t["key"]: t["value"] for t in get_version_tags(uri, name, v1.version)}["dataset_id"] == "ds-test"


def get_version_tags(uri: str, name: str, version: str) -> list[dict]:
    import requests

    resp = requests.get(f"{uri}/api/2.0/mlflow/model-versions/get", params={"name": name, "version": version},
                        timeout=30)
    resp.raise_for_status()
    return resp.json()["model_version"].get("tags", [])


def test_the_server_starts_no_job_runner(tracking_server):
    """The stack runs no MLflow jobs: the server (as infra/compose and infra/k8s start it) runs
    without MLflow 3's job runner, whose seven huey consumers each import MLflow at start."""
    procs = tracking_server.processes()
    assert any("uvicorn" in p or "gunicorn" in p or "waitress" in p for p in procs), procs
    assert not [p for p in procs if "huey" in p or "_job_runner" in p], procs
