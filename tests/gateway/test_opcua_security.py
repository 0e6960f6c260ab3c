"""OPC UA security between the gateway and a plant: a signed and encrypted channel
(Basic256Sha256) with application certificates, a user name and password, and clear refusals.

Real asyncua server (the simulator with ``PlantSecurity``) and client (the gateway), real
certificates made by ``flywheel.base.opcua_security``, real Mosquitto."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flywheel.base.opcua_security import GATEWAY_URI, PLANT_URI, application_uri_of, make_certificate

from factory_sim.opcua_server import OpcUaPlantServer, PlantSecurity
from factory_sim.plant_tags import gateway_mapping
from gateway import GatewayService, MappingError, load_mapping, parse_mapping

from .conftest import json_path_telemetry, small_plant, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("opcua-certs")
    plant = make_certificate(d / "plant-cert.der", d / "plant-key.pem", PLANT_URI, server=True)
    gw = make_certificate(d / "gateway-cert.der", d / "gateway-key.pem", GATEWAY_URI)
    return {"plant": plant, "gateway": gw, "dir": d}


def _secure_server(seed: int, port: int, certs) -> OpcUaPlantServer:
    cert, key = certs["plant"]
    srv = OpcUaPlantServer(small_plant(seed), port, security=PlantSecurity(str(cert), str(key),
                                                                           users={"gateway": "s3cret"}))
    srv.start()
    return srv


def _mapping(srv, certs, **opcua) -> dict:
    m = gateway_mapping(srv.plant, "opcua", endpoint=srv.endpoint)
    cert, key = certs["gateway"]
    m["opcua"].update({"security": {"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "certificate": str(cert),
                                    "private_key": str(key), "server_certificate": str(certs["plant"][0])},
                       "user": "gateway", "password": "s3cret"})
    m["opcua"].update(opcua)
    return m


def test_the_certificates_carry_the_application_uris(certs):
    assert application_uri_of(certs["plant"][0]) == PLANT_URI
    assert application_uri_of(certs["gateway"][0]) == GATEWAY_URI
    # kept when still valid: the same bytes on a second call
    before = certs["gateway"][0].read_bytes()
    make_certificate(*certs["gateway"], GATEWAY_URI)
    assert certs["gateway"][0].read_bytes() == before


def test_a_secure_plant_gives_the_json_paths_telemetry_through_an_encrypted_channel(broker, inbox, free_port,
                                                                                    tmp_path, certs):
    seed, hours = 3, 3600.0
    reference = json_path_telemetry(broker.url, seed, hours, tmp_path)
    srv = _secure_server(seed, free_port, certs)
    svc = None
    try:
        svc = GatewayService(parse_mapping(_mapping(srv, certs), "secure.yaml"), broker.url, component="gw-secure",
                             reconnect_s=0.3).start()
        wait_for(lambda: svc.gateway.connected, 60, "the gateway's secure session")
        summary = srv.run(hours)
        inbox.wait_quiet()
        assert {t.event_id: t for t in inbox.telemetry} == reference and len(inbox.telemetry) == summary.samples
        assert not svc.counters.get("connect_refused")
    finally:
        if svc is not None:
            svc.stop()
        srv.close()


@pytest.mark.parametrize("case", ["wrong_password", "no_security", "anonymous"])
def test_a_refused_gateway_names_what_to_change_and_publishes_nothing(broker, inbox, free_port, certs, case):
    srv = _secure_server(1, free_port, certs)
    m = _mapping(srv, certs)
    if case == "wrong_password":
        m["opcua"]["password"] = "guess"
        want = "BadUserAccessDenied: the server refused the user name or password: check opcua.user and opcua.password"
    elif case == "no_security":       # the server offers only Basic256Sha256 SignAndEncrypt
        del m["opcua"]["security"]
        want = "no endpoint with security policy None and this mode"
    else:                             # secure channel, but no user: the server accepts user names only
        del m["opcua"]["user"], m["opcua"]["password"]
        want = "BadIdentityToken"
    svc = GatewayService(parse_mapping(m, "refused.yaml"), broker.url, component=f"gw-{case}", reconnect_s=0.3).start()
    try:
        wait_for(lambda: svc.counters.get("connect_refused", 0) >= 1, 60, "the refusal")
        srv.run(600)
        assert want in svc.gateway.last_error, svc.gateway.last_error
        assert "opcua." in svc.gateway.last_error           # names the mapping's key to change
        assert not svc.gateway.connected and svc.counters["published"] == 0 and not inbox.telemetry
    finally:
        svc.stop()
        srv.close()


def test_bad_security_settings_are_refused_with_their_fix(tmp_path, certs, monkeypatch):
    base = gateway_mapping(small_plant(1), "opcua", endpoint="opc.tcp://127.0.0.1:4840/")
    cert, key = certs["gateway"]

    def problems(**opcua) -> str:
        m = {**base, "opcua": {**base["opcua"], **opcua}}
        with pytest.raises(MappingError) as exc:
            parse_mapping(m, str(tmp_path / "m.yaml"))
        return str(exc.value)

    msg = problems(security={"policy": "Basic128Rsa15", "mode": "Encrypt", "certificate": "nope.der",
                             "private_key": str(key)}, password="x")
    assert "opcua.security.policy: 'Basic128Rsa15' is not one of Basic256Sha256, Aes128Sha256RsaOaep" in msg
    assert "opcua.security.mode: 'Encrypt' is not one of Sign, SignAndEncrypt" in msg
    assert f"opcua.security.certificate: '{tmp_path / 'nope.der'}' is not a file" in msg
    assert "flywheel gateway --make-certificate DIR" in msg
    assert "opcua.password: a password needs opcua.user as well" in msg
    monkeypatch.delenv("PLANT_PW", raising=False)
    assert ("opcua.password: environment variable PLANT_PW is not set: export it before starting the gateway"
            in problems(user="gw", password="${PLANT_PW}"))
    # the password from the environment; the certificate paths relative to the mapping file
    monkeypatch.setenv("PLANT_PW", "from-env")
    (tmp_path / "certs").mkdir()
    for f in (cert, key):
        (tmp_path / "certs" / f.name).write_bytes(f.read_bytes())
    ok = {**base, "opcua": {**base["opcua"], "user": "gw", "password": "${PLANT_PW}",
                            "security": {"certificate": f"certs/{cert.name}", "private_key": f"certs/{key.name}"}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(ok))
    m = load_mapping(tmp_path / "m.yaml")
    assert (m.user, m.password) == ("gw", "from-env") and "from-env" not in repr(m)
    assert m.security.certificate == str(tmp_path / "certs" / cert.name)
    assert (m.security.policy, m.security.mode) == ("Basic256Sha256", "SignAndEncrypt")     # the defaults


def test_the_simulator_writes_a_secure_mapping_and_the_gateway_cli_makes_a_certificate(tmp_path, free_port):
    env_less = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_OPCUA_PASSWORD"}
    cmd = [sys.executable, "-m", "flywheel.cli", "sim", "--scenario", "tiny", "--serve-opcua", str(free_port),
           "--opcua-secure", str(tmp_path / "c"), "--duration", "1h", "--speed", "max", "--no-live",
           "--write-mapping", str(tmp_path / "p.yaml")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_less, timeout=120)
    assert r.returncode == 2 and "export FLYWHEEL_OPCUA_PASSWORD=" in r.stderr, r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env_less, "FLYWHEEL_OPCUA_PASSWORD": "pw"})
    assert r.returncode == 0 and "(Basic256Sha256, SignAndEncrypt, user gateway)" in " ".join(r.stdout.split()), r.stderr
    written = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert written["opcua"]["password"] == "${FLYWHEEL_OPCUA_PASSWORD}" and written["opcua"]["user"] == "gateway"
    assert application_uri_of(written["opcua"]["security"]["certificate"]) == GATEWAY_URI
    r = subprocess.run([sys.executable, "-m", "flywheel.cli", "gateway", "--make-certificate", str(tmp_path / "g")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "certificate: " in r.stdout and "trusted certificates" in r.stdout
    assert application_uri_of(tmp_path / "g" / "gateway-cert.der") == GATEWAY_URI
