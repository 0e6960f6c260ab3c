"""A campaign's own files (``state.json``, the turn journal) that are not even text: the campaign
is refused with the file and the fix, the journal reads as unknown (recovery asks MLflow and the
lake), as for files that are text but not JSON."""

from __future__ import annotations

import re

import pytest

from flywheel.state import CampaignError, TurnJournal, campaign_dir, load_state


@pytest.mark.parametrize("content", [b'{"turns": [', b"\xff\xfe\x00 not text"])
def test_a_state_file_that_does_not_parse_is_refused_with_the_fix(tmp_path, content):
    d = campaign_dir(tmp_path, "c")
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_bytes(content)
    with pytest.raises(CampaignError, match=re.escape(f"{d / 'state.json'} is corrupt (") +
                       r".*\); move it away to start the campaign over$"):
        load_state(tmp_path, "c")
    (d / "turn-progress.json").write_bytes(content)
    assert TurnJournal(d / "turn-progress.json").load() == {"turn": None, "unreadable": True}
    assert (d / "state.json").read_bytes() == content


HOLD = """
import os, sys, time
from pathlib import Path
from flywheel.state import CampaignLock
lock = CampaignLock(Path(sys.argv[1]), "c").__enter__()
print("held", flush=True)
if sys.argv[2] == "fork":      # a child that inherited the lock outlives its parent, briefly
    if os.fork() == 0:
        time.sleep(1.5)
        os._exit(0)
    os._exit(0)
time.sleep(60)
"""


def _holder(folder, mode: str):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_process_runs_a_campaign_a_second_is_refused_with_the_holder_and_the_fix(tmp_path, capsys):
    from flywheel.campaign import default_config_path
    from flywheel.cli import main
    from flywheel.state import CampaignLock

    folder = campaign_dir(tmp_path, "c")
    folder.mkdir(parents=True)
    holder = _holder(folder, "hold")
    try:
        rc = main(["run", "--config", str(default_config_path("tiny")), "--workdir", str(tmp_path), "--no-live",
                   "campaign=c"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and err[-1].startswith(f"flywheel run: campaign 'c' in {folder} is being run by another "
                                              f"process (pid {holder.pid} since "), err
        assert err[-1].endswith("wait for it to end or stop it (Ctrl-C there), or run another campaign=<name> or "
                                "--workdir")
        assert not (tmp_path / "broker").exists() and not (folder / "state.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with CampaignLock(folder, "c", wait_s=0) as lock:   # the kernel released it with the process
        assert lock.fd is not None
    # a holder that died while a child it forked still holds the lock: waited for, then taken
    dead = _holder(folder, "fork")
    dead.wait()
    with pytest.raises(CampaignError, match=f"being run by another process \\(pid {dead.pid} since "):
        CampaignLock(folder, "c", wait_s=0).__enter__()     # the child holds it for 1.5 s more
    with CampaignLock(folder, "c", wait_s=15) as lock:
        assert lock.fd is not None


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_a_campaign_name_that_leaves_the_campaigns_folder_is_refused_where_it_becomes_a_path(tmp_path, name):
    """The stack's own callers check the name first (the config, ``flywheel report --campaign``);
    the workdir refuses it too, so no caller of the Python API reads or writes outside ``campaigns/``."""
    from flywheel.base.config import ConfigError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "state.json").write_text('{"turns": []}')
    with pytest.raises(ConfigError, match=re.escape(f"campaign name should be 1-64 of [A-Za-z0-9_.-], starting "
                                                    f"with a letter or digit, got {name!r}")):
        load_state(tmp_path, name)
