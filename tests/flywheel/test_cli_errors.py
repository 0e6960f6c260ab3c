"""Every error a user can cause on the command line: one line on stderr, naming the fix, exit 2.

Runtime failures (a broker that is not there, a model that cannot load) exit 1 the same way;
``tests/serve/test_cli.py`` covers one of those.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError, UsageError, one_line
from flywheel.cli import main


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:         # argparse's own errors end the parse with SystemExit(2)
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


CPUS = os.cpu_count() or 1   # a local Ray's CPUs (flywheel ingest starts one with Ray's default)


@pytest.mark.parametrize("argv,needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),                       # unknown sub-command
    (["demo", "--workdir", "{tmp}", "no_such_key=1"], "no_such_key"),         # unknown config key
    (["demo", "--workdir", "{tmp}", "train.epochs=many"], "train.epochs"),    # a value of the wrong type
    (["demo", "--workdir", "{tmp}", "control_fleet=1.5"], "control_fleet should be a share in [0, 1)"),
    (["demo", "--workdir", "{tmp}", "bridge_host=process"], "bridge_host 'process' is not one of actor, thread"),
    (["demo", "--workdir", "{tmp}", "--seeds", "1,x"], "--seeds"),
    # windows the plant can never make, refused before anything starts (they failed at turn 1)
    (["demo", "--workdir", "{tmp}", "window.stride_s=90"],
     "window.stride_s should be a multiple of the plant tick (60 s in scenario 'demo'), got 90"),
    (["demo", "--workdir", "{tmp}", "window.length=3000"],
     "window.length=3000 readings span 2.1 plant days (one reading every 60 s), longer than a period (2d)"),
    # plant times past the contract's last (year 9999): the sim and a campaign ran on, their messages
    # beyond it dead-lettered
    (["demo", "--workdir", "{tmp}", "period=3000000d"], "period=3000000d over turns=3 from the scenario's epoch "
                                                        "(2026-01-01T00:00:00Z) runs past the year 9999"),
    (["sim", "--duration", "3000000d"], "--duration '3000000d' from the scenario's epoch (2026-01-01T00:00:00Z) "
                                        "runs past the year 9999, the last plant time the wire contract carries"),
    # a seed named twice would count twice in the combined report's mean and interval
    (["demo", "--workdir", "{tmp}", "--seeds", "1,2,1"], "--seeds names seed 1 more than once ('1,2,1'); "
                                                          "name each seed once, e.g. 1,2"),
    (["report", "--workdir", "{tmp}", "--seeds", "3,3"], "--seeds names seed 3 more than once"),
    # an empty list (a script's unset variable) ran the single default campaign instead
    (["demo", "--workdir", "{tmp}", "--seeds", ""], "--seeds should name at least one seed, got ''"),
    (["report", "--workdir", "{tmp}", "--seeds", ""], "--seeds should name at least one seed"),
    # a campaign is a folder under <workdir>/campaigns/: a name that leaves it is refused, not read
    (["report", "--workdir", "{tmp}", "--campaign", "../x"],
     "--campaign should be 1-64 of [A-Za-z0-9_.-], starting with a letter or digit, got '../x'"),
    (["demo", "--workdir", "{tmp}", "campaign=.."], "campaign name should be 1-64 of [A-Za-z0-9_.-], starting with"),
    (["train", "--workdir", "{tmp}", "--dataset", "ds-missing"], "ds-missing"),  # a dataset that is not there
    (["train", "--workdir", "{tmp}"], "--dataset"),
    (["sim", "--speed", "-3"], "--speed"),
    (["serve", "--workdir", "{tmp}", "poll_s=3"], "write serve.poll_s=3"),   # serve has no bare alias
    (["serve", "status"], "--url"),
    (["serve", "status", "--url", "foo"], "http://127.0.0.1:8000"),
    (["broker", "--port", "70000"], "--port"),
    (["ingest", "--workdir", "{tmp}"], "--broker"),
    (["sim", "--no-such-flag"], "--no-such-flag"),
    # the one override grammar, section.key=value: unknown sections and keys name themselves
    (["train", "--workdir", "{tmp}", "--dataset", "ds-1", "trian.epochs=2"], "unknown config section 'trian'"),
    (["train", "--workdir", "{tmp}", "--dataset", "ds-1", "train.epoch=2"], "'train.epoch' (did you mean 'epochs'?)"),
    (["train", "--workdir", "{tmp}", "--dataset", "ds-1", "serve.poll_s=2"], "its sections: train"),
    (["train", "--workdir", "{tmp}", "--dataset", "ds-1", "train.epochs=many"], "train.epochs"),
    (["train", "--workdir", "{tmp}", "--dataset", "ds-1", "--config", "{tmp}/none.yaml"], "none.yaml"),
    (["serve", "--workdir", "{tmp}", "serv.poll_s=3"], "unknown config section 'serv'"),
    (["serve", "--workdir", "{tmp}", "bridge.nope=3"], "'bridge.nope'"),
    (["serve", "--workdir", "{tmp}", "train.epochs=3"], "its sections: serve, bridge"),
    (["serve", "bridge", "--url", "http://127.0.0.1:8000", "--broker", "mqtt://127.0.0.1:9", "serve.poll_s=1"],
     "its sections: bridge"),
    (["ingest", "--workdir", "{tmp}", "--broker", "mqtt://127.0.0.1:9", "ingset.collectors=2"], "'ingset'"),
    (["ingest", "--workdir", "{tmp}", "--broker", "mqtt://127.0.0.1:9", "ingest.collectors=0"], "collectors"),
    # more than a local Ray would place: the command waited 60 s, then ended with Ray's traceback
    (["ingest", "--workdir", "{tmp}", "--broker", "mqtt://127.0.0.1:9", f"ingest.collectors={4 * CPUS + 1}"],
     f"reserve {CPUS + 0.25:g} CPUs, more than the {CPUS} of the local Ray: lower them, or run on a Ray cluster"),
    (["dataset", "build", "--workdir", "{tmp}", "--no-mlflow", "datset.eval_fraction=0.3"], "'datset'"),
    (["dataset", "build", "--workdir", "{tmp}", "--previous", "ds-missing"], "ds-missing"),  # before Ray starts
    (["dataset", "build", "--workdir", "{tmp}", "--no-mlflow", "dataset.window.lenght=3"], "dataset.window.lenght"),
    (["sim", "scenaro.machines.pump=2"], "unknown config section 'scenaro'"),
    (["sim", "scenario.machines.pump=-2"], "machines.pump"),
    # actions are sub-commands; a word that is neither an action nor an override is refused
    (["train", "frobnicate"], "'frobnicate' is neither an action (rollback)"),
    (["serve", "frobnicate"], "'frobnicate' is neither an action (rollback, status, bridge, pause, resume, approve)"),
    (["train", "rollback", "train.epochs=2"], "unrecognized arguments: train.epochs=2"),
    (["dataset", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["dataset"], "build"),
    ([], "name a command"),
    # the audit trail: a workdir without a lake, a time that is no time
    (["lineage", "--workdir", "{tmp}", "--machine", "mill-01", "--at", "0"], "no lake at"),
    (["lineage", "--workdir", "{tmp}", "--machine", "mill-01", "--at", "noon"], "neither plant epoch seconds"),
    (["lineage", "--workdir", "{tmp}", "--machine", "mill-01", "--at", "1e15"], "--at '1e15' is no plant time"),
    (["lineage", "--workdir", "{tmp}", "--machine", "mill-01", "--at", "1969-07-20T20:17:00Z"], "is no plant time"),
    (["lineage", "--workdir", "{tmp}", "--at", "0"], "--machine"),
])
def test_usage_and_config_errors_are_one_line_on_stderr_with_exit_2(argv, needle, capsys, tmp_path):
    rc, out, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2, (rc, out, err)
    assert not (tmp_path / "mlflow.db").exists(), "a refused command left state behind"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith("flywheel")
    assert "Traceback" not in out + err


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--workdir", "{file}/wd"], "--workdir {file}/wd: cannot make this folder (Not a directory)"),
    (["run", "--config", "{tiny}", "--workdir", "{file}"], "--workdir: {file} is a file, not a folder"),
    (["turn", "--workdir", "{file}"], "--workdir: {file} is a file, not a folder"),
    # commands that only read a workdir said "no MLflow store" or "no lake" there, with a fix that could not work
    (["bom", "--workdir", "{file}"], "--workdir: {file} is a file, not a folder"),
    (["serve", "--workdir", "{file}"], "--workdir: {file} is a file, not a folder"),
    (["report", "--workdir", "{file}"], "--workdir: {file} is a file, not a folder"),
    (["dataset", "build", "--workdir", "{file}"], "--workdir: {file} is a file, not a folder"),
    (["lineage", "--workdir", "{file}", "--machine", "mill-01", "--at", "0"], "--workdir: {file} is a file"),
    (["keys", "init", "--workdir", "{file}/wd"], "--workdir {file}/wd: cannot make this folder"),
    (["ingest", "--broker", "mqtt://127.0.0.1:9", "--lake", "{file}/lake"], "--lake {file}/lake: cannot make"),
    (["sim", "--out", "{file}/plant.jsonl", "--duration", "1m"], "--out's folder {file} is a file, not a folder"),
    (["sim", "--out", "{tmp}", "--duration", "1m"], "--out {tmp} is a folder: name the file to write"),
    (["report", "--workdir", "{tmp}", "--out", "{file}"], "--out {file} is a file, not a folder"),
])
def test_a_folder_that_cannot_be_made_ends_the_command_before_it_starts_anything(argv, needle, capsys, tmp_path):
    from flywheel.campaign import default_config_path

    file = tmp_path / "afile"
    file.write_text("not a folder")

    def fill(a: str) -> str:
        return a.replace("{file}", str(file)).replace("{tmp}", str(tmp_path)).replace(
            "{tiny}", str(default_config_path("tiny")))

    rc, out, err = _run([fill(a) for a in argv], capsys)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fill(needle) in lines[0], err
    assert "Traceback" not in out + err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"], "the command made something before it refused"


def test_a_turn_with_no_campaign_to_continue_starts_nothing(capsys, tmp_path):
    """`flywheel turn` continues the campaign in --workdir: a mistyped folder, or a campaign run under
    another name, is named with the fix instead of starting a new campaign there (minutes of work)."""
    import json

    rc, out, err = _run(["turn", "--workdir", str(tmp_path / "typo"), "--no-live"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith(f"flywheel turn: configuration error: no campaign 'demo' in {tmp_path / 'typo'} to "
                               "continue"), lines
    assert f"start 'demo' with `flywheel run --config FILE --workdir {tmp_path / 'typo'}`" in lines[0], lines
    assert not (tmp_path / "typo").exists(), "the refused turn made its workdir"

    held = tmp_path / "wd" / "campaigns" / "line-7"
    held.mkdir(parents=True)
    (held / "state.json").write_text(json.dumps({"campaign": "line-7", "turns": []}))
    rc, out, err = _run(["turn", "--workdir", str(tmp_path / "wd"), "--no-live", "turns=5"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, out, err)
    assert f"{tmp_path / 'wd' / 'campaigns'} holds 'line-7': continue one with the --config it ran with" in lines[0]
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["campaigns"], "the refused turn started something"


@pytest.mark.parametrize("argv", [["serve"], ["serve", "rollback"], ["train", "rollback"], ["bom", "1"]])
def test_a_registry_command_on_a_workdir_without_a_store_names_it_and_makes_nothing(argv, capsys, tmp_path):
    """Commands that only read the registry: a mistyped --workdir is named with the fix (exit 1), where
    MLflow made the folder and an empty store there, printed its start-up lines, then found no model."""
    wd = tmp_path / "typo"
    rc, out, err = _run([*argv, "--workdir", str(wd)], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith(f"flywheel {argv[0]}: no MLflow store at {wd / 'mlflow.db'}, so no model is "
                               "registered there: train one in that workdir first"), lines
    assert not wd.exists()


def test_a_campaign_names_a_broker_it_cannot_reach_before_it_starts_ray(capsys, tmp_path):
    """The plant publishes from the campaign's own process: a --broker that is not there is said at
    once (where it was found at ingest's start, after Ray and MLflow had started: 10.7 s here)."""
    from flywheel.base.broker import free_port
    from flywheel.campaign import default_config_path

    port, wd = free_port(), tmp_path / "wd"
    rc, out, err = _run(["run", "--config", str(default_config_path("tiny")), "--broker", f"mqtt://127.0.0.1:{port}",
                         "--workdir", str(wd), "--no-live"], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and lines[-1] == (f"flywheel run: cannot reach broker mqtt://127.0.0.1:{port}: [Errno 111] "
                                     "Connection refused; start it, or check --broker (leave it out for an embedded "
                                     "one)"), (rc, out, err)
    assert not {"lake", "mlflow.db"} & {p.name for p in wd.iterdir()}, "the campaign started before it refused"
    assert "Traceback" not in out + err


def _retain_status(broker_url: str, root: str, component: str, online: bool | None, info: dict | None = None) -> None:
    """Leave ``component``'s retained status on ``root`` as a live one would (None: clear it)."""
    from flywheel.base import contract
    from flywheel.base.mqtt import connect, make_client, publish

    client = make_client(broker_url, prefix="test-status")
    connect(client, broker_url)
    try:
        payload = b"" if online is None else contract.encode(contract.Status(component=component, online=online,
                                                                             info=info or {}))
        publish(client, contract.Topics(root).status(component), payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_campaign_refuses_a_shared_brokers_topic_root_where_others_are_live(broker, capsys, tmp_path):
    """Two campaigns, or a campaign and a plant, under one topic root of one broker read each
    other's telemetry and order each other's machines: the first one's lake and evidence take the
    other's plant for its own. A simulator and a bridge live there (their retained status) are
    named, with the fix, before anything starts; once they say offline, they are not, nor are the
    campaign's own collectors left by a run that did not end (their will waits
    ingest.offline_after_s, so they say online for a while)."""
    import uuid

    from flywheel.campaign import default_config_path

    root, wd = f"shared-{uuid.uuid4().hex[:8]}", tmp_path / "wd"
    argv = ["run", "--config", str(default_config_path("tiny")), "--broker", broker.url, "--workdir", str(wd),
            "--no-live", f"topic_root={root}"]
    try:
        for component in ("sim", "bridge"):
            _retain_status(broker.url, root, component, online=True)
        _retain_status(broker.url, root, "ingest-0", online=True,   # this campaign's, killed a moment ago
                       info={"client_id": f"fw-tiny-{root}-collector-0"})
        _retain_status(broker.url, root, "ingest-1", online=False)   # stopped, or its will said so
        rc, out, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and lines[-1] == (
            f"flywheel run: topic root '{root}' on {broker.url} is in use: bridge, sim are online there (retained "
            f"status under {root}/_status/). A campaign beside them would read their telemetry and order their "
            f"machines, and they would take its simulated plant for theirs: give the campaign a topic root of its "
            f"own (e.g. topic_root={root}-tiny), or stop them"), (rc, out, err)
        assert not {"lake", "mlflow.db"} & {p.name for p in wd.iterdir()}, "the campaign started before it refused"
        assert "Traceback" not in out + err
    finally:
        for component in ("sim", "bridge", "ingest-0", "ingest-1"):
            _retain_status(broker.url, root, component, online=None)


def test_a_campaign_refuses_a_registered_model_that_holds_another_runs_versions(capsys, tmp_path):
    """A campaign's gate and serving follow its model's champion alias: on a tracking store shared
    with another campaign (a tracking server, or a workdir that holds one) under the default
    model_name, it weighed and served the other's versions as its own."""
    from finetune.registry import register_version
    from flywheel.base.tracking import client_for
    from flywheel.campaign import default_config_path

    wd = tmp_path / "wd"
    wd.mkdir()
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    client = client_for(uri)
    exp = client.create_experiment("flywheel-other")
    parent = client.create_run(exp, tags={"flywheel.campaign": "other"}).info.run_id
    turn = client.create_run(exp, tags={"mlflow.parentRunId": parent, "flywheel.campaign": "other"}).info.run_id
    register_version(uri, "fault-detector", turn, "model", {"flywheel.campaign": "other"})
    rc, out, err = _run(["run", "--config", str(default_config_path("tiny")), "--workdir", str(wd), "--no-live"],
                        capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and lines[-1] == (
        f"flywheel run: registered model 'fault-detector' at {uri} holds version 1 (campaign other) that this "
        "campaign did not train: its gate and its serving follow that model's champion alias, so another run's "
        "versions would be weighed and served as its own. Give the campaign a model of its own (e.g. "
        "model_name=fault-detector-tiny), or its own --workdir or --mlflow-uri; a version nobody needs (one "
        f"registered by hand) can be deleted instead: mlflow.MlflowClient('{uri}').delete_model_version("
        "'fault-detector', '1')"), (rc, out, err)
    assert not {"lake", "broker"} & {p.name for p in wd.iterdir()}, "the campaign started before it refused"
    assert not (wd / "campaigns" / "tiny" / "state.json").exists()
    assert "Traceback" not in out + err
    # the way out it gives for a version nobody needs runs as written and empties the model
    import mlflow

    eval(lines[-1].split("deleted instead: ", 1)[1], {"mlflow": mlflow})
    assert list(client.search_model_versions("name = 'fault-detector'")) == []


@pytest.mark.parametrize("base_model,code,needle", [
    ("/nonexistent", 1, "unknown base model '/nonexistent': not 'minilm', not an existing directory"),
    # the policy is configuration: exit 2, as for every config error
    ("Qwen/Qwen2.5-0.5B", 2, "base model 'hf:Qwen/Qwen2.5-0.5B' is not in governance.allowed_base_models"),
])
def test_a_campaign_refuses_a_base_model_before_it_starts_anything(base_model, code, needle, capsys, tmp_path):
    """Training refuses such a base model before it spends compute, but in a campaign that is at
    turn 1, after a broker, Ray, MLflow and turn 0's plant period (~20 s here)."""
    from flywheel.campaign import default_config_path

    wd = tmp_path / "wd"
    rc, out, err = _run(["run", "--config", str(default_config_path("tiny")), "--workdir", str(wd), "--no-live",
                         f"base_model={base_model}"], capsys)
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and needle in lines[0], (rc, out, err)
    assert not wd.exists() or not {"lake", "mlflow.db", "keys", "broker"} & {p.name for p in wd.iterdir()}, \
        "the campaign started before it refused"
    assert "Traceback" not in out + err


def test_a_campaign_refuses_more_adapted_layers_than_its_base_model_has(capsys, tmp_path):
    """Training would refuse it when it builds the model, at turn 1, after turn 0's plant period."""
    from flywheel.campaign import default_config_path

    wd = tmp_path / "wd"
    rc, out, err = _run(["run", "--config", str(default_config_path("tiny")), "--workdir", str(wd), "--no-live",
                         "train.lora.top_layers=12"], capsys)
    assert rc == 1 and err.strip().splitlines() == [
        "flywheel run: lora.top_layers=12 but the base model has 6 layers: use a count from 1 to 6, or 0 for all"], \
        (rc, out, err)
    assert not wd.exists() or not {"lake", "mlflow.db", "broker"} & {p.name for p in wd.iterdir()}, \
        "the campaign started before it refused"


@pytest.mark.parametrize("what", ["replicas", "collectors", "ray-train"])
def test_a_campaign_refuses_reservations_its_local_ray_can_never_grant(what, capsys, tmp_path):
    """Ray never grants them, so the replica or the Ray Train workers waited: the Serve app failed
    after 3.5 minutes with a fix that could not work (give it longer), and training with
    train.num_workers=4 waited in turn 1 until it was killed."""
    from flywheel.stack import local_ray_cpus

    cpus = local_ray_cpus()
    overrides = {"replicas": ["serve.ingress=proxy", f"serve.num_replicas={cpus + 1}"],
                 "collectors": [f"collectors={4 * cpus + 1}"],
                 "ray-train": [f"train.num_workers={cpus}"]}[what]
    wd = tmp_path / "wd"
    rc, out, err = _run(["demo", "--workdir", str(wd), "--no-live", *overrides], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, out, err)
    assert f"more than the {cpus} this campaign's local Ray offers: lower them, or run on a Ray cluster " \
           "(--ray-address)" in lines[0], lines[0]
    assert not wd.exists() or not {"lake", "mlflow.db", "broker"} & {p.name for p in wd.iterdir()}, \
        "the campaign started before it refused"


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("what", ["replica-gpus", "use_gpu", "device"])
def test_a_campaign_refuses_gpus_this_machine_does_not_have_before_it_starts(what, capsys, tmp_path):
    """train.use_gpu failed at turn 1 (19 s), serve.device=cuda after the first training (57 s), and
    a replica reserving a GPU the local Ray never had waited until the campaign was killed."""
    gpus = _cuda_gpus()
    if what != "replica-gpus" and gpus:
        pytest.skip("this machine has a CUDA GPU, which these settings may use; the replicas' case runs here")
    overrides, asked, fix = {
        "replica-gpus": (["serve.ingress=proxy", f"serve.num_gpus_per_replica={gpus + 1}"],
                         f"serve.num_gpus_per_replica={gpus + 1}", "serve.num_gpus_per_replica=0"),
        "use_gpu": (["train.use_gpu=true"], "train.use_gpu=true", "train.use_gpu=false"),
        "device": (["serve.device=cuda"], "serve.device=cuda", "serve.device=auto")}[what]
    wd = tmp_path / "wd"
    rc, out, err = _run(["demo", "--workdir", str(wd), "--no-live", *overrides], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith(f"flywheel demo: configuration error: {asked}, but this machine has ") and \
        lines[0].endswith(f": set {fix}, or run on a Ray cluster with GPU nodes (--ray-address)"), lines[0]
    assert not wd.exists() or not {"lake", "mlflow.db", "broker"} & {p.name for p in wd.iterdir()}, \
        "the campaign started before it refused"


def test_a_file_the_command_cannot_write_is_named_on_one_line(capsys, tmp_path):
    """The net under the commands' own checks: an OSError with a file name, one line, exit 1."""
    (tmp_path / "keys").write_text("a file where the key folder goes")
    rc, out, err = _run(["keys", "init", "--workdir", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith("flywheel keys: ") and str(tmp_path / "keys") in lines[0], lines
    assert "Traceback" not in out + err


def test_a_config_file_that_is_not_text_is_named_on_one_line(capsys, tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_bytes(b"\xff\xfe\x00turns: 2")        # UTF-16 or binary, not the UTF-8 YAML it should be
    rc, out, err = _run(["run", "--config", str(cfg), "--workdir", str(tmp_path / "wd")], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "is not UTF-8 text" in lines[0] and str(cfg) in lines[0], (rc, err)


@pytest.mark.parametrize("command,scheme", [(["demo"], ""), (["ingest", "--broker", "mqtt://127.0.0.1:9"], "ray://")])
def test_a_ray_address_where_nothing_answers_ends_the_command_at_once(command, scheme, tmp_path):
    """Ray itself retries such an address for minutes; the command says so in one line instead.
    In a process of its own: a process that runs Ray already (this one may) joins that one."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:        # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    live = ["--no-live"] if command == ["demo"] else []
    p = subprocess.run([sys.executable, "-m", "flywheel.cli", *command, *live, "--workdir", str(tmp_path),
                        "--ray-address", f"{scheme}127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.strip().splitlines() if not line.startswith("[turn 0] ")]   # demo's progress
    assert p.returncode == 1 and len(lines) == 1, (p.returncode, p.stdout, p.stderr)
    assert f"cannot join the Ray cluster at {scheme}127.0.0.1:{port}: nothing answers" in lines[0]
    assert "--ray-address" in lines[0] and "Traceback" not in p.stdout + p.stderr
    assert time.monotonic() - t0 < 60


def test_every_project_error_derives_from_one_base_with_its_exit_code():
    from factory_sim import SimError
    from finetune.data import DataError
    from finetune.model import ModelError
    from finetune.registry import RegistryError
    from flywheel.base.broker import BrokerError
    from flywheel.base.contract import ContractError
    from flywheel.base.mqtt import ConnectError
    from flywheel.loop import CampaignError
    from flywheel.report import ReportError
    from ingest.dataset import DatasetError
    from ingest.lake import LakeError
    from serve import ServeError

    runtime = [SimError, DataError, ModelError, RegistryError, BrokerError, ContractError, ConnectError,
               CampaignError, ReportError, DatasetError, LakeError, ServeError]
    assert all(issubclass(cls, FlywheelError) and cls.exit_code == 1 for cls in runtime)
    assert ConfigError.exit_code == UsageError.exit_code == 2
    # Callers that catch the builtin kinds keep working.
    assert issubclass(ConfigError, ValueError) and issubclass(RegistryError, LookupError)
    assert one_line(ConfigError("a\n  b\n")) == "a; b"


def test_actions_are_sub_commands_and_the_command_runs_itself_without_one():
    from flywheel.cli import build_parser
    from finetune import cli as train_cli
    from serve import cli as serve_cli

    parser = build_parser()
    # no action: the command's own run; overrides may sit between options
    args = parser.parse_args(["train", "--dataset", "ds-1", "train.epochs=2", "lora.rank=4", "--seed", "3",
                              "train.lr=0.01"])
    assert args.func is train_cli.run and args.seed == 3 and args.dataset == "ds-1"
    assert args.overrides == ["train.epochs=2", "lora.rank=4", "train.lr=0.01"]
    # an action: its own parser; options before its name stay unless it sets them again
    args = parser.parse_args(["train", "--workdir", "/w", "rollback", "--model-name", "pump"])
    assert args.func is train_cli.run_rollback and (args.workdir, args.model_name) == ("/w", "pump")
    args = parser.parse_args(["serve", "rollback", "--url", "http://x:1", "--alias", "prod"])
    assert args.func is serve_cli.run_rollback and (args.url, args.alias) == ("http://x:1", "prod")
    assert parser.parse_args(["serve", "status", "--url", "http://x:1"]).func is serve_cli._status
    args = parser.parse_args(["serve", "bridge", "--url", "http://x:1", "--broker", "mqtt://b:1",
                              "bridge.threshold=0.3"])
    assert args.func is serve_cli.run_bridge and args.overrides == ["bridge.threshold=0.3"]
    # `serve start` is the command's own run, named
    args = parser.parse_args(["serve", "start", "serve.poll_s=5", "--port", "8001"])
    assert args.func is serve_cli.run and args.overrides == ["serve.poll_s=5"] and args.port == 8001
    assert parser.parse_args(["serve", "bridge.threshold=0.3"]).overrides == ["bridge.threshold=0.3"]


def test_every_stage_command_takes_section_overrides_and_its_own_bare_alias(tmp_path):
    """One loader, one grammar: each stage command's config from section.key=value (and bare keys where
    the command has an own section), and a campaign file as --config takes the command's sections."""
    from factory_sim.cli import load_sim_scenario
    from finetune.cli import load_train_config
    from flywheel.base.config import load_section
    from flywheel.campaign import default_config_path, load_campaign, stage_configs
    from ingest import BuildConfig
    from ingest.config import IngestConfig
    from serve.cli import load_configs

    train = load_train_config(None, ["train.epochs=2", "train.lora.rank=16", "lr=0.01"], {"seed": 3, "use_gpu": None})
    assert (train.epochs, train.lora.rank, train.lr, train.seed, train.use_gpu) == (2, 16, 0.01, 3, False)
    cfgs = load_configs(None, ["serve.poll_s=5", "bridge.threshold=0.3"])
    assert cfgs["serve"].poll_s == 5.0 and cfgs["bridge"].threshold == 0.3
    assert load_section(IngestConfig, "ingest", None, ["ingest.collectors=2"]).collectors == 2
    build = load_section(BuildConfig, "dataset", None, ["dataset.eval_fraction=0.3", "window.length=6"])
    assert build.eval_fraction == 0.3 and build.window.length == 6
    plant = load_sim_scenario("tiny", None, ["scenario.machines.pump=2", "milling.repair_s=60"])
    assert plant.name == "tiny" and plant.machines.pump == 2 and plant.milling.repair_s == 60

    # A campaign file works as each stage's --config and gives the configs the campaign would use.
    demo = default_config_path("demo")
    campaign = stage_configs(load_campaign(demo))
    # ... except the decision costs, which a campaign derives from its scenario (the train stage
    # alone has no plant: it takes train.costs, else chooses the operating point by F1)
    alone = load_train_config(str(demo), [])
    assert alone.costs == {} and campaign["train"].costs["missed"]["milling"] > 0
    # ... and the governance policy, a campaign's top-level section (a stage alone takes train.governance /
    # serve.governance)
    policy = campaign["train"].governance
    assert dataclasses.replace(alone, costs=campaign["train"].costs, governance=policy) == campaign["train"]
    assert dataclasses.replace(load_configs(str(demo), [])["serve"], governance=policy) == campaign["serve"]
    assert load_configs(str(demo), [])["bridge"] == campaign["bridge"]
    assert load_section(BuildConfig, "dataset", demo, []) == campaign["dataset"]
    assert load_sim_scenario(None, str(demo), []).name == "demo"
    # ... and a flat file is the command's own section; the flags go last
    flat = tmp_path / "train.yaml"
    flat.write_text("epochs: 3\nlora: {rank: 4}\n")
    train = load_train_config(str(flat), ["train.epochs=5"], {"num_workers": 2})
    assert (train.epochs, train.lora.rank, train.num_workers) == (5, 4, 2)


def test_the_flywheel_command_exits_with_its_code_and_all_its_output_and_main_leaves_gc_alone(tmp_path, capsys):
    """The installed command (``flywheel.cli:entry``) skips the interpreter's last collection;
    its exit code and every line it printed still arrive. ``main``, called in this process,
    freezes nothing (a frozen heap would never be collected in a long-lived caller)."""
    import gc
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "flywheel"
    assert command.is_file(), "the flywheel command should be installed beside this Python (pip install -e .)"
    ok = subprocess.run([str(command), "keys", "init", "--workdir", str(tmp_path / "wd")], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "wd" / "keys" / "signing.pub").is_file() and "signing.pub" in ok.stdout
    bad = subprocess.run([str(command), "demo", "--workdir", str(tmp_path / "wd"), "train.epochs=many"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("flywheel demo: configuration error")
    frozen = gc.get_freeze_count()
    assert main(["keys", "init", "--workdir", str(tmp_path / "wd2")]) == 0
    assert gc.get_freeze_count() == frozen
