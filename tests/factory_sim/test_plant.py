"""The plant's stream: contract-valid, deterministic, resumable, and physically consistent."""

from __future__ import annotations

import pytest

from flywheel.base import contract
from flywheel.base.features import REFERENCE, WindowConfig, is_window_end

from factory_sim import Plant, SimCommandError, load_scenario

H = 3600.0


def tiny(**kw):
    return Plant(load_scenario("tiny"), seed=kw.pop("seed", 0))


def test_stream_is_contract_valid_and_round_trips(run_messages):
    plant = tiny()
    msgs = run_messages(plant, 6 * H)
    topics = contract.Topics("factory")
    kinds = set()
    for m in msgs:
        back = contract.decode(topics.for_message(m), contract.encode(m))
        assert back == m
        kinds.add((type(m).__name__, getattr(m, "type", None)))
    assert ("Telemetry", None) in kinds and ("MachineEvent", "part") in kinds
    # telemetry lands on whole ticks from the epoch, so windows align on plant time
    epoch = plant.scenario.epoch_ts
    assert epoch == 1767225600.0
    assert all((m.ts - epoch) % 60 == 0 for m in msgs)
    assert any(is_window_end(m.ts, WindowConfig()) for m in msgs if isinstance(m, contract.Telemetry))
    # readings carry the names the featuriser knows
    for m in msgs:
        if isinstance(m, contract.Telemetry):
            assert set(m.readings) == set(REFERENCE[m.kind]) - {"power_w", "temp_diff_k", "tool_wear_min"}


def test_seq_is_one_counter_per_machine_and_ids_are_deterministic(run_messages):
    plant = tiny()
    msgs = run_messages(plant, 12 * H)
    by_machine: dict[str, list] = {}
    for m in msgs:
        by_machine.setdefault(m.machine, []).append(m)
    assert sorted(by_machine) == ["mill-01", "mill-02", "pump-01", "pump-02"]
    for mid, ms in by_machine.items():
        assert [m.seq for m in ms] == list(range(len(ms)))
        assert all(m.event_id == contract.event_id(0, mid, m.seq) for m in ms)
        assert all(a.ts <= b.ts for a, b in zip(ms, ms[1:]))


def test_same_seed_is_byte_identical_and_other_seed_differs(run_messages, to_jsonl):
    a = to_jsonl(run_messages(tiny(seed=3), 8 * H))
    b = to_jsonl(run_messages(tiny(seed=3), 8 * H))
    c = to_jsonl(run_messages(tiny(seed=4), 8 * H))
    assert a == b
    assert a != c


def test_chunking_does_not_change_the_stream(run_messages, to_jsonl):
    whole = to_jsonl(run_messages(tiny(), 6 * H))
    plant = tiny()
    parts = b"".join(to_jsonl(run_messages(plant, s)) for s in (60.0, 3 * H - 60, 30 * 60, 2.5 * H))
    assert parts == whole
    # a run without a sink advances the same physics
    silent = tiny()
    silent.run(3 * H)
    ref = tiny()
    run_messages(ref, 3 * H)
    assert to_jsonl(run_messages(silent, 3 * H)) == to_jsonl(run_messages(ref, 3 * H))


def test_state_bytes_round_trip_continues_identically(run_messages, to_jsonl):
    plant = tiny(seed=7)
    run_messages(plant, 5 * H + 420)
    blob = plant.state_bytes()
    restored = Plant.from_state_bytes(blob)
    assert restored.now_ts == plant.now_ts
    assert to_jsonl(run_messages(restored, 10 * H)) == to_jsonl(run_messages(plant, 10 * H))
    assert restored.cumulative_kpis().to_dict() == plant.cumulative_kpis().to_dict()


def test_state_bytes_rejects_garbage():
    from factory_sim import SimError

    with pytest.raises(SimError, match="not a plant state"):
        Plant.from_state_bytes(b"hello")


def test_failure_stops_machine_scraps_part_and_repairs(run_messages):
    plant = tiny()
    msgs = run_messages(plant, 24 * H)
    fails = [m for m in msgs if isinstance(m, contract.MachineEvent) and m.type == "failure"]
    assert fails, "tiny should fail within a plant day under run-to-failure"
    f = fails[0]
    mine = [m for m in msgs if m.machine == f.machine]
    i = mine.index(f)
    tail = [m for m in mine[i:] if m.ts == f.ts]
    types = [getattr(m, "type", "telemetry") for m in tail]
    assert types[-2:] == ["part", "maintenance_start"]
    assert tail[-2].quality == "scrap"
    start = tail[-1]
    assert start.reason == "breakdown" and start.finding == f.mode
    repair_s = getattr(plant.scenario, f.machine.split("-")[0].replace("mill", "milling")).repair_s
    done = next(m for m in mine[i:] if getattr(m, "type", None) == "maintenance_done")
    assert done.ts == f.ts + repair_s and done.reason == "breakdown"
    between = [m for m in mine if f.ts < m.ts <= done.ts and isinstance(m, contract.Telemetry)]
    assert between == [], "a machine under repair publishes no telemetry"


