"""The model carries its input pipeline, through the registry.

A model trained on a window config that is not the default is registered; a bridge started
with no window settings of its own serves it and must feed it exactly its training input:
the same windows (readings, oldest first), featurised by the featuriser the version records,
giving the same predictions as the training rows' model input.  A version recorded with a
featuriser this release does not know is refused by name when serving starts.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from flywheel.base import contract
from flywheel.base.features import WindowConfig, parse_readings, render, windows
from flywheel.base.mqtt import connect, make_client, unique_client_id, wait_published

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ingest"))
from ingest_plantgen import Incident, day_start, stream, write_lake  # noqa: E402

#: Not the default window (10 readings, 600 s stride, 3600 s horizon): skew would show.
WINDOW = WindowConfig(length=6, stride_s=300.0, horizon_s=1800.0)
ROOT = "skewreg"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """Lake -> snapshot on WINDOW -> a few LoRA steps -> registered version (alias challenger)."""
    from finetune import TrainConfig, train_and_register
    from ingest import BuildConfig, build_snapshot

    work = tmp_path_factory.mktemp("skew")
    t0 = day_start()
    machines = [("L1", f"p{i}", "pump") for i in range(3)]
    incidents = [Incident("p0", t0 + 3 * 3600, "failure", "BRG"), Incident("p1", t0 + 4 * 3600, "failure", "BRG"),
                 Incident("p2", t0 + 5 * 3600 + 600, "failure", "PWF")]
    messages = stream(machines, t0, 9 * 3600, incidents=incidents)
    lake = str(work / "lake")
    write_lake(lake, messages)
    snap = build_snapshot(lake, BuildConfig(window=WINDOW, engine="local", eval_fraction=0.25))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = TrainConfig(batch_size=8, max_steps=3, checkpoint_every=0, min_eval_windows=0,
                      checkpoint_dir=str(work / "ckpt"))
    outcome = train_and_register(snap.path, cfg, uri, progress=False)
    return uri, outcome, snap, messages, work


def test_a_bridge_with_no_window_settings_feeds_the_model_its_training_input(trained, broker):
    from finetune import load_snapshot
    from serve import Bridge, BridgeConfig, ServeConfig, start_serving
    from serve.client import ServeClient

    uri, outcome, snap, messages, _ = trained
    h = start_serving(uri, "fault-detector", "challenger",
                      ServeConfig(app_name="skew-registry", route_prefix="/skew-registry", poll_s=0,
                                  num_cpus_per_replica=0))
    try:
        info = ServeClient(h.url).version()
        assert info["adapters"]["default"]["window"] == WINDOW.to_dict()
        assert info["adapters"]["default"]["featuriser"]["name"] == "text-summary"
        preds: list[dict] = []
        rec = make_client(broker.url, unique_client_id("skew-rec"))
        rec.on_message = lambda c, u, m: preds.append(json.loads(m.payload))
        connect(rec, broker.url)
        rec.subscribe(f"{ROOT}/+/+/prediction", 1)
        time.sleep(0.2)
        telemetry = [m for m in messages if isinstance(m, contract.Telemetry)]
        with Bridge(broker.url, h.url, BridgeConfig(threshold=1.0), topic_root=ROOT) as b:
            assert b.window == WINDOW and b.featuriser == "text-summary/1"
            pub = make_client(broker.url, unique_client_id("skew-pub"))
            connect(pub, broker.url)
            topics = contract.Topics(ROOT)
            wait_published([pub.publish(topics.for_message(m), contract.encode(m), qos=1) for m in telemetry])
            expected = sum(len(windows([t for t in telemetry if t.machine == m], WINDOW)) for m in ("p0", "p1", "p2"))
            deadline = time.monotonic() + 120
            while len(preds) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
            built = {(w.machine, w.end_seq): w for w in b.recent_windows()}
            pub.disconnect()
        rec.disconnect()
        rec.loop_stop()
        assert len(preds) == expected and len(built) == expected

        # Every window the model trained or was scored on is a window the bridge built, with the
        # same readings, so the same model input; and the prediction the bridge got for it is
        # the model's prediction on that training input.
        loaded = load_snapshot(snap.path)
        rows = [r for split in (loaded.train, loaded.eval) for r in split.itertuples()]
        assert len(rows) > 20
        by_window = {(p["machine"], p["window_end_seq"]): p for p in preds}
        client = ServeClient(h.url)
        for r in rows:
            w = built[(r.machine, r.end_seq)]
            assert [dict(x) for x in w.readings] == parse_readings(r.readings)
            assert render(w.kind, w.readings) == r.text
        sample = rows[:: max(1, len(rows) // 8)]
        direct = client.predict([{"text": r.text} for r in sample])["predictions"]
        for r, d in zip(sample, direct):
            got = by_window[(r.machine, r.end_seq)]["probs"]
            # Same input, same model: equal up to the batch's arithmetic. Under native bf16 (precision
            # auto on a CPU with bf16) the padding and size of the batch a window rides in move its
            # probabilities by up to ~2e-4 (seen when a loaded machine batched differently); a skew
            # in the input (another window or rendering) moves them by orders of magnitude more.
            assert got == pytest.approx(d["probs"], abs=1e-3)
    finally:
        h.shutdown()


def test_a_version_with_an_unknown_featuriser_is_refused_by_name(trained):
    from finetune import fetch_adapter
    from finetune.registry import get_version, register_version, set_alias
    from serve import ServeConfig, ServeError, start_serving

    uri, outcome, _, _, work = trained
    adapter = Path(fetch_adapter(uri, "fault-detector", str(outcome.version), str(work / "fetched")))
    meta = json.loads((adapter / "flywheel_model.json").read_text())
    meta["featuriser"] = {"name": "spectral-bands", "version": 2, "params": {}}
    (adapter / "flywheel_model.json").write_text(json.dumps(meta))
    import mlflow

    from finetune.pyfunc import save_pyfunc

    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.get_run(get_version(uri, "fault-detector", str(outcome.version)).run_id)
                               .info.experiment_id).info.run_id
    pyfunc_dir = work / "odd-model"
    shutil.rmtree(pyfunc_dir, ignore_errors=True)
    save_pyfunc(adapter, pyfunc_dir)
    client.log_artifacts(run_id, str(pyfunc_dir), "model")
    client.set_terminated(run_id)
    # what a version trained by a release with another featuriser carries: its record and its tag
    version = register_version(uri, "fault-detector", run_id, "model",
                               {"flywheel.featuriser": "spectral-bands/2"}).version
    set_alias(uri, "fault-detector", "odd", version)
    with pytest.raises(ServeError, match=r"featuriser 'spectral-bands/2' is not known to this flywheel release "
                                         r"\(known: numeric-stats/1, text-summary/1\)"):
        start_serving(uri, "fault-detector", "odd",
                      ServeConfig(app_name="skew-odd", route_prefix="/skew-odd", poll_s=0, num_cpus_per_replica=0))
