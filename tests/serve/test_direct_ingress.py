"""``serve.ingress=direct``: the replica answers HTTP on its own port, without Ray Serve's proxy.

Ray reads the switch from its processes' environment when the cluster starts, so the
end-to-end test runs ``flywheel serve`` as a user would, in its own process with its own
local Ray (the test session's Ray runs without it, which the first test uses).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from serve.client import ServeClient, ServeHTTPError


def test_a_cluster_without_direct_ingress_is_named_and_nothing_is_deployed(ray_local, registry, adapter_dirs):
    from ray import serve as ray_serve

    from serve import ServeConfig, start_serving
    from serve.source import ServeError

    registry.register(adapter_dirs.a)
    cfg = ServeConfig(app_name="direct-refused", route_prefix="/direct-refused", ingress="direct", poll_s=0,
                      num_cpus_per_replica=0)
    with pytest.raises(ServeError, match="RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    try:
        apps = ray_serve.status().applications
    except Exception:  # noqa: BLE001 - Serve may not run at all in this session yet
        apps = {}
    assert "direct-refused" not in apps


def test_a_campaign_asking_for_direct_ingress_on_such_a_cluster_stops_before_the_plant_runs(ray_local, tmp_path):
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import CampaignError, run_campaign

    cfg = load_campaign(str(default_config_path("tiny")), ["campaign=direct-refused", "serve.ingress=direct"])
    with pytest.raises(CampaignError, match="RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        run_campaign(cfg, tmp_path, view=False)
    assert ray_local.is_initialized()          # the session's Ray was not the campaign's to stop


def test_a_local_setting_that_turns_direct_ingress_off_is_named(ray_local, monkeypatch):
    from serve import ServeConfig
    from serve.handle import check_ingress
    from serve.source import ServeError

    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")   # wins over what flywheel would set
    with pytest.raises(ServeError, match="this environment sets RAY_SERVE_ENABLE_DIRECT_INGRESS='0'"):
        check_ingress(ServeConfig(ingress="direct"))
    check_ingress(ServeConfig(ingress="proxy"))                 # the proxy needs nothing


def test_direct_ingress_config_errors_are_clear():
    from flywheel.base.config import ConfigError
    from serve import ServeConfig

    with pytest.raises(ConfigError, match="proxy or direct"):
        ServeConfig(ingress="haproxy")
    with pytest.raises(ConfigError, match="one replica"):
        ServeConfig(ingress="direct", num_replicas=2)


def _read_lines(proc: subprocess.Popen, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))


def test_flywheel_serve_with_direct_ingress_serves_swaps_and_stops(registry, adapter_dirs, tmp_path, http_probe):
    v1 = registry.register(adapter_dirs.a)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_SERVE_") and k not in ("RAY_ADDRESS",)}
    env.update(COLUMNS="400", PYTHONUNBUFFERED="1")   # no wrapped lines from rich on a pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "serve", "--workdir", str(tmp_path), "--mlflow-uri",
         registry.tracking_uri, "--ray-address", "local", "serve.ingress=direct", "serve.poll_s=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        urls = None
        while urls is None:
            for line in list(lines):
                m = re.search(r"direct ingress: the replica answers at (\S+); Ray Serve's proxy at (\S+)", line)
                if m:
                    urls = m.group(1), m.group(2)
            assert proc.poll() is None, "flywheel serve exited:\n" + "\n".join(lines[-30:])
            assert time.monotonic() < deadline, "no direct-ingress URL printed:\n" + "\n".join(lines[-30:])
            time.sleep(0.2)
        direct, proxy = urls
        assert direct.rsplit(":", 1)[1] != proxy.rsplit(":", 1)[1]     # its own port, not the proxy's

        c = ServeClient(direct)
        out = c.predict([{"text": "pump. vib 2.1 steady."}, {"readings": [{"vibration_mm_s": 2.0}], "kind": "pump"}])
        assert out["model_version"] == v1 and len(out["predictions"]) == 2
        assert ServeClient(proxy).predict([{"text": "pump. vib 2.1 steady."}])["model_version"] == v1
        with pytest.raises(ServeHTTPError) as bad:          # bad input: 4xx with a reason on this path too
            c.call("POST", "/predict", {"windows": [{"readings": []}]})
        assert 400 <= bad.value.status < 500
        # The replica's own HTTP server: a poisoned window fails alone among concurrent good
        # ones, and a body over the limit is refused before it is read, as through the proxy.
        poison = b'{"windows": [{"text": "pump. vib \\ud800 high."}]}'
        goods, bads = http_probe.poison_among_good(direct, {"windows": [{"text": "pump. vib 2.1 steady."}]},
                                                   [poison, poison], n_good=30, workers=10)
        assert [s for s, _ in goods] == [200] * 30 and [s for s, _ in bads] == [422, 422], bads
        assert "character 10" in bads[0][1]["detail"]
        status, out = http_probe.post_unfinished_body(direct, "/predict", sent=b"{" + b" " * 1000,
                                                      declared=50_000_000, timeout_s=30)
        assert status == 413 and "the limit is" in out["detail"], out
        assert c.health()["status"] == "ok"

        v2 = registry.register(adapter_dirs.b)               # the alias moves; a refresh swaps it in
        assert c.refresh()["version"] == v2
        assert c.predict([{"text": "pump. vib 2.1 steady."}])["model_version"] == v2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(timeout=5)
    assert rc == 0, "\n".join(lines[-30:])
    assert "stopping" in "\n".join(lines)
