"""What one turn did, stage by stage: a typed result per stage and the turn record built from them.

Each stage step of :meth:`flywheel.loop.Campaign.run_turn` returns one result; the
:class:`TurnRecord` holds them and is the one place that knows the turn's layout:

* ``to_dict()`` / ``from_dict()``: the turn as ``state.json`` stores it (``turns[i]``), read
  back by the report;
* ``metrics()``: the turn's MLflow metrics (their names are a public interface, see
  ``docs/architecture.md``);
* ``history_row()`` / ``summary_line()``: the live view's table row and log line.

The stored turn, key by key (``[...]``: only when it applies)::

    turn, started, [attempt, aborted_attempts], run_id,                 the turn, its attempt, its MLflow run
    [dataset_id, data,                                                  1. DataResult      (turn > 0)
     challenger_version, promoted, gate_reason, eval, champion_eval, train,   2. GateResult (turn > 0)
     [baseline_eval], [reference]]                                         (when the turn had them)
    champion_version,                                                   3. DeployResult
    [bridge_threshold], sim (+ sim.bridge), ingest, factory,            4. PlantResult
    [shadow, promotion_rule]                                            4b. ShadowResult (serve.shadow) and
                                                                            which rule decided the promotion
    [canary, promotion_rule]                                            4b. CanaryResult (serve.canary_share)
    baselines, gap_closed, failures_avoided,                            5. BaselineResult
    wall_s                                                              seconds per stage, and the turn's
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

POLICIES = ("run_to_failure", "fixed_interval", "oracle")
#: The KPIs of each baseline policy logged as ``baseline.<policy>.<kpi>``.
BASELINE_KPIS = ("oee", "unplanned_downtime_min", "failures", "maintenance_needed", "maintenance_unneeded",
                 "cost_total")
#: The turn's metrics the campaign's parent run carries too, one step per turn: the curve.
PARENT_CURVE = ("factory.oee", "eval.macro_f1", "eval.auroc_any_failure", "factory.gap_closed",
                "factory.unplanned_downtime_min")
#: The turn's reference-family metrics (``reference_model.<family>.*``) go on the parent run too.
REFERENCE_PREFIX = "reference_model."
#: The "no model" scores kept per turn (the majority label on the turn's eval split).
BASELINE_KEYS = ("eval.macro_f1", "eval.auroc_any_failure", "eval.accuracy")
#: What the journal of a dead attempt says about it in the record of the turn that reran.
ABORTED_FIELDS = ("attempt", "stage", "run_id", "failed_runs", "abandoned_versions", "rows_set_aside", "redelivered")


def parent_curve(metrics: dict) -> dict:
    """The turn's metrics its campaign's parent run carries, one step per turn: the curve
    (:data:`PARENT_CURVE`) and every reference-family metric (``reference_model.*``)."""
    return {k: v for k, v in metrics.items() if k in PARENT_CURVE or k.startswith(REFERENCE_PREFIX)}


#: The KPIs logged per machine group when the plant has a control fleet (``control.*``, ``treated.*``).
GROUP_KPIS = ("oee", "availability", "failures", "unplanned_downtime_min", "maintenance_actions", "scrap")


def price_compute(compute: dict, prices: dict) -> dict:
    """``model_cost.<family>.train_eur`` (one training) and ``.eur_per_1k_predictions`` from the
    ``compute.<family>.*`` seconds, at ``prices`` (``cpu_core_hour_eur`` per CPU core-hour,
    ``gpu_hour_eur`` per GPU-hour; a run on GPUs pays for the GPUs, one on CPUs for its cores)."""
    out: dict = {}
    families = sorted({k.split(".")[1] for k in compute if k.startswith("compute.") and k.count(".") == 2})
    for f in families:
        gpus, cores = compute.get(f"compute.{f}.gpus", 0.0), compute.get(f"compute.{f}.cores", 1.0)
        per_s = (gpus * prices["gpu_hour_eur"] if gpus else cores * prices["cpu_core_hour_eur"]) / 3600.0
        if f"compute.{f}.train_s" in compute:
            out[f"model_cost.{f}.train_eur"] = compute[f"compute.{f}.train_s"] * per_s
        if f"compute.{f}.predict_ms_per_window" in compute:
            out[f"model_cost.{f}.eur_per_1k_predictions"] = compute[f"compute.{f}.predict_ms_per_window"] * per_s
    return out


def gap_closed(oee_model: float, oee_rtf: float, oee_oracle: float) -> float | None:
    """Fraction of the run-to-failure -> oracle OEE gap the model's policy has closed."""
    gap = oee_oracle - oee_rtf
    if gap <= 1e-9:
        return None
    return (oee_model - oee_rtf) / gap


