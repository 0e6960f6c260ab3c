"""Maintenance policy and serve configuration (pure Python: no broker, no Ray)."""

from __future__ import annotations

import pytest

from flywheel.base import contract
from flywheel.base.config import ConfigError, load
from serve import BridgeConfig, ServeConfig
from serve.policy import MaintenancePolicy


def tel(machine: str, ts: float, seq: int = 0) -> contract.Telemetry:
    return contract.Telemetry(event_id=f"{machine}-{seq}", seq=seq, ts=ts, line="L1", machine=machine, kind="pump",
                              readings={"vibration_mm_s": 2.0})


def ev(machine: str, ts: float, type_: str) -> contract.MachineEvent:
    extra = {"reason": "planned", "finding": "ok"} if type_.startswith("maintenance") else {"mode": "BRG"}
    return contract.MachineEvent(event_id=f"e-{machine}-{ts}", seq=0, ts=ts, line="L1", machine=machine,
                                 type=type_, **extra)


def test_threshold_and_cooldown_in_plant_seconds():
    p = MaintenancePolicy(BridgeConfig(threshold=0.5, cooldown_s=600))
    p.on_telemetry(tel("m1", 1000))
    assert p.decide("L1", "m1", 1000, 0.49).reason == "below_threshold"
    assert p.decide("L1", "m1", 1000, 0.5).command
    assert p.decide("L1", "m1", 1300, 0.9).reason == "cooldown"
    assert p.decide("L1", "m2", 1300, 0.9).command          # cooldown is per machine
    assert p.decide("L1", "m1", 1600, 0.9).command          # 600 s later: allowed again


def test_down_from_events_until_maintenance_done_and_late_events_are_ignored():
    p = MaintenancePolicy(BridgeConfig(threshold=0.1, cooldown_s=0))
    for kind in ("maintenance_start", "failure"):
        p.on_event(ev("m1", 100, kind))
        assert p.down_reason("L1", "m1") == kind
        assert p.decide("L1", "m1", 100, 0.9).reason == "down"
        p.on_event(ev("m1", 200, "maintenance_done"))
        assert p.down_reason("L1", "m1") is None
        p.on_event(ev("m1", 150, kind))                      # older than the newest event: stale
        assert p.down_reason("L1", "m1") is None
        p = MaintenancePolicy(BridgeConfig(threshold=0.1, cooldown_s=0))
    part = contract.MachineEvent(event_id="p", seq=1, ts=300, line="L1", machine="m1", type="part", quality="ok")
    p.on_event(part)                                         # parts say nothing about up or down
    assert p.down_reason("L1", "m1") is None and p.decide("L1", "m1", 300, 0.9).command


def test_a_silent_machine_counts_as_down():
    p = MaintenancePolicy(BridgeConfig(threshold=0.1, silent_after_s=1800))
    p.on_telemetry(tel("m1", 0))
    p.on_telemetry(tel("m2", 1000))
    assert p.down_reason("L1", "m1") is None
    p.on_telemetry(tel("m2", 2000))                          # the plant clock moved on; m1 said nothing
    assert p.down_reason("L1", "m1") == "silent"
    assert p.decide("L1", "m1", 0, 0.99).reason == "down"


def test_configs_load_with_overrides_and_refuse_bad_values():
    b = load(BridgeConfig, None, ["window.length=5", "window.stride_s=300", "threshold=0.3", "cooldown_s=7200"])
    assert (b.window.length, b.window.stride_s, b.threshold, b.cooldown_s) == (5, 300.0, 0.3, 7200.0)
    s = load(ServeConfig, None, ["poll_s=2", "adapters.pump=pump-detector@champion", "kind_adapters.pump=pump"])
    assert s.adapters == {"pump": "pump-detector@champion"} and s.kind_adapters == {"pump": "pump"}
    with pytest.raises(ConfigError, match="threshold"):
        load(BridgeConfig, None, ["threshold=1.5"])
    with pytest.raises(ConfigError, match="thresold|threshold"):
        load(BridgeConfig, None, ["thresold=0.5"])
    with pytest.raises(ConfigError, match="kind_adapters.pump"):
        ServeConfig(kind_adapters={"pump": "nope"})
    with pytest.raises(ConfigError, match="route_prefix"):
        ServeConfig(route_prefix="api")
