"""The reference plant: a twin under run-to-failure, windowed and labelled like every snapshot."""

from __future__ import annotations

import pytest

from factory_sim import Plant, load_scenario
from flywheel.base import contract
from flywheel.base.config import ConfigError
from flywheel.base.features import WindowConfig, parse_readings
from flywheel.reference import COLUMNS, ReferenceConfig, build_reference_set

WINDOW = WindowConfig(length=10, stride_s=600, horizon_s=3600)


@pytest.fixture(scope="module")
def twin():
    return load_scenario("tiny"), build_reference_set(load_scenario("tiny"), seed=7, period_s=24 * 3600, window=WINDOW)


def test_the_twin_is_windowed_and_labelled_like_a_snapshot_and_is_deterministic(twin):
    scenario, ref = twin
    assert list(ref.columns) == list(COLUMNS) and len(ref) > 100
    assert set(ref["label"]) - {"ok"}, "a day of run-to-failure has failures"
    assert set(ref["label_source"]) <= {"failure", "none"}       # nobody maintained the twin
    assert all(len(parse_readings(r)) == WINDOW.length for r in ref["readings"].head(20))
    again = build_reference_set(scenario, seed=7, period_s=24 * 3600, window=WINDOW)
    assert again.equals(ref)
    other = build_reference_set(scenario, seed=8, period_s=24 * 3600, window=WINDOW)
    assert not other["readings"].equals(ref["readings"])       # its own seed, its own plant


def test_a_window_is_labelled_with_the_first_failure_within_its_horizon_and_unknown_ones_are_left_out(twin):
    scenario, ref = twin
    msgs = []
    Plant(scenario, seed=7).run(24 * 3600, sink=msgs.append)
    failures = {}
    last = {}
    for m in msgs:
        last[m.machine] = max(last.get(m.machine, m.ts), m.ts)
        if isinstance(m, contract.MachineEvent) and m.type == "failure":
            failures.setdefault(m.machine, []).append(m)
    for row in ref.itertuples():
        assert row.end_ts + WINDOW.horizon_s <= last[row.machine]        # the outcome is known
        coming = [f for f in failures.get(row.machine, [])   # after the window's last reading, within the horizon
                  if (f.ts, f.seq) > (row.end_ts, row.end_seq) and f.ts <= row.end_ts + WINDOW.horizon_s]
        assert row.label == (coming[0].mode if coming else "ok")


def test_reference_config_checks_its_period():
    assert ReferenceConfig(period="0").period_s == 0 and ReferenceConfig(period="6h").period_s == 6 * 3600
    with pytest.raises(ConfigError, match="reference.period"):
        ReferenceConfig(period="soon")


def test_the_saved_reference_set_is_read_back_and_a_damaged_one_is_made_again(twin, tmp_path):
    """Saved whole at the first learning turn and read by the later ones; a saved file that does not
    read is kept aside under another name, said in one line, and made again, the same windows."""
    from flywheel.reference import load_or_build_reference_set

    scenario, ref = twin
    path, said, builds = tmp_path / "reference.parquet", [], []

    def build():
        builds.append(1)
        return build_reference_set(scenario, seed=7, period_s=24 * 3600, window=WINDOW)

    assert load_or_build_reference_set(path, build, said.append).equals(ref) and len(builds) == 1
    assert load_or_build_reference_set(path, build, said.append).equals(ref) and len(builds) == 1
    assert said == [] and [p.name for p in tmp_path.iterdir()] == ["reference.parquet"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)        # a page's bytes changed
    path.write_bytes(bytes(data))
    assert load_or_build_reference_set(path, build, said.append).equals(ref) and len(builds) == 2
    kept = tmp_path / "reference.parquet.unreadable"
    assert len(said) == 1 and said[0].startswith(f"the reference plant's windows {path} do not read (")
    assert said[0].endswith(f"the unreadable file is kept as {kept}") and kept.read_bytes() == bytes(data)
    assert load_or_build_reference_set(path, build, said.append).equals(ref) and len(builds) == 2
