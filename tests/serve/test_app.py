"""The Ray Serve app over HTTP: predictions, OpenAPI, named adapters, bad input (real Ray, MLflow, MiniLM)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from flywheel.contract import LABELS
from flywheel.features import render
from serve.client import ServeClient

PUMP = [{"vibration_mm_s": 2.0 + 0.3 * i, "bearing_temp_k": 331.0, "discharge_pressure_bar": 5.9,
         "motor_current_a": 20.5} for i in range(8)]


@pytest.fixture(scope="module")
def app(served):
    return served


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
    assert app.version() == "1"


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
    (json.dumps({"windows": [{"kind": "pump", "readings": {"vibration_mm_s": 1.0}}]}), 422),
    (json.dumps({"windows": [{"text": "pump. vib 2.0 normal flat.", "extra": 1}]}), 422),
    (json.dumps({"windows": [{"text": "pump. vib 2.0 normal flat."}], "adapter": "nope"}), 404),
    (json.dumps({"windows": [{"text": "x" * 5000}]}), 422),
    (json.dumps({"windows": [{"text": "pump."}] * 1025}), 413),
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
    assert c.version()["replica"] is not None
