"""Fixtures shared by the simulator tests."""

from __future__ import annotations

import msgspec
import pytest

from flywheel.base import contract


def _jsonl(messages, root: str = "factory") -> bytes:
    topics = contract.Topics(root)
    enc = msgspec.json.Encoder()
    return b"".join(enc.encode({"topic": topics.for_message(m), "payload": contract.to_dict(m)}) + b"\n"
                    for m in messages)


@pytest.fixture
def to_jsonl():
    """to_jsonl(messages) -> bytes in the --out file format ({"topic", "payload"} a line)."""
    return _jsonl


@pytest.fixture
def run_messages():
    """run_messages(plant, seconds, **kw) -> the messages published in that run, in order."""

    def run(plant, seconds, **kw):
        out = []
        plant.run(seconds, sink=out.append, **kw)
        return out

    return run
