"""A whole campaign with credentials leaves no secret behind: not in MLflow, files, reports or logs.

The tiny campaign runs against the production broker (password file + ACL, as user
``campaign``, its password given as ``${MQTT_CAMPAIGN_PASSWORD}`` the way the deployment
files pass it) and an ``mlflow server`` with MLflow's own authentication (``--app-name
basic-auth``: only user ``flywheel`` may do anything), reached through a URL that carries
that user and password.  Then every byte the stack wrote is searched for both secrets: the
workdir (state, lake, reports, adapters), the tracking server's whole store (its database:
params, tags, descriptions; its artifacts), the server's log, and what the campaign printed.
Wrong or missing MLflow credentials get a message that says so, not a traceback and not a
misleading "not found".
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MLFLOW_SECRET = "mlflow-Pa55-7c1d"
API_TOKEN = "api-T0ken-93fa"       # the serve app's bearer token, given as ${FLYWHEEL_API_TOKEN}


def _files_holding(root: Path, secrets: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)} holds secret #{i}" for i, s in enumerate(secrets) if s in data]
    return hits


@pytest.fixture(scope="module")
def secret_campaign(secured_broker, infra_servers, ray_local, tmp_path_factory, no_mlflow_credentials_module):
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign
    from flywheel.report import write_report

    mlflow_root = Path(tempfile.mkdtemp(prefix="flywheel-mlflow-secrets-"))
    server = infra_servers.start_mlflow_server(mlflow_root, f"sqlite:///{mlflow_root / 'mlflow.db'}",
                                               basic_auth=("flywheel", MLFLOW_SECRET))
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("MQTT_CAMPAIGN_PASSWORD", secured_broker.passwords["campaign"])
        mp.setenv("FLYWHEEL_API_TOKEN", API_TOKEN)
        broker = f"mqtt://campaign:${{MQTT_CAMPAIGN_PASSWORD}}@127.0.0.1:{secured_broker.plain_port}"
        mlflow_uri = server.url.replace("http://", f"http://flywheel:{MLFLOW_SECRET}@")
        workdir = tmp_path_factory.mktemp("secrets")
        # The tree campaign (tests/e2e/conftest.py GBDT_OVERRIDES: trees, in-process windowing): the
        # LoRA fine-tune and Ray Data's path are the end-to-end test's; this one is about credentials,
        # which go through the same tracking, registry, signing and serving code whichever family
        # trains (the proxy: the session's Ray runs without direct ingress)
        from tests.e2e.conftest import GBDT_OVERRIDES

        cfg = load_campaign(str(default_config_path("tiny")), ["campaign=secrets", *GBDT_OVERRIDES,
                                                               "serve.ingress=proxy",
                                                               "serve.api_token=${FLYWHEEL_API_TOKEN}"])
        printed = io.StringIO()
        log_handler, root = logging.StreamHandler(printed), logging.getLogger()
        old_level = root.level
        root.addHandler(log_handler)
        root.setLevel(logging.INFO)  # every INFO line a component logs (broker, collectors, serve, MLflow)
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            state = run_campaign(cfg, workdir, broker_url=broker, mlflow_uri=mlflow_uri, view=False)
            report = write_report(workdir, "secrets", tracking_uri=mlflow_uri)
        root.removeHandler(log_handler)
        root.setLevel(old_level)
        yield state, workdir, report, server, mlflow_root, mlflow_uri, printed.getvalue()
    finally:
        mp.undo()
        server.stop()
        shutil.rmtree(mlflow_root, ignore_errors=True)


def test_the_campaign_ran_through_the_secured_broker_and_server(secret_campaign):
    state, _workdir, report, _server, _root, mlflow_uri, _printed = secret_campaign
    turns = state["turns"]
    assert [t["turn"] for t in turns] == [0, 1]
    assert turns[0]["ingest"]["landed"] > 0                      # the collectors read as user campaign
    assert turns[1]["promoted"] and turns[1]["champion_version"]  # registered over HTTP
    assert report.is_file()
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("flywheel-secrets")
    assert exp is not None and len(client.search_runs([exp.experiment_id])) >= 3  # parent + 2 turns


def test_no_secret_in_mlflow_params_tags_or_descriptions(secret_campaign, secured_broker):
    from mlflow import MlflowClient

    _state, _workdir, _report, _server, _root, mlflow_uri, _printed = secret_campaign
    secrets = [secured_broker.passwords["campaign"], MLFLOW_SECRET, API_TOKEN]
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("flywheel-secrets")
    texts = [str(exp.tags)]
    for run in client.search_runs([exp.experiment_id]):
        texts += [str(run.data.params), str(run.data.tags), str(run.info.run_name)]
    for mv in client.search_model_versions("name LIKE '%'"):
        texts += [str(mv.tags), str(mv.description), str(mv.source)]
    for rm in client.search_registered_models():
        texts += [str(rm.tags), str(rm.description)]
    leaks = [t for t in texts for s in secrets if s in t]
    assert not leaks, leaks[:3]
    # the broker is recorded, redacted: a reader can still tell which broker and user the campaign used
    parent = client.get_run(_state["parent_run_id"])
    assert parent.data.tags["flywheel.broker"] == f"mqtt://campaign:***@127.0.0.1:{secured_broker.plain_port}"


def test_no_secret_in_any_file_the_stack_wrote(secret_campaign, secured_broker):
    _state, workdir, _report, server, mlflow_root, _uri, _printed = secret_campaign
    secrets = [secured_broker.passwords["campaign"].encode(), MLFLOW_SECRET.encode(), API_TOKEN.encode()]
    assert not _files_holding(Path(workdir), secrets)
    assert not _files_holding(mlflow_root, secrets)          # the server's database and artifacts


def test_no_secret_in_what_the_campaign_printed_or_logged(secret_campaign, secured_broker):
    import ray

    *_, printed = secret_campaign
    assert "[turn 1]" in printed                                  # the progress lines were captured
    for secret in (secured_broker.passwords["campaign"], MLFLOW_SECRET, API_TOKEN):
        assert secret not in printed
    # every actor (collectors, Serve replica) writes its logs under this Ray session
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())  # noqa: SLF001
    secrets = [secured_broker.passwords["campaign"].encode(), MLFLOW_SECRET.encode(), API_TOKEN.encode()]
    assert not _files_holding(session / "logs", secrets)


@pytest.mark.parametrize("credentials", ["flywheel:wrong-Pa55-0000@", ""], ids=["wrong password", "none"])
def test_refused_mlflow_credentials_are_named_not_hidden(secret_campaign, credentials):
    import os
    import subprocess
    import sys

    import requests

    server = secret_campaign[3]
    assert requests.get(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                        timeout=30).status_code == 401           # the server really checks
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    uri = server.url.replace("http://", f"http://{credentials}")
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "rollback", "--mlflow-uri", uri],
                          capture_output=True, text=True, env=env, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "refused the request (UNAUTHENTICATED" in out and "MLFLOW_TRACKING_PASSWORD" in out, out
    assert "Traceback" not in out and "no alias" not in out
    assert "wrong-Pa55-0000" not in out and MLFLOW_SECRET not in out
