"""The serving bridge's Ray actor killed mid-period (as an out-of-memory kill would): the campaign
stops within seconds with the bridge's own error naming the fix, where the plant used to wait
``bridge_restart_timeout_s`` (600 s) for a bridge that could not come back; run again, it resumes
the turn and ends where the uninterrupted tiny tree campaign (the session's ``gbdt_campaign``,
same seed and overrides) does.

The moment: a watcher subscribes to the campaign's embedded Mosquitto (its port is in the
workdir's ``broker/mosquitto.conf``) and SIGKILLs the bridge actor's process (``ray::_Host``)
on the first prediction the bridge publishes, i.e. in turn 1's lockstep period.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _host_pids() -> set[int]:
    """Processes whose title is the bridge actor's (Ray names an actor's worker ``ray::<Class>...``)."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/cmdline").read_bytes().startswith(b"ray::_Host"):
                    out.add(int(name))
            except OSError:
                pass
    return out


def _kill_bridge_on_first_prediction(workdir: Path, before: set[int], killed: dict, stop: threading.Event) -> None:
    from flywheel.base.mqtt import make_client

    conf = workdir / "broker" / "mosquitto.conf"
    while not stop.is_set() and not conf.is_file():
        time.sleep(0.1)
    if stop.is_set():
        return
    port = int(re.search(r"^listener (\d+)", conf.read_text(), re.M).group(1))
    seen = threading.Event()
    client = make_client(f"mqtt://127.0.0.1:{port}", prefix="t-bridge-died")
    client.on_message = lambda c, ud, msg: seen.set()
    client.on_connect = lambda c, ud, flags, rc, props: c.subscribe("factory/+/+/prediction", qos=0)
    client.connect_async("127.0.0.1", port)
    client.loop_start()
    try:
        while not stop.is_set() and not seen.wait(0.1):
            pass
        if seen.is_set():
            pids = _host_pids() - before
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.update(at=time.monotonic(), pids=pids)
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.fixture(scope="module")
def died(gbdt_campaign, tmp_path_factory, ray_local):
    from flywheel.loop import run_campaign

    cfg = gbdt_campaign[0]
    workdir = tmp_path_factory.mktemp("e2e-bridge-died")
    killed: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_bridge_on_first_prediction,
                               args=(workdir, _host_pids(), killed, stop), daemon=True)
    watcher.start()
    error = None
    try:
        run_campaign(cfg, workdir, view=False)
    except Exception as exc:  # noqa: BLE001 - what the campaign raised is what is tested
        error = exc
    stopped_at = time.monotonic()
    stop.set()
    watcher.join(10)
    state = run_campaign(cfg, workdir, view=False)
    return killed, error, stopped_at, state


def test_the_campaign_stops_in_seconds_with_the_bridges_own_error(died):
    from serve.bridge import BridgeError

    killed, error, stopped_at, _ = died
    assert killed.get("pids"), "the watcher saw a prediction but found no bridge actor to kill"
    assert isinstance(error, BridgeError), repr(error)
    assert "Ray actor died" in str(error) and "bridge_host=thread" in str(error)
    # the plant's wait for a bridge that went away is bridge_restart_timeout_s = 600 s
    assert stopped_at - killed["at"] < 60, stopped_at - killed["at"]


def test_run_again_it_ends_where_an_uninterrupted_campaign_does(died, gbdt_campaign):
    from tests.e2e.conftest import resumed_essentials

    state = died[3]
    t1 = state["turns"][1]
    assert t1["attempt"] == 2 and [a["stage"] for a in t1["aborted_attempts"]] == ["plant"]
    assert resumed_essentials(state) == resumed_essentials(gbdt_campaign[2])