@dataclass
class DataResult:
    """1. Data: the snapshot built from the lake."""

    dataset_id: str | None
    #: windows_train, windows_eval, failure_windows_train, and with a calibration split
    #: windows_calibration (+ events, telemetry, duplicates_removed)
    counts: dict
    #: where the snapshot lives, for training (not stored: the id names it)
    path: str | None = None

    @classmethod
    def from_snapshot(cls, snap) -> "DataResult":
        manifest = snap.manifest
        split = manifest.get("counts", {})
        train, ev = split.get("train", {}), split.get("eval", {})
        counts = {"windows_train": int(sum(train.values())), "windows_eval": int(sum(ev.values())),
                  "failure_windows_train": int(sum(v for k, v in train.items() if k != "ok"))}
        if "calibration" in split:
            counts["windows_calibration"] = int(sum(split["calibration"].values()))
        for k in ("events", "telemetry", "duplicates_removed"):
            if isinstance(manifest.get(k), (int, float)):
                counts[k] = manifest[k]
        return cls(snap.dataset_id, counts, snap.path)

    def describe(self) -> str:
        cal = self.counts.get("windows_calibration")
        return (f"{self.dataset_id}  ({self.counts['windows_train']} train / "
                + (f"{cal} calibration / " if cal is not None else "") + f"{self.counts['windows_eval']} eval windows)")


@dataclass
class GateResult:
    """2. Model: the challenger trained on the snapshot, and what the gate decided."""

    challenger_version: str | None
    promoted: bool | None
    reason: str | None
    #: the version holding the champion alias after the gate (None: no model yet)
    champion_version: str | None
    #: the challenger on the snapshot's eval split (``eval.*``)
    eval: dict = field(default_factory=dict)
    #: the champion before the gate on the same slice (``eval.*``; empty without one)
    champion_eval: dict = field(default_factory=dict)
    #: ``train.*``
    train: dict = field(default_factory=dict)
    #: no model: the majority label on the same eval split (``eval.*`` of :data:`BASELINE_KEYS`)
    baseline_eval: dict = field(default_factory=dict)
    #: the reference family on the same eval split (``reference_model.<family>.*``; empty: none trained)
    reference: dict = field(default_factory=dict)
    #: the gate's evidence: ``gate.diff``, ``gate.ci_low``, ``gate.ci_high``, ``gate.n_failure_windows``, ...
    evidence: dict = field(default_factory=dict)
    #: the operating point chosen on the calibration split: ``calibration.risk_threshold``, ...
    calibration: dict = field(default_factory=dict)
    #: challenger and champion on the reference plant: ``reference.challenger.<m>``, ``reference.champion.<m>``
    reference_plant: dict = field(default_factory=dict)
    #: what each family took on this machine (``compute.<family>.*``) and what that costs at the
    #: campaign's prices (``model_cost.<family>.*``, :func:`price_compute`)
    compute: dict = field(default_factory=dict)
    #: passed the offline gate but held for a shadow period (``train.promote_after_shadow``)
    held: bool = False

    @classmethod
    def from_outcome(cls, outcome) -> "GateResult":
        """From ``finetune.train_and_register``'s outcome."""
        baseline = getattr(outcome, "baseline_metrics", None) or {}
        return cls(challenger_version=outcome.version, promoted=outcome.promoted, reason=outcome.reason,
                   champion_version=outcome.champion_version, eval=_prefixed(outcome.challenger_metrics, "eval."),
                   champion_eval=_prefixed(outcome.champion_metrics or {}, "eval."),
                   train=_prefixed(outcome.train_metrics, "train."),
                   baseline_eval=_prefixed({k: v for k, v in baseline.items() if k in BASELINE_KEYS}, "eval."),
                   reference=_prefixed(getattr(outcome, "reference_metrics", None) or {}, REFERENCE_PREFIX),
                   evidence=_prefixed(getattr(outcome, "gate_metrics", None) or {}, "gate."),
                   calibration=dict(getattr(outcome, "calibration_metrics", None) or {}),
                   compute=dict(getattr(outcome, "compute_metrics", None) or {}),
                   held=bool(getattr(outcome, "held", False)))

    @property
    def reference_families(self) -> list[str]:
        """The reference families trained in the turn (``gbdt``), in the order first logged."""
        return list(dict.fromkeys(k.split(".")[1] for k in self.reference if k.count(".") >= 2))

    @property
    def risk_threshold(self) -> float | None:
        """The challenger's operating point: the risk that maximised its any-failure F1 on the
        calibration split (a turn recorded before calibration splits: on the eval split)."""
        if self.calibration:
            return self.calibration.get("calibration.risk_threshold")
        return self.eval.get("eval.risk_threshold")

    def describe(self) -> str:
        return f"v{self.challenger_version}: {'promoted' if self.promoted else 'refused'} ({self.reason})"