def test_maintain_command_takes_machine_down_and_restores_it(run_messages):
    plant = tiny()
    run_messages(plant, 2 * H)
    view = plant.machine("mill-01")
    assert view.latent["tool_wear_min"] > 50
    out = []
    plant.command(contract.Command(command_id="c-1", line="L1", machine="mill-01", command="maintain",
                                   reason="test"), sink=out.append)
    assert view.down and view.down_reason == "planned"
    (start,) = out
    assert start.type == "maintenance_start" and start.reason == "planned" and start.command_id == "c-1"
    assert start.finding in contract.LABELS
    msgs = run_messages(plant, 40 * 60)
    mine = [m for m in msgs if m.machine == "mill-01"]
    done = [m for m in mine if getattr(m, "type", None) == "maintenance_done"]
    assert done and done[0].ts == start.ts + plant.scenario.milling.maintenance_s
    assert done[0].command_id == "c-1" and done[0].reason == "planned"
    assert not any(isinstance(m, contract.Telemetry) and m.ts <= done[0].ts for m in mine)
    assert not view.down
    assert view.latent["tool_wear_min"] < 15, "maintenance fits a new tool"
    k = plant.kpis().to_dict()
    assert k["maintenance_needed"] + k["maintenance_unneeded"] == 1


def test_command_queued_without_sink_reaches_the_next_run(run_messages):
    plant = tiny()
    run_messages(plant, H)
    seq = plant.machine("pump-02").seq
    plant.command(contract.Command(command_id="q", line="L1", machine="pump-02", command="maintain", reason="t"))
    msgs = run_messages(plant, 60)
    assert msgs[0].type == "maintenance_start" and msgs[0].machine == "pump-02" and msgs[0].seq == seq
    assert msgs[0].ts == plant.now_ts - 60


def test_bad_commands_are_refused_clearly():
    plant = tiny()
    plant.run(H)

    def cmd(machine, line="L1", command="maintain"):
        return contract.Command(command_id="x", line=line, machine=machine, command=command, reason="t")

    with pytest.raises(SimCommandError, match="unknown machine 'mill-99'") as e:
        plant.command(cmd("mill-99"))
    assert e.value.reason == "unknown_machine"
    with pytest.raises(SimCommandError, match="on line 'L1', not 'L2'"):
        plant.command(cmd("mill-01", line="L2"))
    plant.command(cmd("mill-01"))
    with pytest.raises(SimCommandError, match="already down") as e:
        plant.command(cmd("mill-01"))
    assert e.value.reason == "machine_down"
    plant.run(H)  # the plant keeps running


def test_the_gateway_caps_orders_per_line_hour_and_machines_down_and_survives_a_resume():
    def cmd(machine, n):
        return contract.Command(command_id=f"g{n}", line="L1", machine=machine, command="maintain", reason="t")

    plant = tiny()
    plant.run(H)
    plant.set_guardrails(max_orders_per_line_per_h=2)
    out: list = []
    results = plant.apply_commands([cmd("mill-01", 1), cmd("mill-02", 2), cmd("pump-01", 3)], out)
    assert [err.reason if err else None for _c, err in results] == [None, None, "line_order_cap"]
    assert "already had 2 maintenance orders in the last plant hour (gateway cap 2)" in str(results[2][1])
    plant = Plant.from_state_bytes(plant.state_bytes())            # the caps and the order history persist
    assert plant.guardrails == (2, 0)
    assert plant.apply_commands([cmd("pump-01", 4)], out)[0][1].reason == "line_order_cap"
    plant.run(H)                                                   # an hour later the cap has room again
    assert plant.apply_commands([cmd("pump-01", 5)], out)[0][1] is None

    plant = tiny()
    plant.run(H)
    plant.set_guardrails(max_down_per_line=1)
    results = plant.apply_commands([cmd("mill-01", 6), cmd("mill-02", 7)], out)
    assert results[0][1] is None and results[1][1].reason == "line_down_cap"
    assert "1 machines of line 'L1' are down already (gateway cap 1)" in str(results[1][1])
    with pytest.raises(Exception, match="guardrails are counts >= 0"):
        plant.set_guardrails(max_down_per_line=-1)


