"""``flywheel serve`` sub-commands that need no running app: rollback, argument errors, help."""

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
    assert main(["serve", "--workdir", str(tmp_path), "poll_s=3"]) == 2
    assert "serve. or bridge." in capsys.readouterr().err
    assert main(["serve", "status"]) == 2
    assert "--url" in capsys.readouterr().err
    assert main(["serve", "--workdir", str(tmp_path), "--bridge"]) == 2
    assert "--broker" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "flywheel serve rollback" in out and "bridge.threshold" in out


def test_serve_url_host_follows_where_the_driver_runs():
    from serve.handle import serve_http_host

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.7", "Resources": {"CPU": 4.0}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"node:__internal_head__": 1.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"node:__internal_head__": 1.0}}]
    assert serve_http_host("10.9.9.9", nodes, client_mode=True) == "10.9.9.9"     # an explicit bind address
    assert serve_http_host("0.0.0.0", nodes, client_mode=False) == "127.0.0.1"    # on a node: its own proxy
    assert serve_http_host("0.0.0.0", nodes, client_mode=True) == "10.0.0.1"      # Ray Client: the live head
    assert serve_http_host("::", [], client_mode=True) == "127.0.0.1"
