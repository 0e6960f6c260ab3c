"""A broker that picks its own port picks another when the first is taken; a port the user gave is not changed."""

import socket

import pytest

from flywheel.base import broker as broker_mod
from flywheel.base.broker import BrokerError, EmbeddedBroker, free_port, port_open


@pytest.fixture
def held_port():
    """A port that a socket holds without listening: what a client's ephemeral port looks like."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _picks(monkeypatch, *first):
    """The broker's port picks: ``first`` in order, then free ports as usual."""
    queue = list(first)
    monkeypatch.setattr(broker_mod, "free_port", lambda host="127.0.0.1": queue.pop(0) if queue else free_port(host))


def test_a_picked_port_held_by_another_socket_is_given_up_for_another(monkeypatch, held_port, tmp_path):
    _picks(monkeypatch, held_port)
    b = EmbeddedBroker(prefer="mosquitto", data_dir=tmp_path)
    assert b.port == held_port
    with b:
        assert b.port != held_port and port_open(b.host, b.port)
        port = b.port
        b.restart()                       # its clients know this port: a restart keeps it
        assert b.port == port and port_open(b.host, port)


def test_a_picked_port_taken_between_the_check_and_mosquittos_bind_is_given_up(monkeypatch, held_port, tmp_path):
    # the kernel may hand the port out after the check: Mosquitto's own "Address already in use" counts too
    _picks(monkeypatch, held_port)
    monkeypatch.setattr(broker_mod, "port_bindable", lambda host, port: True)
    with EmbeddedBroker(prefer="mosquitto", data_dir=tmp_path) as b:
        assert b.port != held_port and port_open(b.host, b.port)
    assert "Address already in use" in (tmp_path / "mosquitto.log").read_text()


def test_a_port_the_user_gave_is_never_changed(held_port, tmp_path):
    with pytest.raises(BrokerError, match=f"port {held_port} on 127.0.0.1 is already in use; pick another with --port"):
        EmbeddedBroker(port=held_port, prefer="mosquitto", data_dir=tmp_path).start()


def test_after_three_taken_picks_the_broker_says_so(monkeypatch, tmp_path):
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        _picks(monkeypatch, *(s.getsockname()[1] for s in socks))
        with pytest.raises(BrokerError, match=f"port {socks[-1].getsockname()[1]} on 127.0.0.1 is already in use"):
            EmbeddedBroker(prefer="mosquitto", data_dir=tmp_path).start()
    finally:
        for s in socks:
            s.close()
