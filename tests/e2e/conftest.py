"""The uninterrupted tiny campaign, run once per session: test_loop.py checks it, test_resume.py
compares a campaign killed and resumed on the same seed with it."""

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


@pytest.fixture(scope="session")
def gbdt_campaign(tmp_path_factory, ray_local):
    """The tiny campaign with trees as the served family (``train.family=gbdt``), through the same
    registry, gate, signing and Serve; no LoRA reference (``train.reference_family=''``), which
    would add a LoRA fine-tune to a turn that otherwise trains in about a second."""
    import time

    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    workdir = tmp_path_factory.mktemp("e2e-gbdt")
    cfg = load_campaign(str(default_config_path("tiny")), ["campaign=e2e-gbdt", "serve.ingress=proxy",
                                                            "train.family=gbdt", "train.reference_family="])
    t0 = time.monotonic()
    state = run_campaign(cfg, workdir, view=False)
    return cfg, workdir, state, time.monotonic() - t0
