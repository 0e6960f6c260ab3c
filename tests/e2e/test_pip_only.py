"""The pip-only laptop path: the tiny campaign on the in-Python broker (amqtt), Mosquitto hidden.

A newcomer without Mosquitto (macOS, Windows, no root) gets amqtt.  This runs the same tiny
tree campaign as ``test_loop_gbdt.py`` with Mosquitto out of reach (FLYWHEEL_EMBEDDED_BROKER=amqtt
and a PATH without the sbin directories), and compares it with that campaign (the
session's ``gbdt_campaign`` fixture, so the Mosquitto run is paid once): the simulator runs in
lockstep with the served model, so the same seed must give the same data, the same model
decisions and the same plant, whichever broker carried the messages.

Trees, not LoRA: the broker carries the same messages whichever family the served model is, and
the tree campaign trains in seconds where a LoRA fine-tune dominates the tiny turn; its served
model is promoted, so the lockstep loop over amqtt is always closed.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

@pytest.fixture(scope="module")
def amqtt_campaign(gbdt_campaign, tmp_path_factory, ray_local):
    from flywheel.loop import run_campaign

    workdir = tmp_path_factory.mktemp("e2e-amqtt")
    # The Mosquitto campaign's own config (same seed and overrides; e.g. serve.ingress=proxy,
    # as the session's Ray runs without direct ingress), so the comparison below is like for like.
    cfg = gbdt_campaign[0]
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.rstrip("/").endswith("sbin"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_EMBEDDED_BROKER", "amqtt")
        mp.setenv("PATH", path)
        state = run_campaign(cfg, workdir, view=False)
    return cfg, workdir, state


def test_campaign_runs_to_the_end_on_the_in_python_broker(amqtt_campaign):
    import mlflow

    cfg, workdir, state = amqtt_campaign
    assert [t["turn"] for t in state["turns"]] == [0, 1]
    t0, t1 = state["turns"]
    assert t0["sim"]["published"] > 0 and t0["ingest"]["deadlettered"] == 0
    assert t1["ingest"]["landed"] == t0["sim"]["published"] + t1["sim"]["published"]
    if t1["promoted"]:   # the served model drove the plant: the lockstep loop closed over amqtt
        assert t1["sim"]["bridge"]["predictions"] > 0 and t1["sim"]["lockstep_timeouts"] == 0
    assert set(state["holdout"]["by_turn"]) == {"0", "1"}
    # it really ran on amqtt: the broker's URL (recorded on the parent run) asks for MQTT 3.1.1
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    assert client.get_run(state["parent_run_id"]).data.tags["flywheel.broker"].endswith("?protocol=3.1.1")
    assert not (workdir / "broker" / "mosquitto.conf").exists()


def test_same_seed_same_campaign_as_on_mosquitto(amqtt_campaign, gbdt_campaign):
    from tests.e2e.conftest import assert_same_campaign

    assert_same_campaign(amqtt_campaign[2], gbdt_campaign[2], ("amqtt", "mosquitto"))


def test_lockstep_on_amqtt_lands_in_as_few_batches_as_on_mosquitto(amqtt_campaign, gbdt_campaign):
    """Needs the campaign to hand ``EmbeddedBroker.collector_idle_flush_s`` to its collectors.

    At the MQTT 3.1.1 default (flush after 0.05 s without a message) a lockstep period, bursts
    between short waits for the model, was flushed at nearly every wait: ~290 batches instead
    of ~40, ~600 Parquet files instead of ~90, and every later dataset build read them all.
    """
    on_amqtt = amqtt_campaign[2]["turns"][-1]["ingest"]["batches"]
    on_mosquitto = gbdt_campaign[2]["turns"][-1]["ingest"]["batches"]
    assert on_amqtt <= 3 * on_mosquitto + 20, (on_amqtt, on_mosquitto)