@dataclass
class DeployResult:
    """3. Deploy: the version Serve runs for the next plant period (None: no model, run to failure)."""

    champion_version: str | None
    #: Serve was pointed at it in this turn
    swapped: bool = False
    #: the challenger served beside it as the shadow (``serve.shadow=challenger``; None: none)
    shadow_version: str | None = None
    #: why nothing is shadowed although ``serve.shadow`` asks for it
    shadow_note: str = ""
    #: the challenger commanding the canary machines (``serve.canary_share``; None: none)
    canary_version: str | None = None
    #: the machines it commands this period (chosen by seed and turn)
    canary_machines: list[str] = field(default_factory=list)
    #: why there is no canary although ``serve.canary_share`` asks for one
    canary_note: str = ""

    def describe(self) -> str:
        return f"v{self.champion_version}" if self.champion_version else "none (run to failure)"


@dataclass
class PlantResult:
    """4. Plant: the period the served model drove, and what ingest landed of it."""

    #: the simulator's summary (published, commands_applied, ...)
    sim: dict
    #: ingest's counters once the period landed
    ingest: dict
    #: the plant's KPIs over the period (oee, unplanned_downtime_min, failures, maintenance_*)
    factory: dict
    #: the bridge's counters (predictions, commands, ...); None when no model served
    bridge: dict | None = None
    #: the risk at which the bridge asked for maintenance; None when no model served
    threshold: float | None = None

    @classmethod
    def from_period(cls, sim: dict, ingest: dict, factory: dict, threshold: float | None) -> "PlantResult":
        """From ``Campaign._run_period``'s summary (the bridge's counters under ``bridge``)."""
        sim = dict(sim)
        bridge = sim.pop("bridge", None)
        return cls(sim=sim, ingest=ingest, factory=factory, bridge=bridge, threshold=threshold)

    def sim_dict(self) -> dict:
        return self.sim if self.bridge is None else {**self.sim, "bridge": self.bridge}


class _LiveResult:
    """What the live evidence records share: a dict without the empty fields, and back (a field
    missing from an older record takes its default, or None)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{f.name: d.get(f.name, f.default if f.default is not dataclasses.MISSING else
                                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                      for f in dataclasses.fields(cls)})


@dataclass
class ShadowResult(_LiveResult):
    """4b. Shadow: the turn's challenger beside the champion in the plant period (``serve.shadow``),
    both scored on the period's outcomes, and the promote-after-shadow rule when it applied."""

    #: the shadow challenger (None: nothing was shadowed; ``note`` says why)
    version: str | None
    #: the champion it ran beside
    champion_version: str | None
    #: ``live.*`` (the champion) and ``shadow.*`` on the same windows (:func:`flywheel.shadow.score_period`)
    metrics: dict = field(default_factory=dict)
    note: str = ""
    #: ``promote_after_shadow`` when that rule decided the promotion (else the offline gate did)
    rule: str | None = None
    promoted: bool | None = None
    reason: str | None = None



@dataclass
class CanaryResult(_LiveResult):
    """4b. Canary: the turn's challenger commanded a share of the machines in the plant period
    (``serve.canary_share``), the champion the rest; each group's KPIs, the difference of their
    cost per machine-hour with its interval, and the promote-after-canary rule (:mod:`flywheel.canary`)."""

    #: the canary challenger (None: there was no canary; ``note`` says why)
    version: str | None
    #: the champion that commanded the other machines
    champion_version: str | None
    #: the canary machines' ids
    machines: list[str] = field(default_factory=list)
    #: ``canary.*`` and ``champion_group.*`` (:func:`flywheel.canary.compare`) and the bridge's canary counters
    metrics: dict = field(default_factory=dict)
    note: str = ""
    #: ``promote_after_canary`` when that rule decided the promotion
    rule: str | None = None
    promoted: bool | None = None
    reason: str | None = None



