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
