"""Two timelines of one plant in the lake: refused by the builder, fenced by ``Lake.set_aside``.

A turn attempt killed mid-period and rerun from the committed boundary re-simulates the
same plant time: the same deterministic ``event_id`` values come back with other contents.
Here two streams with the same seed and different incidents after a boundary stand in for
the two attempts (in-process windowing: the builder's checks run on the driver either way).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from ingest_plantgen import Incident, day_start, stream, write_lake

from flywheel.base import contract
from flywheel.base.features import WindowConfig
from ingest import BuildConfig, build_snapshot
from ingest.dataset import DatasetError
from ingest.lake import Lake

T0 = day_start()
BOUNDARY = T0 + 24 * 3600 + 30          # the committed turn boundary (plant time)
MACHINES = [("l1", "m1", "milling"), ("l1", "p1", "pump")]
COMMON = [Incident("m1", T0 + 5 * 3600 + 17, "failure", "TWF"), Incident("p1", T0 + 9 * 3600 + 30, "maintenance", "BRG")]
# The dead attempt and the rerun: after the boundary, the plant took other decisions.
ABORTED = COMMON + [Incident("m1", T0 + 30 * 3600 + 17, "failure", "HDF")]
RERUN = COMMON + [Incident("m1", T0 + 28 * 3600 + 17, "maintenance", "HDF"),
                  Incident("p1", T0 + 40 * 3600 + 30, "failure", "BRG")]
CFG = replace(BuildConfig(window=WindowConfig(length=10, stride_s=600, horizon_s=3600), eval_fraction=0.25),
              engine="local")
HOURS = 48 * 3600


def _plant(incidents):
    return stream(MACHINES, T0 - 2 * 3600, HOURS, seed=3, incidents=incidents)


def _owns(ids, machines, seqs):
    return [i == contract.event_id(3, m, q) for i, m, q in zip(ids, machines, seqs)]


def test_same_event_id_with_other_readings_is_refused(tmp_path):
    lake = str(tmp_path / "lake")
    write_lake(lake, _plant(ABORTED), collector="a")
    write_lake(lake, [m for m in _plant(RERUN) if m.ts > BOUNDARY], collector="b")
    with pytest.raises(DatasetError, match="two timelines") as info:
        build_snapshot(lake, CFG)
    assert "l1/" in str(info.value) and "event_id" in str(info.value)


def test_conflicting_events_are_refused(tmp_path):
    lake = str(tmp_path / "lake")
    aborted, rerun = _plant(ABORTED), _plant(RERUN)
    write_lake(lake, aborted, collector="a")
    ids = {m.event_id: m for m in aborted if isinstance(m, contract.MachineEvent)}
    # an event the rerun re-emitted with another content under the same id
    clash = [m for m in rerun if isinstance(m, contract.MachineEvent) and m.event_id in ids
             and contract.encode(m) != contract.encode(ids[m.event_id])]
    assert clash, "the two streams should disagree on at least one event"
    write_lake(lake, clash, collector="b")
    with pytest.raises(DatasetError, match="event ids carry events of different contents"):
        build_snapshot(lake, CFG)


def test_exact_copies_are_still_just_duplicates(tmp_path):
    lake = str(tmp_path / "lake")
    plant = _plant(RERUN)
    write_lake(lake, plant, collector="a")
    write_lake(lake, [m for m in plant if m.ts > BOUNDARY], collector="b")   # a redelivery
    snap = build_snapshot(lake, CFG)
    assert snap.manifest["events"]["duplicates_removed"] == sum(1 for m in plant if m.ts > BOUNDARY)


def test_set_aside_fences_the_lake_at_the_boundary(tmp_path):
    aborted, rerun = _plant(ABORTED), _plant(RERUN)
    # what a killed attempt leaves: the committed part and the part past the boundary,
    # in files that straddle the boundary (batches of 500 messages)
    lake_uri = str(tmp_path / "lake")
    write_lake(lake_uri, aborted, collector="a", batch=500)
    lake = Lake.open(lake_uri)
    moved = lake.set_aside(BOUNDARY, "turn-1-attempt-1", owns=_owns)
    late = [m for m in aborted if m.ts > BOUNDARY]
    assert moved == {"telemetry": sum(isinstance(m, contract.Telemetry) for m in late),
                     "events": sum(isinstance(m, contract.MachineEvent) for m in late)}
    assert lake.aside_rows() == len(late)
    assert os.path.isdir(tmp_path / "lake" / "aborted" / "turn-1-attempt-1" / "raw" / "telemetry")
    # idempotent: nothing left past the boundary
    assert lake.set_aside(BOUNDARY, "turn-1-attempt-1", owns=_owns) == {"telemetry": 0, "events": 0}
    # the rerun writes its own period; the snapshot equals one of a lake that only saw the rerun
    write_lake(lake_uri, [m for m in rerun if m.ts > BOUNDARY], collector="b", batch=500)
    fenced = build_snapshot(lake_uri, CFG)
    clean_uri = str(tmp_path / "clean")
    write_lake(clean_uri, rerun, collector="a", batch=500)
    clean = build_snapshot(clean_uri, CFG)
    assert fenced.dataset_id == clean.dataset_id
    assert fenced.manifest["events"]["duplicates_removed"] == 0
    assert fenced.manifest["events"]["set_aside_rows"] == len(late)


def test_set_aside_keeps_rows_of_another_writer(tmp_path):
    lake_uri = str(tmp_path / "lake")
    write_lake(lake_uri, _plant(ABORTED), collector="a")
    moved = Lake.open(lake_uri).set_aside(BOUNDARY, "x", owns=lambda ids, ms, qs: [False] * len(ids))
    assert moved == {"telemetry": 0, "events": 0}
