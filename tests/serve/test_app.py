"""The Ray Serve app over HTTP: predictions, OpenAPI, named adapters, bad input, limits (real Ray, MLflow, MiniLM).

Two apps: the session's ``served`` (default config, continuous batching) and ``limited``
(Ray's ``@serve.batch``, small limits, version details on) to show that configured limits
are the ones enforced and published.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flywheel.base.contract import LABELS
from flywheel.base.features import render
from serve.client import ServeClient

PUMP = [{"vibration_mm_s": 2.0 + 0.3 * i, "bearing_temp_k": 331.0, "discharge_pressure_bar": 5.9,
         "motor_current_a": 20.5} for i in range(8)]


LONG_NAMES = {f"{'n' * 58}_{i:02d}_x": 1.0 for i in range(64)}   # 64 names, the cap, rendering > 4000 chars
POISON = b'{"windows": [{"text": "pump. vib \\ud800 high."}]}'    # JSON-valid; no UTF-8 holds it


@pytest.fixture(scope="module")
def app(served):
    return served


@pytest.fixture(scope="module")
def limited(ray_local, registry, adapter_dirs):
    from serve import ServeConfig, start_serving

    registry.register(adapter_dirs.a, alias="champion")
    cfg = ServeConfig(app_name="serve-limits", route_prefix="/serve-limits", poll_s=0, num_cpus_per_replica=0,
                      batching="ray", max_text_chars=300, max_windows_per_request=8, max_readings_per_window=16,
                      max_body_bytes=16 * 1024, version_details=True, drain_check_s=0.25)
    h = start_serving(registry.tracking_uri, registry.model_name, "champion", cfg)
    yield h
    h.shutdown()


def _sum1(probs: dict) -> bool:
    return list(probs) == list(LABELS) and abs(sum(probs.values()) - 1) < 1e-4


def test_text_and_readings_windows_agree(app):
    c = ServeClient(app.url)
    text = render("pump", PUMP)
    out = c.predict([{"text": text}, {"kind": "pump", "readings": PUMP}])
    assert out["model_version"] == "1"
    p_text, p_read = out["predictions"]
    assert _sum1(p_text["probs"]) and p_text["model_version"] == "1" and p_text["adapter"] == "default"
    # The server renders readings with the same featurisation, so both windows are one input.
    assert p_text["probs"] == pytest.approx(p_read["probs"], abs=1e-6)
    assert p_text["risk"] == pytest.approx(1 - p_text["probs"]["ok"])
    single = c.call("POST", "/predict", {"text": text})   # a bare window is a request too
    assert single["predictions"][0]["probs"] == pytest.approx(p_text["probs"], abs=1e-5)


def test_openapi_docs_health_version(app):
    c = ServeClient(app.url)
    spec = c.call("GET", "/openapi.json")
    assert {"/predict", "/health", "/version", "/refresh"} <= set(spec["paths"])
    status, page = c.request("GET", "/docs")
    assert status == 200 and "swagger" in str(page).lower()
    assert c.health() == {"status": "ok", "version": "1"}
    v = c.version()
    assert v["version"] == "1" and v["adapters"]["pump"]["version"] == "2" and v["base_model"] == "minilm"
    from finetune.model import pick_device

    assert v["precision"] == pick_device("cpu", "auto").precision   # serve.precision=auto, on this CPU
    assert app.version() == "1"
    # /version is unauthenticated: by default it names versions, not run ids, process or config.
    assert not {"pid", "config", "replica"} & set(v) and "run_id" not in v["adapters"]["default"]
    assert v["limits"]["max_body_bytes"] == 4 * 1024 * 1024 and v["limits"]["max_names_per_reading"] == 64


def test_named_adapters_in_one_mixed_batch(app):
    c = ServeClient(app.url)
    text = render("pump", PUMP)
    out = c.predict([{"text": text}, {"text": text, "adapter": "pump"}])
    d, p = out["predictions"]
    assert (d["adapter"], d["model_version"]) == ("default", "1")
    assert (p["adapter"], p["model_version"]) == ("pump", "2")
    assert out["model_version"] == "1,2"
    # The two adapters were trained towards different labels: their outputs differ.
    assert d["probs"]["TWF"] > p["probs"]["TWF"] and p["probs"]["BRG"] > d["probs"]["BRG"]
    # Concurrent requests for either adapter are batched together and stay per-adapter correct.
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda i: ServeClient(app.url).predict([{"text": text}],
                                                                   adapter="pump" if i % 2 else None), range(32)))
    for i, o in enumerate(outs):
        ref = p if i % 2 else d
        assert o["predictions"][0]["probs"] == pytest.approx(ref["probs"], abs=1e-4)


BAD_BODIES = [
    (b"{not json", 422),
    (b"[]", 422),
    (json.dumps({"windows": []}), 422),
    (json.dumps({"windows": [{"text": ""}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": []}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [{"vibration_mm_s": "2.0"}]}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [{"vibration_mm_s": None}]}]}), 422),
    (b'{"windows": [{"kind": "pump", "readings": [{"vibration_mm_s": NaN}]}]}', 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [{}]}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [{"Bad Name": 1.0}]}]}), 422),
    (json.dumps({"windows": [{"kind": "lathe", "readings": [{"vibration_mm_s": 1.0}]}]}), 422),
    # physically impossible, as the wire contract has it for telemetry on MQTT
    (json.dumps({"windows": [{"kind": "pump", "readings": [{"bearing_temp_k": -330.0}]}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [{"vibration_mm_s": 2.0}, {"vibration_mm_s": -2.0}]}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": {"vibration_mm_s": 1.0}}]}), 422),
    (json.dumps({"windows": [{"text": "pump. vib 2.0 normal flat.", "extra": 1}]}), 422),
    (json.dumps({"windows": [{"text": "pump. vib 2.0 normal flat."}], "adapter": "nope"}), 404),
    (json.dumps({"windows": [{"text": "x" * 5000}]}), 422),
    (json.dumps({"windows": [{"text": "pump."}] * 1025}), 413),
    (b'{"windows": [{"text": "pump. \xff"}]}', 400),                         # not UTF-8
    (POISON, 422),
    (b'{"windows": [{"text": "pump.", "\\udfff": 1}]}', 422),               # a lone surrogate in a key
    (b'{"windows": [{"kind": "pump", "readings": [{"vib\\ud800": 1.0}]}]}', 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [{**LONG_NAMES, "one_more": 1.0}]}]}), 422),
    (json.dumps({"windows": [{"kind": "pump", "readings": [LONG_NAMES]}]}), 422),
]


@pytest.mark.parametrize("body,status", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_input_is_4xx_with_a_reason(app, body, status):
    c = ServeClient(app.url)
    got, payload = c.request("POST", "/predict", body.encode() if isinstance(body, str) else body)
    assert got == status, payload
    assert payload["detail"], payload


def test_replica_survives_bad_input(app):
    c = ServeClient(app.url)
    for body, _ in BAD_BODIES:
        c.request("POST", "/predict", body.encode() if isinstance(body, str) else body)
    assert c.health()["status"] == "ok"
    assert c.predict([{"text": "pump. vib 2.0 normal flat."}])["model_version"] == "1"
    assert c.version()["version"] == "1"


def test_bad_input_details_name_the_window_and_the_position(app):
    c = ServeClient(app.url)
    status, out = c.request("POST", "/predict", b'{"windows": [{"text": "pump."}, {"text": "pump. vib \\ud800."}]}')
    assert status == 422 and "windows[1].text" in out["detail"] and "character 10" in out["detail"] \
        and "U+D800" in out["detail"], out
    status, out = c.request("POST", "/predict", json.dumps(
        {"windows": [{"kind": "pump", "readings": [PUMP[0], {**LONG_NAMES, "one_more": 1.0}]}]}).encode())
    assert status == 422 and "windows[0].readings[1] has 65 names; the limit is 64" in out["detail"], out
    status, out = c.request("POST", "/predict", json.dumps({"windows": [{"kind": "pump", "readings": [LONG_NAMES]}]}
                                                           ).encode())
    assert status == 422 and "windows[0] renders to" in out["detail"] and "the limit is 4000" in out["detail"], out
    status, out = c.request("POST", "/predict", b'{"windows": [{"text": "pump. \xff"}]}')
    assert status == 400 and "not UTF-8 (byte 29" in out["detail"], out
    status, out = c.request("POST", "/predict", json.dumps(
        {"windows": [{"kind": "pump", "readings": [PUMP[0], {**PUMP[0], "bearing_temp_k": -330.0}]}]}).encode())
    assert status == 422 and out["detail"] == ("windows[0].readings[1].bearing_temp_k is -330, physically "
                                               "impossible: expected 0..2000 for its unit"), out


@pytest.mark.parametrize("which", ["served", "limited"])
def test_a_poisoned_request_fails_alone_among_concurrent_good_ones(app, limited, http_probe, which):
    # Both batching paths: continuous (served) and Ray's @serve.batch (limited).
    url = (app if which == "served" else limited).url
    good = {"windows": [{"text": render("pump", PUMP)}]}
    two = b'{"windows": [{"text": "pump. vib 2.0 normal flat."}, {"text": "pump.\\udc00"}]}'
    goods, bads = http_probe.poison_among_good(url, good, [POISON, two, POISON], n_good=48)
    assert [s for s, _ in goods] == [200] * 48, [p for s, p in goods if s != 200][:3]
    ref = goods[0][1]["predictions"][0]["probs"]
    assert all(p["predictions"][0]["probs"] == pytest.approx(ref, abs=1e-4) for _, p in goods)
    assert [s for s, _ in bads] == [422, 422, 422]
    assert "windows[0].text" in bads[0][1]["detail"] and "character 10" in bads[0][1]["detail"]
    assert "windows[1].text" in bads[1][1]["detail"] and "character 5" in bads[1][1]["detail"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(app, limited, http_probe):
    # 50 MB announced, 1 KiB sent and the rest never: a server reading the body first would
    # wait for it until the timeout; this one answers 413 at once, through Ray Serve's proxy.
    start = time.monotonic()
    status, out = http_probe.post_unfinished_body(app.url, "/predict", sent=b'{"windows": [' + b" " * 1000,
                                                  declared=50_000_000, timeout_s=30)
    assert status == 413 and "50000000 bytes; the limit is 4194304" in out["detail"], out
    assert time.monotonic() - start < 15
    # A chunked body has no length to check: it is counted as it arrives, refused once over.
    status, out = http_probe.post_unfinished_body(limited.url, "/predict", sent=b" " * 24 * 1024, timeout_s=30)
    assert status == 413 and "over 16384 bytes" in out["detail"], out
    # Any endpoint: the limit is on the body, not on /predict.
    status, out = http_probe.post_unfinished_body(limited.url, "/refresh", sent=b"x", declared=10**9)
    assert status == 413, out
    # The replica is fine, and a body within the limit still works.
    assert ServeClient(limited.url).predict([{"text": "pump. vib 2.0 normal flat."}])["predictions"]


def test_configured_limits_are_enforced_and_published(app, limited):
    d, lim = ServeClient(app.url), ServeClient(limited.url)

    def limits(spec):
        s = spec["components"]["schemas"]
        text, readings = s["TextWindow"]["properties"]["text"], s["ReadingsWindow"]["properties"]["readings"]
        windows = s["PredictRequest"]["properties"]["windows"]
        return (text["minLength"], text["maxLength"], readings["minItems"], readings["maxItems"],
                readings["items"]["maxProperties"], windows["minItems"], windows["maxItems"])

    spec = d.call("GET", "/openapi.json")
    assert limits(spec) == (1, 4000, 1, 512, 64, 1, 1024)
    assert limits(lim.call("GET", "/openapi.json")) == (1, 300, 1, 16, 64, 1, 8)
    # Every error status the API answers with is documented, with its body's shape.
    assert {"400", "404", "413", "422", "500"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    for path in ("/health", "/version", "/refresh"):
        assert "413" in next(iter(spec["paths"][path].values()))["responses"], path
    assert "16384 bytes" in lim.call("GET", "/openapi.json")["paths"]["/predict"]["post"]["responses"]["413"][
        "description"]

    status, out = lim.request("POST", "/predict", {"windows": [{"text": "pump. " + "x" * 300}]})
    assert status == 422 and "the limit is 300" in out["detail"], out
    status, out = lim.request("POST", "/predict", {"windows": [{"text": "pump."}] * 9})
    assert status == 413 and "the limit is 8" in out["detail"], out
    status, out = lim.request("POST", "/predict", {"windows": [{"kind": "pump", "readings": PUMP * 3}]})
    assert status == 422 and "24 readings; the limit is 16" in out["detail"], out
    wide = [{f"reading_{i:02d}_of_a_long_name_k": 300.0 + i for i in range(12)}] * 2
    status, out = lim.request("POST", "/predict", {"windows": [{"kind": "pump", "readings": wide}]})
    assert status == 422 and "renders to" in out["detail"] and "the limit is 300" in out["detail"], out


def test_version_details_are_shown_only_when_configured(limited):
    v = ServeClient(limited.url).version()
    assert v["pid"] > 0 and v["replica"] and v["config"]["max_body_bytes"] == 16 * 1024
    assert v["adapters"]["default"]["run_id"]


def test_the_replicas_check_for_requests_in_flight_as_often_as_configured(app, limited, registry):
    """A stopping replica waits ``drain_check_s`` between its checks for requests in flight (Ray's
    ``graceful_shutdown_wait_loop_s``): the default (0.1 s, where Ray waits 2 s) or the app's own,
    whether started by ``start_serving`` or by ``serve run serve.app:build_app`` (KubeRay)."""
    from ray import serve as ray_serve
    from ray.serve.context import _get_global_client

    from serve import ServeConfig
    from serve.app import build_app
    from serve.handle import delete_app

    ray_serve.run(build_app({"tracking_uri": registry.tracking_uri, "model_name": registry.model_name,
                             "config": {"poll_s": 0, "num_cpus_per_replica": 0, "drain_check_s": 0.5}}),
                  name="serve-built", route_prefix="/serve-built")
    try:
        client = _get_global_client()
        loops = {name: client.get_deployment_info("FaultDetector", name)[0].deployment_config.graceful_shutdown_wait_loop_s
                 for name in ("serve-tests", "serve-limits", "serve-built")}
    finally:
        delete_app("serve-built")
    assert loops == {"serve-tests": ServeConfig().drain_check_s, "serve-limits": 0.25, "serve-built": 0.5}


def test_limit_config_errors_are_clear():
    from flywheel.base.config import ConfigError
    from serve import ServeConfig

    with pytest.raises(ConfigError, match="max_body_bytes should be >= 1024"):
        ServeConfig(max_body_bytes=100)
    with pytest.raises(ConfigError, match="max_text_chars should be >= 1"):
        ServeConfig(max_text_chars=0)
    with pytest.raises(ConfigError, match="max_readings_per_window should be >= 1"):
        ServeConfig(max_readings_per_window=0)
    with pytest.raises(ConfigError, match="drain_check_s should be > 0"):
        ServeConfig(drain_check_s=0)
