"""Two deployments under one Serve application name: Serve replaces the running one, so on a
shared cluster a second campaign or ``flywheel serve`` with the default ``serve.app_name`` took
over the first one's endpoint, and the first campaign's plant took orders from the other's model.
A start over an app that serves another registry or model is refused; over its own (left by a
run that did not end), it replaces it."""

from __future__ import annotations

import pytest

from serve import ServeConfig, ServeError, start_serving


def test_a_start_over_another_registrys_app_is_refused_and_that_app_keeps_serving(served, registry, adapter_dirs):
    registry.register(adapter_dirs.b, alias="champion")
    cfg = ServeConfig(app_name=served.app_name, route_prefix="/taken-over", poll_s=0, num_cpus_per_replica=0)
    with pytest.raises(ServeError) as err:
        start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    msg = str(err.value)
    assert msg.startswith(f"Ray Serve already runs an application named '{served.app_name}' (it serves "
                          f"{served.model_name} from {served.tracking_uri}): deploying under that name would "
                          "replace it. Give this one its own serve.app_name and serve.route_prefix"), msg
    assert served.client.health()["version"] == "1"      # the session's app, untouched


def test_a_start_over_its_own_app_left_running_replaces_it(ray_local, registry, adapter_dirs):
    from ray import serve as ray_serve

    registry.register(adapter_dirs.a, alias="champion")
    cfg = ServeConfig(app_name="left-running", route_prefix="/left-running", poll_s=0, num_cpus_per_replica=0)
    first = start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)   # never shut down: a crash
    second = start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    try:
        assert second.client.health()["status"] == "ok"
        assert list(ray_serve.status().applications).count("left-running") == 1
    finally:
        first.client.close()
        second.shutdown()