@dataclass
class BaselineResult:
    """5. Baselines: the same period under each policy, and how the served model compares."""

    #: per policy (``POLICIES``): its KPIs over the period
    kpis: dict[str, dict]
    #: share of the run-to-failure -> oracle OEE gap the model closed (None: no gap)
    gap_closed: float | None
    #: run-to-failure's failures minus the plant's
    failures_avoided: int | None

    def savings(self, factory: dict) -> dict[str, float]:
        """Money the model-driven plant saved against each baseline over the period (the
        baseline's ``cost_total`` minus the plant's; negative: it cost more)."""
        if "cost_total" not in factory:
            return {}
        return {f"savings_vs_{name}": self.kpis[name]["cost_total"] - factory["cost_total"]
                for name in ("run_to_failure", "fixed_interval") if "cost_total" in self.kpis.get(name, {})}

    @property
    def above_bound(self) -> bool:
        """The model's plant beat the oracle in this period (gap closed above 1).

        The oracle decides on the model's grid with perfect information and the same random
        streams, so this should not happen; when it does, either luck (a random failure that
        depends on when a part runs, a maintenance the oracle put just before the period's end)
        or a bug (leaked information, a broken baseline). The report flags it loudly."""
        return self.gap_closed is not None and self.gap_closed > 1.0 + 1e-9

    @classmethod
    def compare(cls, kpis: dict[str, dict], factory: dict) -> "BaselineResult":
        return cls(kpis=kpis,
                   gap_closed=gap_closed(factory["oee"], kpis["run_to_failure"]["oee"], kpis["oracle"]["oee"]),
                   failures_avoided=kpis["run_to_failure"]["failures"] - factory["failures"])


