"""The AI4I 2020 calibration: rebuild the data set's table from a published stream, compare.

The ``ai4i`` scenario runs one milling machine for 10,000 parts with the data set's
operating conditions, the true ``tool_wear_min`` published, no sensor noise on the
AI4I columns, and failures that scrap the part without stopping the machine (the
data set is per part: a failure row is followed by the next part).  Its stream holds
everything a data set row has:

* a ``part`` event states the part's product variant (L/M/H); a stream recorded before
  part events carried it gives it by the part's length (2/3/5 min of cutting = L/M/H);
* the part's first telemetry gives its temperatures, speed, torque and tool wear;
* ``failure`` events at the part's end give its failure modes (one per mode).

"failures" counts parts with at least one failure mode.  The data set's own "Machine
failure" column (339) is not quite that: it leaves out most RNF rows and flags a few
rows without a mode, so the simulated count (expected ~360 = the modes' union) sits
about one Poisson SD above it; the per-mode counts are the like-for-like comparison.

Run it and print the comparison::

    flywheel sim --scenario ai4i --speed max --out ai4i.jsonl
    python -m factory_sim.calibration ai4i.jsonl
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Iterable

from flywheel.base.contract import MachineEvent, Telemetry, Topics, decode

#: Statistics of the published AI4I 2020 data (10,000 rows), for comparison.
AI4I_PUBLISHED = {
    "parts": 10000,
    "share_L": 0.6000, "share_M": 0.2997, "share_H": 0.1003,
    "failures": 339, "TWF": 46, "HDF": 115, "PWF": 95, "OSF": 98, "RNF": 19,
    "air_temp_k_mean": 300.00, "air_temp_k_sd": 2.00,
    "process_temp_k_mean": 310.01, "process_temp_k_sd": 1.48,
    "temp_diff_k_mean": 10.00, "temp_diff_k_sd": 1.00,
    "speed_rpm_mean": 1538.8, "speed_rpm_sd": 179.3,
    "torque_nm_mean": 39.99, "torque_nm_sd": 9.97,
    "speed_torque_r": -0.875,
    "tool_wear_min_mean": 107.95, "tool_wear_min_sd": 63.65,
}
MODES = ("TWF", "HDF", "PWF", "OSF", "RNF")
_VARIANT_BY_MIN = {2: "L", 3: "M", 5: "H"}


@dataclass
class Row:
    variant: str
    air_temp_k: float
    process_temp_k: float
    speed_rpm: float
    torque_nm: float
    tool_wear_min: float
    modes: tuple[str, ...]


def table(messages: Iterable[Telemetry | MachineEvent], epoch_ts: float, tick_s: float = 60.0) -> list[Row]:
    """One row per part of a single-machine stream (in publication order)."""
    rows: list[Row] = []
    start_ts = epoch_ts
    first: Telemetry | None = None
    modes: list[str] = []
    for msg in messages:
        if isinstance(msg, Telemetry):
            if first is None:
                first = msg
        elif msg.type == "failure":
            modes.append(msg.mode)
        elif msg.type == "part":
            minutes = round((msg.ts - start_ts) / 60.0)
            r = first.readings if first is not None else {}
            # the variant as the part event states it; a stream recorded before parts carried it:
            # inferred from the cutting time (2/3/5 min = L/M/H)
            variant = msg.variant or _VARIANT_BY_MIN.get(minutes, "?")
            rows.append(Row(variant=variant, air_temp_k=r.get("air_temp_k", math.nan),
                            process_temp_k=r.get("process_temp_k", math.nan),
                            speed_rpm=r.get("rotational_speed_rpm", math.nan), torque_nm=r.get("torque_nm", math.nan),
                            # the first reading comes one tick into the part
                            tool_wear_min=r.get("tool_wear_min", math.nan) - tick_s / 60.0, modes=tuple(modes)))
            start_ts, first, modes = msg.ts, None, []
    return rows


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def statistics(rows: list[Row]) -> dict[str, float]:
    """The data set's headline statistics of ``rows`` (keys as in :data:`AI4I_PUBLISHED`)."""
    n = len(rows)
    s: dict[str, float] = {"parts": n}
    for v in "LMH":
        s[f"share_{v}"] = sum(r.variant == v for r in rows) / n
    s["failures"] = sum(bool(r.modes) for r in rows)
    for m in MODES:
        s[m] = sum(m in r.modes for r in rows)
    cols = {
        "air_temp_k": [r.air_temp_k for r in rows], "process_temp_k": [r.process_temp_k for r in rows],
        "temp_diff_k": [r.process_temp_k - r.air_temp_k for r in rows], "speed_rpm": [r.speed_rpm for r in rows],
        "torque_nm": [r.torque_nm for r in rows], "tool_wear_min": [r.tool_wear_min for r in rows],
    }
    for name, xs in cols.items():
        s[f"{name}_mean"], s[f"{name}_sd"] = _mean_sd(xs)
    sp, tq = cols["speed_rpm"], cols["torque_nm"]
    ms, ss = s["speed_rpm_mean"], s["speed_rpm_sd"]
    mt, st = s["torque_nm_mean"], s["torque_nm_sd"]
    s["speed_torque_r"] = sum((a - ms) * (b - mt) for a, b in zip(sp, tq)) / ((n - 1) * ss * st)
    return s


def report(stats: dict[str, float]) -> str:
    lines = [f"{'statistic':<22}{'simulated':>12}{'AI4I 2020':>12}"]
    for key, ref in AI4I_PUBLISHED.items():
        v = stats.get(key, math.nan)
        fmt = "{:>12.0f}" if isinstance(ref, int) else "{:>12.3f}"
        lines.append(f"{key:<22}" + fmt.format(v) + fmt.format(ref))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m factory_sim.calibration FILE.jsonl   (from flywheel sim --scenario ai4i --out FILE)")
        return 2
    from factory_sim.scenario import load_scenario

    msgs = []
    with open(argv[0], "rb") as f:
        for line in f:
            rec = json.loads(line)
            root = rec["topic"].rsplit("/", 3)[0]
            msgs.append(decode(rec["topic"], json.dumps(rec["payload"]).encode(), topics=Topics(root)))
    print(report(statistics(table(msgs, load_scenario("ai4i").epoch_ts))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