def test_finding_is_the_true_counterfactual(run_messages):
    """The finding of a maintenance equals the failure the untouched twin actually has."""
    seen = {"ok": 0, "fail": 0}
    plant = tiny(seed=1)
    for _ in range(60):
        run_messages(plant, 20 * 60)
        for view in plant.machines:
            if view.down:
                continue
            twin = Plant.from_state_bytes(plant.state_bytes())
            horizon = plant.scenario.inspection_horizon_s
            future = run_messages(twin, horizon)
            fails = [m for m in future if m.machine == view.machine_id and getattr(m, "type", None) == "failure"]
            finding = plant._get(view.machine_id).finding(plant.now_ts)
            assert finding == (fails[0].mode if fails else "ok")
            seen["fail" if fails else "ok"] += 1
        if seen["fail"] >= 3 and seen["ok"] >= 3:
            break
    assert seen["fail"] >= 3 and seen["ok"] >= 3


def test_common_random_numbers_across_interventions(run_messages):
    """Maintaining one machine leaves every other machine's stream untouched."""
    a, b = tiny(seed=5), tiny(seed=5)
    ma = run_messages(a, 2 * H)
    mb = run_messages(b, 2 * H)
    b.command(contract.Command(command_id="k", line="L1", machine="mill-01", command="maintain", reason="t"))
    ma += run_messages(a, 6 * H)
    mb += run_messages(b, 6 * H)
    for mid in ("mill-02", "pump-01", "pump-02"):
        assert [m for m in ma if m.machine == mid] == [m for m in mb if m.machine == mid]
    assert [m for m in ma if m.machine == "mill-01"] != [m for m in mb if m.machine == "mill-01"]
    # the environment (air temperature) of the maintained machine follows plant time, not its history
    air_a = {m.ts: m.readings["air_temp_k"] for m in ma if m.machine == "mill-01" and hasattr(m, "readings")}
    air_b = {m.ts: m.readings["air_temp_k"] for m in mb if m.machine == "mill-01" and hasattr(m, "readings")}
    common = sorted(set(air_a) & set(air_b))
    assert len(common) > 200 and all(air_a[t] == air_b[t] for t in common)


def test_degradation_shows_in_the_proxies_before_failure(run_messages):
    """Demo physics is learnable: the hour before a TWF/OSF/BRG looks unlike a fresh machine."""
    plant = tiny(seed=2)
    msgs = run_messages(plant, 3 * 86400)
    tel: dict[str, list] = {}
    for m in msgs:
        if isinstance(m, contract.Telemetry):
            tel.setdefault(m.machine, []).append(m)
    checked = 0
    for f in msgs:
        if getattr(f, "type", None) != "failure" or f.mode not in ("TWF", "OSF", "BRG"):
            continue
        series = tel[f.machine]
        kind = series[0].kind
        _, typical, spread = REFERENCE[kind]["vibration_mm_s"]
        before = [t.readings["vibration_mm_s"] for t in series if f.ts - H < t.ts <= f.ts]
        assert sum(before) / len(before) > typical + 1.5 * spread, (f, sum(before) / len(before))
        checked += 1
    assert checked >= 5
    for mid, series in tel.items():
        kind = series[0].kind
        for name, (_, typical, spread) in REFERENCE[kind].items():
            if name in series[0].readings:
                first_hour = [t.readings[name] for t in series[:60]]
                assert abs(sum(first_hour) / 60 - typical) < 1.5 * spread, (mid, name)


def _maintained_run(run_messages, **inspection):
    """The tiny plant for a day, checked every 20 minutes: a machine due to fail is maintained,
    and every hour one healthy machine too (the same decisions whatever the inspection reports:
    they read the true condition)."""
    overrides = [f"inspection.{k}={v}" for k, v in inspection.items()]
    plant = Plant(load_scenario("tiny", overrides), seed=1)
    msgs = []
    for i in range(72):
        msgs += run_messages(plant, 20 * 60)
        running = [v for v in plant.machines if not v.down]
        due = [v for v in running if plant._get(v.machine_id).finding(plant.now_ts) != "ok"]
        healthy = [v for v in running if v not in due][:1] if i % 3 == 0 else []
        for view in due + healthy:
            plant.command(contract.Command(command_id=f"c{i}-{view.machine_id}", line=view.line,
                                           machine=view.machine_id, command="maintain", reason="t"),
                          sink=msgs.append)
    return plant, msgs


def _planned(msgs):
    return [m for m in msgs if getattr(m, "type", None) == "maintenance_start" and m.reason == "planned"]


