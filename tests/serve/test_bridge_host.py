"""The bridge's Ray actor (``serve/bridge_host.py``): what goes wrong in it reaches the campaign as the
bridge's own error, naming the problem, not as Ray's wrapper around a remote traceback. The actor's
working path (a whole campaign's lockstep periods) is every end-to-end campaign's; tests/e2e/test_plant_protocol.py
compares it with the bridge in a thread."""

from __future__ import annotations

import pytest

from tests.conftest import free_port


@pytest.fixture
def host(ray_local, tmp_path):
    from serve.bridge_host import BridgeHost

    h = BridgeHost.start(log_path=tmp_path / "logs" / "bridge.log")
    yield h
    h.close()


def test_a_serve_app_out_of_reach_is_named_by_the_bridges_own_error(host, broker, tmp_path):
    import ray

    from serve import BridgeConfig
    from serve.client import ServeHTTPError

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServeHTTPError) as err:
        host.open(broker.url, url, BridgeConfig(state_dir=""), topic_root="host-test", fresh=True)
    assert not isinstance(err.value, ray.exceptions.RayError)
    assert err.value.status == 0 and f"cannot reach the serve app at {url}" in str(err.value)
    assert (tmp_path / "logs" / "bridge.log").is_file()


def test_a_broker_out_of_reach_is_named_by_the_bridges_own_error(host, json_server):
    """The serve app answers (a stand-in with the app's /version), the broker does not."""
    import ray

    from serve import BridgeConfig

    serve_url, _ = json_server({"model_name": "fault-detector", "version": "1", "adapters": {"default": {
        "version": "1", "featuriser": "numeric-stats/1",
        "window": {"length": 10, "stride_s": 600.0, "horizon_s": 3600.0}}}})
    broker_url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(Exception) as err:
        host.open(broker_url, serve_url, BridgeConfig(state_dir=""), topic_root="host-test", fresh=True)
    assert not isinstance(err.value, ray.exceptions.RayError), repr(err.value)
    assert broker_url.removeprefix("mqtt://") in str(err.value)


def test_a_dead_host_is_named_with_the_fix(host):
    import ray

    from serve import BridgeConfig
    from serve.bridge import BridgeError
    from serve.bridge_host import RemoteBridge

    ray.kill(host._actor, no_restart=True)   # as an OOM kill would
    with pytest.raises(BridgeError, match="bridge_host=thread") as err:
        RemoteBridge(host._actor, BridgeConfig(state_dir=""), None).stats()
    assert "Ray actor died" in str(err.value) and "logs/bridge.log" in str(err.value)
