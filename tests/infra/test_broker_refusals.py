"""A broker that is there but refuses the command's client is named before Ray starts.

The commands that start Ray on this machine for clients of the broker (``flywheel ingest``,
``flywheel run``, ``flywheel serve --bridge``) first connect to it with the URL's user, password
and TLS (``flywheel.base.mqtt.check_reachable``). A wrong password, a CA the client does not
trust, plain MQTT to the TLS port or TLS files that do not read used to be found only by the
collectors, the plant or the bridge, after Ray (and for a campaign MLflow, the lake and the
store) had started. Each run here is a subprocess with ``RAY_TMPDIR`` pointing at a folder that
a Ray started by it would make. The broker is Mosquitto on the production config (conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flywheel.campaign import default_config_path


def _flywheel(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")          # where a Ray started by the command would write
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *argv, "--workdir", str(tmp_path / "wd")],
                          capture_output=True, text=True, env=env, timeout=120)


COMMANDS = {"ingest": ["ingest"],
            "run": ["run", "--config", str(default_config_path("tiny")), "--no-live"],
            "serve": ["serve", "--bridge"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_wrong_password_is_named_before_ray_starts(secured_broker, tmp_path, command):
    url = secured_broker.url("ingest", "not-the-password")
    done = _flywheel(tmp_path, *COMMANDS[command], "--broker", url)
    said = done.stderr.strip().splitlines()
    assert done.returncode == 1 and said[-1:] == [
        f"flywheel {command}: broker mqtt://ingest:***@127.0.0.1:{secured_broker.plain_port} refused the "
        "connection: Not authorized; check the user and password in the broker URL"], done
    assert "not-the-password" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ray").exists(), "a Ray was started for a broker that refuses the client"
    made = {p.name for p in (tmp_path / "wd").iterdir()} if (tmp_path / "wd").exists() else set()
    # ingest makes its lake's folder first (one it cannot make is a usage error, said before the network)
    assert not made & ({"mlflow.db"} if command == "ingest" else {"lake", "mlflow.db"}), made


def test_tls_mistakes_are_each_named_with_their_fix(secured_broker, tmp_path):
    pw = secured_broker.passwords["ingest"]
    tls = f"localhost:{secured_broker.tls_port}"
    cases = [   # (broker URL, what the one line must say)
        (f"mqtts://ingest:{pw}@{tls}",                     # no ?ca=: the system store, which lacks our CA
         "certificate verify failed: self-signed certificate in certificate chain (_ssl.c:"),
        (f"mqtt://ingest:{pw}@{tls}",                      # plain MQTT to the TLS listener
         "closed the connection before accepting it (Unspecified error); check mqtt:// vs mqtts:// and the port"),
        (f"mqtts://ingest:{pw}@127.0.0.1:{secured_broker.plain_port}?ca={secured_broker.ca}",   # TLS to plain
         f"cannot reach broker mqtts://ingest:***@127.0.0.1:{secured_broker.plain_port}: "),   # reset, or EOF
        (f"mqtts://ingest:{pw}@{tls}?ca={tmp_path / 'no-such-ca.pem'}",
         "cannot use the TLS files of broker mqtts://ingest:***@localhost"),
    ]
    fixes = ["check ?ca= in the broker URL (the CA that signed the broker's certificate) and its host name",
             "check mqtt:// vs mqtts:// and the port", "check mqtt:// vs mqtts:// and the port",
             "check ?ca=, ?cert= and ?key= in the broker URL"]
    for (url, words), fix in zip(cases, fixes):
        done = _flywheel(tmp_path, "ingest", "--broker", url)
        said = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(said) == 1 and said[0].startswith("flywheel ingest: "), done
        assert words in said[0] and said[0].endswith(fix), said
        assert pw not in done.stderr
    assert not (tmp_path / "ray").exists(), "a Ray was started for a broker the client cannot use"


def test_the_right_credentials_pass_the_check_and_leave_nothing_on_the_broker(secured_broker, inbox_factory):
    """The check is a clean session ended with a DISCONNECT: no will, no retained message, no session."""
    from flywheel.base.mqtt import check_reachable

    watcher = inbox_factory(secured_broker.url("operator", secured_broker.passwords["operator"]), prefix="watch")
    watcher.subscribe("#")
    check_reachable(secured_broker.url("ingest", secured_broker.passwords["ingest"]))
    check_reachable(secured_broker.url("serve", secured_broker.passwords["serve"], tls=True))
    assert not watcher.wait_for(lambda msgs: msgs, 0.5), watcher.topics()
