"""The stack's processes report their use to no library vendor, unless the user says so."""

from __future__ import annotations

import os
import subprocess
import sys

from flywheel.base.usage import SWITCHES

#: The variables MLflow itself reads as "a test run or CI, do not report" (mlflow.telemetry.utils),
#: and the generic opt-out: the probe clears them, so that its control means something on any CI.
NOT_A_TEST_RUN = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
                  "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                  "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "DO_NOT_TRACK")

#: What the libraries themselves say, in a process that is not a test run.
PROBE = """
import os, sys
for name in (*{clear!r}, *{switches!r}):
    os.environ.pop(name, None)
if sys.argv[1] == "stack":
    from flywheel.base.usage import no_usage_reports
    no_usage_reports()
from mlflow.telemetry.utils import is_telemetry_disabled
from ray._common.usage.usage_lib import usage_stats_enabled
import huggingface_hub.constants as hub
print(is_telemetry_disabled(), not usage_stats_enabled(), hub.HF_HUB_DISABLE_TELEMETRY)
"""


def _libraries_say(mode: str) -> str:
    code = PROBE.format(clear=NOT_A_TEST_RUN, switches=tuple(SWITCHES))
    return subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_each_library_reads_its_reports_as_off_after_the_stacks_switches():
    assert _libraries_say("stack") == "True True True"
    assert _libraries_say("plain") == "False False False", "the libraries report by default: the probe is moot"


def test_the_cli_sets_the_switches_first_and_keeps_the_users_own(monkeypatch, capsys):
    from flywheel.cli import main

    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")     # the user's choice stands
    assert main([]) == 2                                   # no command: help, and nothing else runs
    capsys.readouterr()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"
