"""Canary evidence: the challenger commands a share of the machines for a period, the champion the rest.

With ``serve.canary_share`` > 0, the plant period after a turn trained a challenger (one the
offline gate passed, held for this evidence) runs two groups side by side in the same plant:

* the *canary* machines, :func:`choose_canary_machines`: ``share`` of each line's
  model-driven machines (rounded, at least one per line, at least one left to the champion on a
  line of two or more; never the control fleet), drawn by the campaign's seed and the turn, so
  the same campaign draws the same machines and each turn another draw. The Serve app serves the
  challenger as adapter ``canary`` and the bridge sends those machines' windows to it: its
  decisions command them (:mod:`serve.bridge`);
* the *champion group*: every other model-driven machine, commanded by the champion.

Once the period has run, :func:`group_kpis` sums each group's plant KPIs per machine
(``failures``, ``maintenance_actions``, ``unplanned_downtime_min``, ``planned_downtime_min``,
``cost_total`` in the scenario's currency, EUR by default) and normalises the money per
machine-hour (``cost_per_machine_hour``: one machine's ``cost_total`` over the period divided by
the period's hours, averaged over the group's machines).  Machines of different kinds cost
differently whatever model commands them (a milling machine's failure is dearer than a pump's), so
:func:`compare` compares like with like: per machine kind present in both groups, the canary's
mean minus the champion group's, weighted by the canary machines of that kind
(``canary.diff_cost_per_machine_hour``; a canary machine of a kind the champion group lacks has
nothing to be compared with and is left out, ``canary.matched_machines`` says how many count),
with a percentile bootstrap interval of it over machines (each group's machines of each kind
resampled with replacement; ``confidence`` two-sided, seeded): ``canary.diff_ci_low``,
``canary.diff_ci_high``.

:func:`decide` is the promotion rule: promote the challenger only if the interval's upper bound,
the worst the canary group plausibly does, is not above the champion group's cost by more than
``train.canary_margin`` (EUR per machine-hour).  Otherwise the champion stays, and since each
period draws its canary anew only from a challenger held for evidence, the next period's bridge
sends every machine's windows to the champion again: it takes the canary machines back.

With a single machine of each kind on both sides the resamples never vary and there is no
interval at all (``canary.interval_has_spread`` = 0): the rule keeps the champion.  Few machines
give wide intervals: a plant of a dozen machines rarely proves a small gain in one
period, and the rule then keeps the champion.  That is the point of the interval.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

#: Per-machine plant KPIs summed per group (``canary.<k>``, ``champion_group.<k>``).
GROUP_SUMS = ("failures", "maintenance_actions", "unplanned_downtime_min", "planned_downtime_min", "cost_total")


def choose_canary_machines(machines: Iterable[tuple[str, str]], share: float, seed: int, turn: int,
                           exclude: Iterable[str] = ()) -> list[str]:
    """The canary machines' ids: ``share`` of each line's machines (``(line, machine_id)`` pairs;
    ``exclude``, e.g. the control fleet, never), rounded, at least one per line, and at least one
    left to the champion on a line of two or more; drawn by ``seed`` and ``turn``. Sorted."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"canary share should be in (0, 1), got {share!r}")
    skip = set(exclude)
    by_line: dict[str, list[str]] = {}
    for line, mid in machines:
        if mid not in skip:
            by_line.setdefault(line, []).append(mid)
    rng = random.Random(f"canary/{seed}/{turn}")
    out: list[str] = []
    for line in sorted(by_line):
        ids = sorted(by_line[line])
        k = max(1, round(share * len(ids)))
        if len(ids) > 1:
            k = min(k, len(ids) - 1)
        out += rng.sample(ids, k)
    return sorted(out)


def group_kpis(per_machine: dict[str, dict], canary: Iterable[str], period_s: float,
               kinds: dict[str, str] | None = None) -> dict[str, dict]:
    """``{"canary": ..., "champion_group": ...}`` from each machine's period KPIs
    (``factory_sim`` ``KPIs.to_dict()``; machines outside both groups, e.g. the control fleet, left
    out by the caller): ``machines``, the sums of :data:`GROUP_SUMS`, and ``cost_per_machine_hour``
    (the mean over the group's machines of ``cost_total`` / period hours) with each machine's
    value under ``per_machine_cost_h`` and its kind (``kinds``; None: all one kind) under
    ``per_machine_kind`` (for :func:`compare`)."""
    hours = period_s / 3600.0
    if hours <= 0:
        raise ValueError(f"the period should last > 0 s, got {period_s}")
    inside = set(canary)
    out: dict[str, dict] = {}
    for group, members in (("canary", sorted(m for m in per_machine if m in inside)),
                           ("champion_group", sorted(m for m in per_machine if m not in inside))):
        g: dict = {"machines": float(len(members))}
        for k in GROUP_SUMS:
            g[k] = float(sum(per_machine[m].get(k, 0.0) for m in members))
        costs = [per_machine[m].get("cost_total", 0.0) / hours for m in members]
        g["per_machine_cost_h"] = costs
        g["per_machine_kind"] = [(kinds or {}).get(m, "") for m in members]
        g["cost_per_machine_hour"] = sum(costs) / len(costs) if costs else float("nan")
        g["failures_per_machine"] = g["failures"] / len(members) if members else float("nan")
        out[group] = g
    return out