@dataclass
class TurnRecord:
    """One turn: its stage results, its attempt, its MLflow run and its wall time per stage."""

    turn: int
    started: str | None = None
    run_id: str | None = None
    #: 1, or the attempt that reran the turn after ``attempt - 1`` died
    attempt: int = 1
    #: what the journal said of each dead attempt (stored only with ``attempt > 1``)
    aborted_attempts: list[dict] = field(default_factory=list)
    data: DataResult | None = None
    gate: GateResult | None = None
    deploy: DeployResult | None = None
    plant: PlantResult | None = None
    baselines: BaselineResult | None = None
    shadow: ShadowResult | None = None
    canary: CanaryResult | None = None
    #: seconds per stage (dataset, train, swap, plant, ingest, baselines) and ``turn``, the whole turn
    wall_s: dict[str, float] = field(default_factory=dict)

    @property
    def champion_version(self) -> str | None:
        return self.deploy.champion_version if self.deploy else None

    @property
    def promotion_rule(self) -> str | None:
        """Which rule decided the turn's promotion: ``promote_after_shadow`` (live evidence from a shadow
        period), ``promote_after_canary`` (the groups of a canary period) or ``offline_gate`` (the gate on
        the snapshot's eval split); None without a challenger."""
        if self.gate is None:
            return None
        if self.canary is not None and self.canary.rule:
            return self.canary.rule
        return "promote_after_shadow" if self.shadow is not None and self.shadow.rule else "offline_gate"

    # -- state.json ---------------------------------------------------------
    def to_dict(self) -> dict:
        """The turn as ``state.json`` stores it (the layout in the module docstring)."""
        d: dict = {"turn": self.turn, "started": self.started}
        if self.attempt > 1:
            d["attempt"] = self.attempt
            d["aborted_attempts"] = self.aborted_attempts
        d["run_id"] = self.run_id
        if self.data is not None:
            d["dataset_id"] = self.data.dataset_id
            d["data"] = self.data.counts
        if self.gate is not None:
            g = self.gate
            d.update(challenger_version=g.challenger_version, promoted=g.promoted, gate_reason=g.reason,
                     eval=g.eval, champion_eval=g.champion_eval, train=g.train)
            if g.baseline_eval:
                d["baseline_eval"] = g.baseline_eval
            if g.reference:
                d["reference"] = g.reference
            if g.evidence:
                d["gate"] = g.evidence
            if g.calibration:
                d["calibration"] = g.calibration
            if g.reference_plant:
                d["reference_plant"] = g.reference_plant
            if g.compute:
                d["compute"] = g.compute
            if g.held:
                d["held_for_shadow"] = True   # held for live evidence: a shadow or a canary period
        d["champion_version"] = self.champion_version
        if self.plant is not None:
            if self.plant.threshold is not None:
                d["bridge_threshold"] = self.plant.threshold
            d["sim"] = self.plant.sim_dict()
            d["ingest"] = self.plant.ingest
            d["factory"] = self.plant.factory
        if self.shadow is not None:
            d["shadow"] = self.shadow.to_dict()
            d["promotion_rule"] = self.promotion_rule
        if self.canary is not None:
            d["canary"] = self.canary.to_dict()
            d["promotion_rule"] = self.promotion_rule
        if self.baselines is not None:
            d["baselines"] = self.baselines.kpis
            d["gap_closed"] = self.baselines.gap_closed
            d["failures_avoided"] = self.baselines.failures_avoided
        d["wall_s"] = self.wall_s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TurnRecord":
        """A stored turn (``state.json``), also one of an older layout with keys missing."""
        rec = cls(turn=d["turn"], started=d.get("started"), run_id=d.get("run_id"), attempt=d.get("attempt", 1),
                  aborted_attempts=list(d.get("aborted_attempts", [])), wall_s=dict(d.get("wall_s", {})))
        if "data" in d or "dataset_id" in d:
            rec.data = DataResult(d.get("dataset_id"), dict(d.get("data", {})))
        if any(k in d for k in ("challenger_version", "promoted", "gate_reason", "eval", "champion_eval", "train")):
            rec.gate = GateResult(challenger_version=d.get("challenger_version"), promoted=d.get("promoted"),
                                  reason=d.get("gate_reason"), champion_version=d.get("champion_version"),
                                  eval=dict(d.get("eval", {})), champion_eval=dict(d.get("champion_eval", {})),
                                  train=dict(d.get("train", {})), baseline_eval=dict(d.get("baseline_eval", {})),
                                  reference=dict(d.get("reference", {})), evidence=dict(d.get("gate", {})),
                                  calibration=dict(d.get("calibration", {})),
                                  reference_plant=dict(d.get("reference_plant", {})),
                                  compute=dict(d.get("compute", {})), held=bool(d.get("held_for_shadow")))
        if "shadow" in d:
            rec.shadow = ShadowResult.from_dict(d["shadow"])
        if "canary" in d:
            rec.canary = CanaryResult.from_dict(d["canary"])
        rec.deploy = DeployResult(d.get("champion_version"), swapped="swap" in rec.wall_s)
        rec.plant = PlantResult.from_period(d.get("sim", {}), dict(d.get("ingest", {})), dict(d.get("factory", {})),
                                            d.get("bridge_threshold"))
        rec.baselines = BaselineResult(dict(d.get("baselines", {})), d.get("gap_closed"), d.get("failures_avoided"))
        return rec

    # -- MLflow -------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The turn's flat MLflow metrics: ``data.*``, ``eval.*``, ``train.*``, ``reference_model.*``,
        ``factory.*``, ``baseline.<policy>.*``, ``serve.*``, ``turn.*``, ``lake.rows_set_aside``."""
        m: dict = {}
        if self.data is not None:
            m.update({f"data.{k}": v for k, v in self.data.counts.items()})
        if self.gate is not None:
            m.update(self.gate.eval)
            m.update(self.gate.train)
            m.update(self.gate.reference)
            m.update(self.gate.evidence)
            m.update(self.gate.calibration)
            m.update(self.gate.reference_plant)
            m.update(self.gate.compute)
        if self.plant is not None:
            m.update({f"factory.{k}": v for k, v in self.plant.factory.items() if isinstance(v, (int, float))})
            for group, kp in (self.plant.factory.get("groups") or {}).items():   # control fleet vs the rest
                m.update({f"{group}.{k}": kp[k] for k in GROUP_KPIS if k in kp})
        if self.baselines is not None:
            for name, kp in self.baselines.kpis.items():
                m.update({f"baseline.{name}.{k}": kp[k] for k in BASELINE_KPIS if k in kp})
            if self.baselines.gap_closed is not None:
                m["factory.gap_closed"] = self.baselines.gap_closed
                # 1.0 when the model's plant beat the oracle (the bound) in this period: see above_bound
                m["factory.above_oracle"] = float(self.baselines.above_bound)
            if self.plant is not None:
                m.update({f"factory.{k}": v for k, v in self.baselines.savings(self.plant.factory).items()})
        if self.shadow is not None:
            m.update(self.shadow.metrics)
            if self.shadow.rule:
                m["shadow.promoted"] = float(bool(self.shadow.promoted))
        if self.canary is not None:
            m.update(self.canary.metrics)
            if self.canary.rule:
                m["canary.promoted"] = float(bool(self.canary.promoted))
        if self.plant is not None and self.plant.threshold is not None:
            m["serve.risk_threshold"] = self.plant.threshold
        if self.attempt > 1 and self.aborted_attempts:
            m["turn.aborted_attempts"] = len(self.aborted_attempts)
            m["lake.rows_set_aside"] = sum(sum((a.get("rows_set_aside") or {}).values())
                                           for a in self.aborted_attempts)
        if self.baselines is not None:
            m["factory.failures_avoided"] = self.baselines.failures_avoided
        if self.plant is not None:
            m.update({f"serve.bridge_{k}": v for k, v in (self.plant.bridge or {}).items()})
            # orders the plant's gateway refused, by reason (its guardrails, a machine already down, ...)
            m.update({f"sim.refused.{r}": n for r, n in (self.plant.sim.get("refused_by_reason") or {}).items()})
        if "turn" in self.wall_s:
            m["turn.wall_s"] = self.wall_s["turn"]
        m.update({f"turn.stage_s.{k}": v for k, v in self.wall_s.items() if k != "turn"})
        return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and v == v}

    # -- the live view ------------------------------------------------------
    def history_row(self) -> dict:
        """The turn's row in the live view's table."""
        b = self.baselines.kpis
        factory = self.plant.factory
        ev = self.gate.eval if self.gate else {}
        return {"turn": self.turn, "windows": self.data.counts.get("windows_train", "-") if self.data else "-",
                "macro_f1": fmt(ev.get("eval.macro_f1")), "auroc": fmt(ev.get("eval.auroc_any_failure")),
                "model": f"v{self.champion_version}" if self.champion_version else "-",
                "oee": fmt(factory["oee"], pct=True), "oee_rtf": fmt(b["run_to_failure"]["oee"], pct=True),
                "oee_oracle": fmt(b["oracle"]["oee"], pct=True), "gap": fmt(self.baselines.gap_closed, pct=True),
                "failures": factory["failures"], "wall": f"{self.wall_s['turn']:.0f}"}

    def summary_line(self) -> str:
        """The line the live view keeps for the turn."""
        h = self.history_row()
        families = self.gate.reference_families if self.gate else []
        family = families[0] if families else "gbdt"
        trees = self.gate.reference.get(f"{REFERENCE_PREFIX}{family}.macro_f1") if self.gate else None
        word = "trees" if family == "gbdt" else family
        ev = self.gate.evidence if self.gate else {}
        metric = re.search(r"eval\.(\w+)", self.gate.reason or "") if self.gate else None
        name = {"auroc_any_failure": "AUROC", "macro_f1": "macro-F1"}.get(metric.group(1), metric.group(1)) \
            if metric else ""
        gate = (f", gate {name + ' ' if name else ''}{ev['gate.diff']:+.3f} "
                f"[{ev['gate.ci_low']:+.3f}, {ev['gate.ci_high']:+.3f}]" if "gate.ci_low" in ev else "")
        return (f"turn {h['turn']}: model {h['model']}, macro-F1 {h['macro_f1']}"
                + (f" ({word} {fmt(trees)})" if trees is not None else "") + gate + f", AUROC {h['auroc']}, "
                f"OEE {h['oee']} (run-to-failure {h['oee_rtf']}, oracle {h['oee_oracle']}, gap closed {h['gap']}), "
                f"failures {h['failures']}" + _money(self.plant.factory, self.baselines.savings(self.plant.factory))
                + f", {h['wall']} s")


def _money(factory: dict, savings: dict) -> str:
    """``, cost 41.2k EUR (saved 28.4k vs run-to-failure, -1.3k vs fixed interval)``; "" without costs."""
    if "cost_total" not in factory:
        return ""
    parts = [f"{savings[k] / 1000:+.1f}k vs {label}" for k, label in
             (("savings_vs_run_to_failure", "run-to-failure"), ("savings_vs_fixed_interval", "fixed interval"))
             if k in savings]
    return f", cost {factory['cost_total'] / 1000:.1f}k EUR" + (f" (saved {', '.join(parts)})" if parts else "")


def _prefixed(metrics: dict, prefix: str) -> dict:
    return {(k if k.startswith(prefix) else prefix + k): v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def fmt(x, pct: bool = False, nd: int = 3) -> str:
    """A number as people read it in the live view and the report: ``-`` when missing, a
    percentage with one decimal for fractions (``pct``), else ``nd`` decimals."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}%" if pct else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))
