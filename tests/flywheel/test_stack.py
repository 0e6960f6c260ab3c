"""The stack imports what its driver needs next while Ray starts, and only that."""

from __future__ import annotations

import subprocess
import sys


def test_a_tree_campaign_prewarms_mlflow_but_never_torch():
    from flywheel.stack import prewarm_modules

    assert "torch" in prewarm_modules({"lora", "gbdt"}) and "peft" in prewarm_modules({"gbdt", "lora"})
    trees = prewarm_modules({"gbdt", ""})
    assert "mlflow" in trees and not any(m.split(".")[0] in ("torch", "transformers", "peft") for m in trees)


def test_prewarm_imports_in_the_background_and_leaves_a_failing_import_to_its_user():
    code = (
        "import sys, threading\n"
        "from flywheel.stack import _prewarm\n"
        "_prewarm(('colorsys', 'flywheel_no_such_module', 'wave'))\n"
        "[t.join(30) for t in threading.enumerate() if t.name == 'flywheel-prewarm']\n"
        "print('colorsys' in sys.modules, 'wave' in sys.modules, 'flywheel_no_such_module' in sys.modules)\n"
        "import flywheel_no_such_module\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["True", "True", "False"], r.stderr[-2000:]
    # the real import, where the module is used, reports the failure with its own error
    assert r.returncode == 1 and "No module named 'flywheel_no_such_module'" in r.stderr


def test_campaigns_of_one_name_under_their_own_topic_roots_use_their_own_client_ids():
    """Two campaigns on one broker under one topic root are refused (each would read the other's
    plant); under roots of their own they must not take each other's MQTT sessions either, which
    client ids made of the campaign's name alone did (the broker kicks the older client)."""
    from flywheel.campaign import default_config_path, load_campaign
    from ingest import IngestConfig

    names = {load_campaign(str(default_config_path("tiny")), [f"topic_root={root}"]).mqtt_name
             for root in ("factory", "factory-tiny", "plant/a", "plant-a/b")}
    assert len(names) == 4
    for name in names:
        assert IngestConfig(client_prefix=f"fw-{name}").client_id(0).startswith(f"fw-{name}-collector")
