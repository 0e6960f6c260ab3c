"""Every error a user can cause on the command line: one line on stderr, naming the fix, exit 2.

Runtime failures (a broker that is not there, a model that cannot load) exit 1 the same way;
``tests/serve/test_cli.py`` covers one of those.
"""

from __future__ import annotations

import pytest

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError, UsageError, one_line
from flywheel.cli import main


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:         # argparse's own errors end the parse with SystemExit(2)
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),                       # unknown sub-command
    (["demo", "--workdir", "{tmp}", "no_such_key=1"], "no_such_key"),         # unknown config key
    (["demo", "--workdir", "{tmp}", "train.epochs=many"], "train.epochs"),    # a value of the wrong type
    (["demo", "--workdir", "{tmp}", "--seeds", "1,x"], "--seeds"),
    (["train", "--workdir", "{tmp}", "--dataset", "ds-missing"], "ds-missing"),  # a dataset that is not there
    (["train", "--workdir", "{tmp}"], "--dataset"),
    (["sim", "--speed", "-3"], "--speed"),
    (["serve", "--workdir", "{tmp}", "poll_s=3"], "serve. or bridge."),
    (["serve", "status"], "--url"),
    (["serve", "status", "--url", "foo"], "http://127.0.0.1:8000"),
    (["broker", "--port", "70000"], "--port"),
    (["ingest", "--workdir", "{tmp}"], "--broker"),
    (["sim", "--no-such-flag"], "--no-such-flag"),
])
def test_usage_and_config_errors_are_one_line_on_stderr_with_exit_2(argv, needle, capsys, tmp_path):
    rc, out, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith("flywheel")
    assert "Traceback" not in out + err


def test_every_project_error_derives_from_one_base_with_its_exit_code():
    from factory_sim import SimError
    from finetune.data import DataError
    from finetune.model import ModelError
    from finetune.registry import RegistryError
    from flywheel.base.broker import BrokerError
    from flywheel.base.contract import ContractError
    from flywheel.base.mqtt import ConnectError
    from flywheel.loop import CampaignError
    from flywheel.report import ReportError
    from ingest.dataset import DatasetError
    from ingest.lake import LakeError
    from serve import ServeError

    runtime = [SimError, DataError, ModelError, RegistryError, BrokerError, ContractError, ConnectError,
               CampaignError, ReportError, DatasetError, LakeError, ServeError]
    assert all(issubclass(cls, FlywheelError) and cls.exit_code == 1 for cls in runtime)
    assert ConfigError.exit_code == UsageError.exit_code == 2
    # Callers that catch the builtin kinds keep working.
    assert issubclass(ConfigError, ValueError) and issubclass(RegistryError, LookupError)
    assert one_line(ConfigError("a\n  b\n")) == "a; b"