def _strata(canary: list[float], champion: list[float], canary_kinds: list[str] | None,
            champion_kinds: list[str] | None) -> list[tuple[list[float], list[float], float]]:
    """(canary values, champion values, weight) per kind present in both groups; the weights are the
    canary machines' shares among the matched ones."""
    ck = canary_kinds or [""] * len(canary)
    hk = champion_kinds or [""] * len(champion)
    out = []
    for kind in sorted(set(ck) & set(hk)):
        a = [v for v, k in zip(canary, ck) if k == kind]
        b = [v for v, k in zip(champion, hk) if k == kind]
        out.append((a, b, float(len(a))))
    total = sum(w for _, _, w in out)
    return [(a, b, w / total) for a, b, w in out]


def stratified_diff(canary: list[float], champion: list[float], canary_kinds: list[str] | None = None,
                    champion_kinds: list[str] | None = None) -> float:
    """Per kind in both groups, mean(canary) - mean(champion), weighted by the canary machines of the
    kind; nan when no kind is in both."""
    strata = _strata(canary, champion, canary_kinds, champion_kinds)
    if not strata:
        return float("nan")
    return sum(w * (sum(a) / len(a) - sum(b) / len(b)) for a, b, w in strata)


def bootstrap_diff(canary: list[float], champion: list[float], confidence: float = 0.9, n: int = 2000,
                   seed: int = 0, canary_kinds: list[str] | None = None,
                   champion_kinds: list[str] | None = None) -> tuple[float, float]:
    """A percentile bootstrap interval of :func:`stratified_diff` over machines (each group's machines
    of each kind resampled with replacement); (nan, nan) when no kind is in both groups."""
    strata = _strata(canary, champion, canary_kinds, champion_kinds)
    if not strata:
        return float("nan"), float("nan")
    rng = random.Random(f"canary-bootstrap/{seed}")
    diffs = sorted(sum(w * (sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b))
                       for a, b, w in strata) for _ in range(n))
    tail = (1.0 - confidence) / 2.0
    lo = diffs[max(0, int(math.floor(tail * n)))]
    hi = diffs[min(n - 1, int(math.ceil((1.0 - tail) * n)) - 1)]
    return lo, hi


def compare(groups: dict[str, dict], confidence: float = 0.9, seed: int = 0) -> dict[str, float]:
    """The period's canary metrics: ``canary.<k>`` and ``champion_group.<k>`` for each group's
    numbers, and ``canary.diff_cost_per_machine_hour`` (canary minus champion group, kind by kind)
    with its bootstrap interval ``canary.diff_ci_low`` / ``canary.diff_ci_high`` at ``canary.confidence``."""
    out: dict[str, float] = {}
    for group, g in groups.items():
        out.update({f"{group}.{k}": float(v) for k, v in g.items() if isinstance(v, (int, float))})
    c, h = groups["canary"], groups["champion_group"]
    a, b = c["per_machine_cost_h"], h["per_machine_cost_h"]
    ak, bk = c.get("per_machine_kind"), h.get("per_machine_kind")
    strata = _strata(a, b, ak, bk)
    out["canary.matched_machines"] = float(sum(len(s[0]) for s in strata))
    # one machine on each side of every kind: the resamples never vary, the interval is a point
    out["canary.interval_has_spread"] = float(any(len(x) > 1 or len(y) > 1 for x, y, _ in strata))
    out["canary.diff_cost_per_machine_hour"] = stratified_diff(a, b, ak, bk)
    out["canary.diff_ci_low"], out["canary.diff_ci_high"] = bootstrap_diff(a, b, confidence, seed=seed,
                                                                           canary_kinds=ak, champion_kinds=bk)
    out["canary.confidence"] = float(confidence)
    return out


def decide(metrics: dict, margin: float) -> tuple[bool, str]:
    """The promote-after-canary rule on :func:`compare`'s metrics: (promote?, why). Promote only if
    the interval's upper bound of (canary - champion group) cost per machine-hour is <= ``margin``."""
    hi = metrics.get("canary.diff_ci_high", float("nan"))
    diff = metrics.get("canary.diff_cost_per_machine_hour", float("nan"))
    n_c, n_h = int(metrics.get("canary.machines", 0)), int(metrics.get("champion_group.machines", 0))
    if not n_c or not n_h or math.isnan(hi) or math.isnan(diff):
        return False, (f"kept the champion: no canary evidence ({n_c} canary and {n_h} champion machines, none of "
                       "a kind in both groups): the champion commands every machine again")
    if not metrics.get("canary.interval_has_spread", 1.0):
        return False, (f"kept the champion: one machine of each kind per group ({n_c} canary, {n_h} champion "
                       f"machines) gives no interval (difference {diff:+.2f} per machine-hour); a larger share or "
                       "plant is needed: the champion commands every machine again")
    conf = metrics.get("canary.confidence", 0.9)
    verdict = (f"canary cost {metrics['canary.cost_per_machine_hour']:.2f} vs champion group "
               f"{metrics['champion_group.cost_per_machine_hour']:.2f} per machine-hour ({n_c} vs {n_h} machines), "
               f"difference of like machines {diff:+.2f} ({conf:.0%} interval {metrics['canary.diff_ci_low']:+.2f} .. {hi:+.2f}), "
               f"margin {margin:.2f}")
    if hi <= margin:
        return True, f"promoted after canary: {verdict}"
    return False, f"kept the champion after canary (it takes the canary machines back): {verdict}"
