"""``flywheel serve`` sub-commands that need no running app: rollback, argument errors, help, and the
serve.key=value / bridge.key=value overrides reaching the configs."""

from __future__ import annotations

import pytest

from flywheel.cli import main


def test_rollback_moves_the_alias_back(registry, adapter_dirs, capsys):
    from finetune.registry import get_version

    registry.register(adapter_dirs.a)       # v1
    registry.register(adapter_dirs.b)       # v2
    assert main(["serve", "rollback", "--mlflow-uri", registry.tracking_uri]) == 0
    assert get_version(registry.tracking_uri, registry.model_name, "champion").version == "1"
    assert "version 1" in capsys.readouterr().out
    # Nothing older to go back to: a clear message, not a traceback.
    assert main(["serve", "rollback", "--mlflow-uri", registry.tracking_uri]) == 1
    err = capsys.readouterr().err
    assert "cannot roll back" in err and len(err.strip().splitlines()) == 1


def test_bad_overrides_and_missing_options_are_clear(capsys, tmp_path):
    assert main(["serve", "--workdir", str(tmp_path), "poll_s=3"]) == 2      # no bare alias: two sections
    assert "names no section; write serve.poll_s=3" in capsys.readouterr().err
    assert main(["serve", "--workdir", str(tmp_path), "sevre.poll_s=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'sevre'" in err and "sections: serve, bridge" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:       # argparse's own error, one line too
        main(["serve", "--workdir", str(tmp_path), "rolback"])
    assert exc.value.code == 2 and "neither an action (rollback, status, bridge, pause, resume, approve)" in capsys.readouterr().err
    assert main(["serve", "status"]) == 2
    assert "--url" in capsys.readouterr().err
    assert main(["serve", "--workdir", str(tmp_path), "--bridge"]) == 2
    assert "--broker" in capsys.readouterr().err
    # the bridge runs in this process: a broker it cannot reach is named before Ray and Serve start
    from flywheel.base.broker import free_port

    port = free_port()
    assert main(["serve", "--workdir", str(tmp_path), "--bridge", "--broker", f"mqtt://127.0.0.1:{port}"]) == 1
    assert capsys.readouterr().err.strip() == \
        f"flywheel serve: cannot reach broker mqtt://127.0.0.1:{port}: [Errno 111] Connection refused; " \
        "start it (`flywheel broker` runs one) or check --broker"


def test_section_overrides_and_a_config_file_reach_the_app_and_the_bridge(monkeypatch, tmp_path):
    from serve import cli

    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda args, uri, cfg, bcfg: seen.update(uri=uri, cfg=cfg, bcfg=bcfg) or 0)
    monkeypatch.setattr(cli, "_bridge_only", lambda args, bcfg: seen.update(bridge=bcfg, url=args.url) or 0)
    conf = tmp_path / "serve.yaml"
    conf.write_text("serve: {max_batch_size: 16}\nbridge: {cooldown_s: 60}\ntrain: {epochs: 9}\n")
    assert main(["serve", "--workdir", str(tmp_path), "--config", str(conf), "serve.poll_s=5",
                 "bridge.threshold=0.3", "--port", "8123"]) == 0
    assert seen["uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert (seen["cfg"].poll_s, seen["cfg"].max_batch_size, seen["cfg"].http_port) == (5.0, 16, 8123)
    assert (seen["bcfg"].threshold, seen["bcfg"].cooldown_s) == (0.3, 60.0)
    assert main(["serve", "start", "serve.ingress=direct"]) == 0 and seen["cfg"].ingress == "direct"
    assert main(["serve", "bridge", "--url", "http://127.0.0.1:8000", "--broker", "mqtt://127.0.0.1:1884",
                 "bridge.threshold=0.7", "--config", str(conf)]) == 0
    assert (seen["bridge"].threshold, seen["bridge"].cooldown_s, seen["url"]) == (0.7, 60.0, "http://127.0.0.1:8000")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "flywheel serve rollback" in out and "bridge.threshold" in out and "serve.KEY=VALUE" in out
    for action in ("rollback", "status", "bridge"):
        with pytest.raises(SystemExit):
            main(["serve", action, "--help"])
        assert f"usage: flywheel serve {action}" in capsys.readouterr().out


def test_serve_url_host_follows_where_the_driver_runs():
    from serve.handle import serve_http_host

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.7", "Resources": {"CPU": 4.0}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"node:__internal_head__": 1.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"node:__internal_head__": 1.0}}]
    assert serve_http_host("10.9.9.9", nodes, client_mode=True) == "10.9.9.9"     # an explicit bind address
    assert serve_http_host("0.0.0.0", nodes, client_mode=False) == "127.0.0.1"    # on a node: its own proxy
    assert serve_http_host("0.0.0.0", nodes, client_mode=True) == "10.0.0.1"      # Ray Client: the live head
    assert serve_http_host("::", [], client_mode=True) == "127.0.0.1"


def test_replicas_a_local_ray_cannot_place_are_refused_before_it_starts(registry, adapter_dirs, tmp_path):
    """Ray never places them: the app waited until its time to start ran out (3 minutes here), then
    said to give it longer. A process of its own: this one may run the test session's Ray already."""
    import os
    import subprocess
    import sys

    registry.register(adapter_dirs.a, alias="champion")
    cpus = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--workdir", str(tmp_path),
                          "--mlflow-uri", registry.tracking_uri, "serve.ingress=proxy",
                          f"serve.num_replicas={cpus + 1}", "serve.require_signature=false"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"flywheel serve: serve.num_replicas={cpus + 1} at serve.num_cpus_per_replica=1 reserve {cpus + 1} CPUs, "
        f"more than the {cpus} of the local Ray: lower them, or serve on a Ray cluster (--ray-address)"), res.stderr
    assert not list(tmp_path.glob("ray*")) and "Started a local Ray" not in res.stderr


def test_a_gpu_the_machine_does_not_have_is_refused_before_the_local_ray_starts(registry, adapter_dirs, tmp_path):
    """A replica reserving one GPU more than torch sees here waited for good; one on serve.device=cuda
    on a machine without a GPU failed only after Ray and Serve had started."""
    import os
    import subprocess
    import sys

    import torch

    registry.register(adapter_dirs.a, alias="champion")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--workdir", str(tmp_path),
                          "--mlflow-uri", registry.tracking_uri, f"serve.num_gpus_per_replica={gpus + 1}",
                          "serve.require_signature=false"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"flywheel serve: serve.device=auto, serve.num_gpus_per_replica={gpus + 1} x 1 replica(s), but this machine "
        f"has {gpus} CUDA GPU(s): use serve.device=auto and serve.num_gpus_per_replica=0, or serve on a Ray cluster "
        "with GPU nodes (--ray-address)"), res.stderr
    assert "Started a local Ray" not in res.stderr
