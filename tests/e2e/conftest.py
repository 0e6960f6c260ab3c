"""The uninterrupted tiny campaigns, each run once per session: ``campaign`` (LoRA, windowed with
Ray Data) is checked by test_loop.py and test_audit.py; ``gbdt_campaign`` (trees) by
test_loop_gbdt.py, and test_resume.py and test_pip_only.py compare a campaign killed and resumed,
or run on the in-Python broker, on the same seed and overrides (``GBDT_OVERRIDES``) with it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def campaign_prometheus(prometheus_factory):
    """A real Prometheus scraping the port the campaign serves its metrics on (``metrics_port``)."""
    from tests.conftest import free_port

    port = free_port()
    return port, prometheus_factory([f"127.0.0.1:{port}"])


@pytest.fixture(scope="session")
def campaign(tmp_path_factory, ray_local, campaign_prometheus):
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign
    from flywheel.report import write_report

    workdir = tmp_path_factory.mktemp("e2e")
    # The session's Ray runs without direct ingress (tests of that refusal share it); the
    # direct path the tiny config asks for is covered by the CLI runs in test_resume.py.
    # Prometheus scrapes the campaign's sim, bridge and collectors while it runs (test_metrics_campaign.py).
    cfg = load_campaign(str(default_config_path("tiny")), ["campaign=e2e", "serve.ingress=proxy",
                                                           f"metrics_port={campaign_prometheus[0]}"])
    state = run_campaign(cfg, workdir, view=False)  # its own embedded Mosquitto, as flywheel demo does
    report = write_report(workdir, "e2e")
    return cfg, workdir, state, report


#: The tree campaign's overrides of the tiny config. Trees train in about a second where the LoRA
#: fine-tune dominates a tiny turn, and the in-process windowing builds the tiny lake's snapshots
#: in a fraction of Ray Data's start-up (the same snapshot: tests/ingest/test_dataset.py compares
#: the two engines; the LoRA ``campaign`` keeps Ray Data's path in the loop). No LoRA reference
#: (``train.reference_family=``), which would add a LoRA fine-tune to the turn.
GBDT_OVERRIDES = ("train.family=gbdt", "train.reference_family=", "dataset.engine=local")


@pytest.fixture(scope="session")
def gbdt_overrides() -> tuple[str, ...]:
    """``GBDT_OVERRIDES``, for a test that runs the tree campaign itself (``flywheel run ...``)."""
    return GBDT_OVERRIDES


@pytest.fixture(scope="session")
def gbdt_campaign(tmp_path_factory, ray_local):
    """The tiny campaign with trees as the served family (``GBDT_OVERRIDES``), through the same
    registry, gate, signing and Serve."""
    import time

    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    workdir = tmp_path_factory.mktemp("e2e-gbdt")
    cfg = load_campaign(str(default_config_path("tiny")), ["campaign=e2e-gbdt", "serve.ingress=proxy",
                                                            *GBDT_OVERRIDES])
    t0 = time.monotonic()
    state = run_campaign(cfg, workdir, view=False)
    return cfg, workdir, state, time.monotonic() - t0


@pytest.fixture(scope="session")
def shadow_campaign(tmp_path_factory, ray_local):
    """The tiny campaign with trees and two learning turns, the challenger in shadow and promoted only
    on live evidence (``serve.shadow=challenger train.promote_after_shadow=true``): turn 1's v1 has no
    champion to run beside; turn 2's v2 passes the offline gate, runs beside v1 for the period and
    the promote-after-shadow rule decides. The gate compares log loss (point rule), on which v2,
    trained on two periods, beats v1 clearly on this seed: the offline gate passes, so the live
    rule is what decides. No reference plant: the live scores are what is tested. Snapshots are
    windowed in-process (the same ones as Ray Data's, a fraction of its start-up each turn). The
    replica reserves half a CPU: turn 2 trains while Serve runs beside the session's collector."""
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    workdir = tmp_path_factory.mktemp("e2e-shadow")
    cfg = load_campaign(str(default_config_path("tiny")), [
        "campaign=e2e-shadow", "serve.ingress=proxy", "turns=2", "train.family=gbdt", "train.reference_family=",
        "reference.period=0", "serve.shadow=challenger", "train.promote_after_shadow=true",
        "train.shadow_margin=0.05", "train.gate_metric=eval.loss", "train.gate_bootstrap=0",
        "serve.num_cpus_per_replica=0.5", "dataset.engine=local"])
    state = run_campaign(cfg, workdir, view=False)
    return cfg, workdir, state


def live_trials_section(workdir, campaign: str, out_dir) -> str:
    """The report's *Live trials of the challenger* section for a campaign (written to ``out_dir``)."""
    from flywheel.report import write_report

    md = write_report(workdir, campaign, out_dir=str(out_dir), log_to_mlflow=False).read_text()
    return md.split("## Live trials of the challenger", 1)[1].split("\n## ", 1)[0]


#: Per-turn fields that depend on wall time, process ids or run ids, not on what happened.
_VOLATILE = {"wall_s", "started", "finished", "run_id", "mlflow_run_id", "landed_at", "lag_s", "batches", "files",
             "ts", "created", "attempt", "messages_per_s", "serve_s", "replica_forward_s", "replica_batches",
             "replica_windows"}


def _stable(obj):
    """``obj`` without the fields that legitimately differ between two runs of one seed."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 9)
    return obj


def _diff(a, b, names: tuple[str, str], where: str = "") -> list[str]:
    """Where two records differ (paths and both values), for the failure message."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k not in _VOLATILE
                for d in _diff(a.get(k), b.get(k), names, f"{where}.{k}")]
    return [] if _stable(a) == _stable(b) else [f"{where}: {a!r} ({names[0]}) vs {b!r} ({names[1]})"]


def assert_same_campaign(a: dict, b: dict, names: tuple[str, str]) -> None:
    """Two campaign states of one seed and config: what the plant published, what landed, what the
    model learnt and decided, what the plant did, and the held-out scores are the same."""
    for ta, tb in zip(a["turns"], b["turns"], strict=True):
        for key in ("sim", "ingest", "factory", "baselines", "data", "eval", "promoted", "champion_version",
                    "bridge_threshold", "dataset_id"):
            assert _stable(ta.get(key)) == _stable(tb.get(key)), \
                f"turn {ta['turn']}: {key} differs: {_diff(ta.get(key), tb.get(key), names)}"
    assert _stable(a["holdout"]) == _stable(b["holdout"])


def resumed_essentials(state: dict) -> tuple[list, dict]:
    """What a campaign that died and ran again must share with an uninterrupted one of the same seed
    and config: the plant, its baselines, the data, the model's scores and decisions, and the
    held-out table. Not the model versions' numbers (the dead attempt's versions kept theirs) nor
    the collectors' counters (the rerun's collectors count from their start)."""
    out = []
    for t in state["turns"]:
        out.append({"turn": t["turn"], "factory": t["factory"], "baselines": t["baselines"],
                    "gap_closed": t["gap_closed"], "dataset_id": t.get("dataset_id"),
                    "data": t.get("data"), "eval": t.get("eval"), "threshold": t.get("bridge_threshold"),
                    "commands": t["sim"].get("commands_applied"), "published": t["sim"]["published"],
                    "promoted": t.get("promoted")})
    held = {k: v for k, v in state["holdout"].items() if k not in ("wall_s", "by_turn")}
    held["by_turn"] = {t: {k: v for k, v in row.items() if k != "model_version"}
                       for t, row in state["holdout"]["by_turn"].items()}
    return out, held
