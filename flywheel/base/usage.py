"""No usage reports: the stack's processes do not report their use to library vendors.

A plant's network is often closed, and what runs on it should not try to reach the internet
on its own: MLflow 3 sends usage telemetry from a background thread unless told not to, Ray
may collect usage statistics of a cluster it starts, and huggingface_hub sends telemetry with
hub calls. Each library's own switch is set here, unless the user set it already (a user who
wants to report sets it, e.g. ``MLFLOW_DISABLE_TELEMETRY=false``), before the library reads it:
the ``flywheel`` CLI does this first thing, and a campaign started from Python before Ray
starts, so every Ray worker inherits it.
"""

from __future__ import annotations

import os

#: Each library's switch and the value that turns its reports off.
SWITCHES = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def no_usage_reports() -> None:
    """Turn off the libraries' usage reports in this process and the ones it starts, keeping any
    switch the user set."""
    for name, value in SWITCHES.items():
        os.environ.setdefault(name, value)
