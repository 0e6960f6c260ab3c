"""Fixtures of the ingest tests: a deterministic plant stream, a QoS 1 publisher, unique names.

The helper modules beside this file (``ingest_plantgen``, ``ingest_strategies``) are put on
``sys.path`` so test modules can import them at collection time (hypothesis strategies
must exist when ``@given`` decorates a test).
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def uid():
    """A short unique name: topic roots and client-id prefixes that no other test shares."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def publish():
    """publish(url, [(topic, payload), ...]) -> the indices the broker acknowledged (QoS 1)."""
    from flywheel.base.mqtt import connect, make_client

    clients = []

    def run(url, items, *, qos=1, timeout_s=60.0):
        client = make_client(url, prefix="ingest-test-pub")
        connect(client, url)
        clients.append(client)
        infos = []
        # Chunks: paho re-scans its whole outgoing queue on every PUBACK past its in-flight
        # window, so a flood of queued QoS 1 messages slows to a crawl.
        for start in range(0, len(items), 500):
            chunk = [client.publish(t, p, qos=qos) for t, p in items[start:start + 500]]
            for info in chunk:
                info.wait_for_publish(timeout_s)
            infos.extend(chunk)
        return [i for i, info in enumerate(infos) if info.is_published()]

    yield run
    for c in clients:
        c.disconnect()
        c.loop_stop()
