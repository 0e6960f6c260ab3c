"""Hot swap, refusal of bad adapters, registry polling and rollback on a live Ray Serve app."""

from __future__ import annotations

import threading
import time

import pytest
from ray import serve as ray_serve

from serve import ServeConfig, ServeError, start_serving
from serve.client import ServeClient

TEXT = "pump. vib 3.05 high surging. temp 331 normal flat. pres 5.90 normal flat. cur 20.5 normal flat."


@pytest.fixture(scope="module")
def app(ray_local, registry, adapter_dirs):
    registry.register(adapter_dirs.a, alias="champion")   # v1
    cfg = ServeConfig(app_name="serve-swap-tests", route_prefix="/serve-swap", poll_s=1.0,
                      num_cpus_per_replica=0, max_batch_size=16)
    h = start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    yield h
    h.shutdown()


def test_swap_under_concurrent_requests_fails_nothing_and_changes_the_version(app, registry, adapter_dirs):
    assert app.version() == "1"
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def load(i: int) -> None:
        c = ServeClient(app.url)
        while not stop.is_set():
            try:
                out = c.predict([{"text": TEXT}] * (1 + i))
                seen[i].append(out["model_version"])
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    v2 = registry.register(adapter_dirs.b, alias="champion")
    assert app.refresh() == v2 == "2"
    # Keep the load on until every client has had an answer from the new version (a loaded
    # machine can take seconds per request), then a little longer.
    deadline = time.monotonic() + 60
    while not all(v and v[-1] == "2" for v in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    for versions in seen:
        assert versions and versions[0] == "1" and versions[-1] == "2"
        assert versions == sorted(versions)          # never back to the old version once swapped
    status = app.status()
    assert status["swaps"] >= 2 and status["adapters"]["default"]["version"] == "2"
    assert status["refusals"] == {}


def test_rollback_returns_to_the_previous_champion(app, registry):
    from finetune.registry import rollback_alias

    assert app.version() == "2"
    assert rollback_alias(registry.tracking_uri, registry.model_name, "champion", app.url).endswith(
        "now serves version 1")
    assert app.version() == "1"
    assert ServeClient(app.url).predict([{"text": TEXT}])["model_version"] == "1"


@pytest.mark.parametrize("bad,why", [("corrupt", "cannot be loaded"), ("mismatched", "labels")])
def test_a_bad_champion_is_refused_and_the_old_one_keeps_serving(app, registry, adapter_dirs, bad, why):
    serving = app.version()
    before = ServeClient(app.url).predict([{"text": TEXT}])["predictions"][0]["probs"]
    bad_version = registry.register(getattr(adapter_dirs, bad), alias="champion")
    assert app.refresh() == serving
    refusal = app.status()["refusals"]["default"]
    assert why in refusal["reason"] and refusal["ref"] == "champion"
    out = ServeClient(app.url).predict([{"text": TEXT}])
    assert out["model_version"] == serving != bad_version
    assert out["predictions"][0]["probs"] == pytest.approx(before, abs=1e-5)
    with pytest.raises(TimeoutError, match=why):
        app.wait_for_version(bad_version, timeout_s=1.5)


def test_the_replica_polls_the_registry_without_being_asked(app, registry):
    registry.set_alias("2", "champion")
    c = ServeClient(app.url)
    deadline = time.monotonic() + 30
    while c.version()["version"] != "2":       # no refresh call: the replica's poll swaps it in
        assert time.monotonic() < deadline, "the replica did not pick up the moved alias by polling"
        time.sleep(0.2)
    assert c.predict([{"text": TEXT}])["model_version"] == "2"


def test_start_serving_without_a_registered_model_is_a_clear_error(ray_local, registry):
    with pytest.raises(ServeError, match="flywheel train"):
        start_serving(registry.tracking_uri, "no-such-model", "champion", ServeConfig())


def test_an_app_that_is_not_running_in_time_is_named_with_the_setting_to_raise(app, registry):
    """A replica that takes longer than ``health_timeout_s`` to load: the start says so and names the
    setting, and takes the app away with it (on a cluster it stayed, placing replicas and holding
    their CPUs for a start that had failed)."""
    from ray import serve as ray_serve

    from serve.handle import delete_app

    cfg = ServeConfig(app_name="serve-slow-start", route_prefix="/serve-slow-start", poll_s=0,
                      num_cpus_per_replica=0, health_timeout_s=0.01)
    try:
        with pytest.raises(ServeError, match=r"'serve-slow-start' is still DEPLOYING when its time to start ran out.*"
                                             r"give it longer \(serve.health_timeout_s\)"):
            start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
        assert "serve-slow-start" not in ray_serve.status().applications
    finally:
        delete_app("serve-slow-start")
    assert app.version() in ("1", "2")     # the other app serves on


def test_stopping_the_app_lets_the_requests_in_flight_finish(app):
    """Stopping the app (the end of every campaign) answers the requests the replica holds before it
    goes: the replica checks for them every ``drain_check_s``. Stops the module's app, so it runs last."""
    answers: list[int] = []
    failures: list[str] = []

    def post() -> None:
        try:
            answers.append(len(ServeClient(app.url).predict([{"text": TEXT}] * 256)["predictions"]))
        except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
            failures.append(repr(exc))

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)          # 768 windows in forwards of 16 take several seconds on a CPU
    app.shutdown()
    # it returns once the app is gone (serve.handle.delete_app), not on Serve's once-a-second check
    assert app.app_name not in ray_serve.status().applications
    for t in threads:
        t.join()
    assert failures == [] and answers == [256, 256, 256]