def test_inspections_report_the_truth_by_default_and_can_miss_or_invent(run_messages):
    """A perfect inspection (the default) reproduces the stream exactly; an imperfect one
    changes only what the inspections report, never the physics or the plant's own ledger."""
    default_plant, default = _maintained_run(run_messages)
    _, perfect = _maintained_run(run_messages, sensitivity=1.0, false_finding_rate=0.0)
    assert perfect == default                              # 100% / 0%: today's stream, so today's labels
    truth = {m.event_id: m.finding for m in _planned(default)}
    assert "ok" in truth.values() and set(truth.values()) - {"ok"}, "the run needs both kinds of inspection"

    blind_plant, blind = _maintained_run(run_messages, sensitivity=0.0, false_finding_rate=1.0)
    reported = {m.event_id: m.finding for m in _planned(blind)}
    assert reported.keys() == truth.keys()
    kinds = {m.machine: m.kind for m in default if isinstance(m, contract.Telemetry)}
    machine_of = {m.event_id: m.machine for m in _planned(default)}
    for eid, true in truth.items():
        if true == "ok":   # every healthy machine gets a failure mode of its own kind
            assert reported[eid] in contract.FAILURE_MODES[kinds[machine_of[eid]]]
        else:              # every coming failure is missed
            assert reported[eid] == "ok"
    # everything else is the same stream: telemetry, failures, parts
    other = [m for m in default if getattr(m, "type", None) != "maintenance_start"]
    assert [m for m in blind if getattr(m, "type", None) != "maintenance_start"] == other
    # the plant's own KPIs count the true condition
    k, kb = default_plant.kpis().to_dict(), blind_plant.kpis().to_dict()
    assert (kb["maintenance_needed"], kb["maintenance_unneeded"]) == (k["maintenance_needed"], k["maintenance_unneeded"])


def test_inspection_parameters_are_probabilities():
    from flywheel.base.config import ConfigError

    with pytest.raises(ConfigError, match="inspection.sensitivity"):
        load_scenario("tiny", ["inspection.sensitivity=1.5"])


def test_milled_parts_carry_their_product_variant(run_messages):
    """(The ai4i calibration test checks that the variant matches each part's cutting time.)"""
    plant = tiny(seed=3)
    msgs = run_messages(plant, 12 * H)
    parts = {}
    for m in msgs:
        if getattr(m, "type", None) == "part":
            parts.setdefault(m.machine, []).append(m)
    milled = [p for machine, ps in parts.items() if machine.startswith("mill") for p in ps]
    assert milled and {p.variant for p in milled} == {"L", "M", "H"}
    for machine, ps in parts.items():
        if machine.startswith("pump"):
            assert {p.variant for p in ps} == {None}
            continue
        # the wire carries it, and it decodes back
        topic = contract.Topics("factory").for_message(ps[0])
        assert contract.decode(topic, contract.encode(ps[0])).variant == ps[0].variant


def test_control_fleet_keeps_its_policy_refuses_commands_and_is_scored_apart(run_messages):
    from factory_sim import FixedInterval, choose_control_fleet

    plant = tiny(seed=3)
    fleet = choose_control_fleet(plant.machines, 0.5, seed=3)
    kinds = {v.machine_id: v.kind for v in plant.machines}
    # half of each kind, chosen by seed: the same seed chooses the same machines
    assert sorted(kinds[m] for m in fleet) == ["milling", "pump"] and fleet == choose_control_fleet(plant.machines, 0.5, 3)
    assert choose_control_fleet(plant.machines, 0.0, 3) == []
    with pytest.raises(Exception, match=r"share should be in \[0, 1\)"):
        choose_control_fleet(plant.machines, 1.0, 3)
    plant.set_control_fleet(fleet, FixedInterval({"milling": 1 * H, "pump": 2 * H}))
    mill = next(m for m in fleet if kinds[m] == "milling")
    line = plant.machine(mill).line
    with pytest.raises(SimCommandError, match="control fleet") as err:
        plant.command(contract.Command(command_id="x", line=line, machine=mill, command="maintain", reason="t"))
    assert err.value.reason == "control_fleet"
    msgs = run_messages(plant, 6 * H)
    starts = [m for m in msgs if getattr(m, "type", None) == "maintenance_start" and m.reason == "planned"]
    # the fixed-interval policy, and only it, maintains the control fleet; the other machines run to failure
    assert starts and {m.machine for m in starts} <= set(fleet)
    assert all(m.command_id.startswith("fixed_interval-") for m in starts)
    groups = {k: v.to_dict() for k, v in plant.group_kpis().items()}
    total = plant.kpis().to_dict()
    assert set(groups) == {"treated", "control"}
    for key in ("parts", "failures", "maintenance_actions"):
        assert groups["treated"][key] + groups["control"][key] == total[key]
    assert groups["treated"]["maintenance_actions"] == 0 and groups["control"]["maintenance_actions"] == len(starts)
    # the fleet and its policy are part of the plant's state: a resumed plant continues identically
    again = Plant.from_state_bytes(plant.state_bytes())
    assert again.control_fleet == frozenset(fleet)
    assert run_messages(again, 2 * H) == run_messages(plant, 2 * H)
    assert tiny(seed=3).group_kpis() == {}
