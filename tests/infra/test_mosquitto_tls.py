"""The broker's TLS listener: the stack verifies the server, refuses strangers' certificates.

A throwaway CA and server certificate come from infra/mosquitto/make_certs.py (the tool the
README tells operators to use); Mosquitto runs the production config (see conftest.py).
"""

from __future__ import annotations

import stat

import pytest

from flywheel.base.mqtt import BrokerURL, ConnectError, connect, make_client


def test_stack_connects_over_tls_and_verifies_the_server(secured_broker, inbox_factory):
    url = secured_broker.url("serve", tls=True)
    parsed = BrokerURL.parse(url)
    assert parsed.tls and parsed.ca_file == str(secured_broker.ca)
    watcher = inbox_factory(secured_broker.url("operator", tls=True), "op-tls")
    assert watcher.subscribe("factory/+/+/command") == 1
    serve = inbox_factory(url, "serve-tls")
    sock = serve.client.socket()
    # the session really is TLS, with a verified peer certificate naming the host we dialled
    peer = sock.getpeercert()
    assert peer and ("DNS", "localhost") in peer["subjectAltName"], peer
    assert sock.version() in ("TLSv1.2", "TLSv1.3")
    serve.publish("factory/l1/m1/command", b'{"probe": "tls"}')
    assert watcher.wait_for(lambda m: any(t == "factory/l1/m1/command" for t, _p, _r in m))


def test_certificate_from_another_ca_is_refused(secured_broker, tmp_path, make_certs):
    make_certs(tmp_path / "other", "localhost")
    url = (f"mqtts://serve:{secured_broker.passwords['serve']}@localhost:{secured_broker.tls_port}"
           f"?ca={tmp_path / 'other' / 'ca.pem'}")
    client = make_client(url, prefix="untrusted")
    with pytest.raises(ConnectError, match="certificate verify failed") as exc:
        connect(client, url, timeout=5)
    assert secured_broker.passwords["serve"] not in str(exc.value)
    assert "mqtts://serve:***@localhost" in str(exc.value)


def test_system_trust_store_does_not_trust_a_private_ca(secured_broker):
    """Without ``?ca=`` the system store is used, which has never heard of our CA."""
    url = f"mqtts://serve:{secured_broker.passwords['serve']}@localhost:{secured_broker.tls_port}"
    with pytest.raises(ConnectError, match="certificate verify failed"):
        connect(make_client(url, prefix="nostore"), url, timeout=5)


def test_tls_listener_does_not_speak_plain_mqtt(secured_broker):
    url = f"mqtt://serve:{secured_broker.passwords['serve']}@127.0.0.1:{secured_broker.tls_port}"
    with pytest.raises(ConnectError):
        connect(make_client(url, prefix="plain-on-tls"), url, timeout=1)


def test_make_certs_keeps_private_keys_private(tmp_path, make_certs):
    make_certs(tmp_path, "mosquitto", "10.0.0.7")
    for name in ("ca.key", "server.key"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mosquitto"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
