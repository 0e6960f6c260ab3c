"""The campaign config: one typed object for a whole run of the flywheel.

A campaign is turn 0 (the plant under run-to-failure, collecting the first data) plus
``turns`` learning turns, each over ``period`` of plant time.  Stage settings are passed
through to each stage's own typed config (``dataset`` -> ``ingest.BuildConfig``,
``train`` -> ``finetune.TrainConfig``, ``serve`` / ``bridge`` -> ``serve``'s configs), and
checked against them when the campaign is loaded, so a typo fails at once, not at turn 3.

    flywheel demo                                  # flywheel/configs/demo.yaml
    flywheel run --config my.yaml turns=5 seed=2   # any file, with overrides
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from flywheel.base.config import ConfigError, from_dict, load, parse_duration
from flywheel.base.governance import GovernancePolicy
from flywheel.base.workdir import check_campaign_name
from flywheel.reference import ReferenceConfig


@dataclass
class BaselineConfig:
    fixed_interval_s: dict[str, float] = field(
        default_factory=lambda: {"milling": 9000.0, "pump": 86400.0},
        metadata={"help": "fixed-interval preventive maintenance: run time between services, per kind"})
    oracle_lead_s: float | None = field(default=None, metadata={
        "help": "unset (default): the oracle is the bound - perfect information, maintaining at the best of the "
                "model's decision points (window ends) before each wear failure; a number of plant seconds: the "
                "older, cautious oracle that maintains once the true time to failure is below it (not a bound)"})


#: How the campaign's simulated plant reaches the stack: the contract's JSON topics, or a plant
#: protocol read by the gateway (flywheel gateway).
PLANT_PROTOCOLS = ("json", "opcua", "sparkplug")


@dataclass
class PlantConfig:
    protocol: str = field(default="json", metadata={
        "help": "how the plant reaches the stack: json (the simulator publishes the contract's topics), opcua (an "
                "OPC UA server per plant) or sparkplug (Sparkplug B edge nodes), each read by the plant gateway; "
                "the same seed gives the same plant either way"})

    def __post_init__(self):
        if self.protocol not in PLANT_PROTOCOLS:
            raise ConfigError(f"plant.protocol {self.protocol!r} is not one of {', '.join(PLANT_PROTOCOLS)}")


#: where a campaign's serving bridge runs (``bridge_host``)
BRIDGE_HOSTS = ("actor", "thread")


@dataclass
class CampaignConfig:
    campaign: str = field(default="demo", metadata={"help": "campaign name (MLflow experiment flywheel-<name>)"})
    scenario: str = field(default="demo", metadata={"help": "factory_sim scenario name or YAML path"})
    scenario_overrides: list[str] = field(default_factory=list, metadata={"help": "key=value for the scenario"})
    seed: int = field(default=0, metadata={"help": "plant, split and training seed"})
    turns: int = field(default=3, metadata={"help": "learning turns after turn 0"})
    period: str = field(default="2d", metadata={"help": "plant time per turn (90m, 12h, 2d)"})
    model_name: str = field(default="fault-detector", metadata={"help": "MLflow registered model"})
    base_model: str = field(default="minilm", metadata={"help": "minilm, a local model dir or a hub id"})
    topic_root: str = field(default="factory", metadata={"help": "MQTT topic root"})
    collectors: int = field(default=1, metadata={"help": "ingest collector actors"})
    lockstep_timeout_s: float = field(default=60.0, metadata={"help": "sim waits this long for the model"})
    bridge_host: str = field(default="actor", metadata={
        "help": "where the serving bridge runs in a plant period: actor (a Ray actor of its own on the driver's "
                "node, beside the simulator rather than sharing its interpreter lock; logs in "
                "<workdir>/logs/bridge.log) or thread (a thread of the campaign's process); the same seed gives "
                "the same numbers either way"})
    metrics_port: int | None = field(default=None, metadata={
        "help": "serve Prometheus metrics of the simulator, the serving bridge and the ingest collectors on "
                "this port (/metrics; 0: any free port); unset: none"})
    compute_prices: dict = field(default_factory=lambda: {"cpu_core_hour_eur": 0.04, "gpu_hour_eur": 2.5}, metadata={
        "help": "what compute costs, to price each model family's training and inference (model_cost.*): EUR per "
                "CPU core-hour and per GPU-hour (defaults: orders of magnitude of cloud on-demand prices)"})
    control_fleet: float = field(default=0.0, metadata={
        "help": "share of each machine kind (chosen by seed) kept on fixed-interval maintenance "
                "(baselines.fixed_interval_s) and scored apart (control.*, treated.*): the comparison a real plant "
                "can make without a simulated baseline; 0 = none"})
    window: dict = field(default_factory=dict, metadata={"help": "flywheel.base.features.WindowConfig fields"})
    dataset: dict = field(default_factory=dict, metadata={"help": "ingest.BuildConfig fields (besides window)"})
    train: dict = field(default_factory=dict, metadata={"help": "finetune.TrainConfig fields"})
    serve: dict = field(default_factory=dict, metadata={"help": "serve.ServeConfig fields"})
    bridge: dict = field(default_factory=dict, metadata={"help": "serve.BridgeConfig fields (threshold, cooldown...)"})
    tune_threshold: bool = field(default=True, metadata={
        "help": "ask for maintenance at each model's own operating point: the risk threshold that maximised "
                "its any-failure F1 on its snapshot's calibration split; false: bridge.threshold for every model"})
    governance: GovernancePolicy = field(default_factory=GovernancePolicy, metadata={
        "help": "which base models and licences the campaign's models may build on (flywheel.base.governance): "
                "training refuses others before any compute, serving refuses versions built on them"})
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    plant: PlantConfig = field(default_factory=PlantConfig, metadata={
        "help": "the simulated plant's link to the stack (plant.protocol)"})
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata={
        "help": "the reference plant every turn's models are scored on (flywheel.reference)"})

    def __post_init__(self):
        check_campaign_name(self.campaign)
        if self.turns < 0:
            raise ConfigError(f"turns should be >= 0, got {self.turns}")
        if parse_duration(self.period) <= 0:
            raise ConfigError(f"period should be a positive plant time such as 2d, got {self.period!r}")
        extra = set(self.compute_prices) - {"cpu_core_hour_eur", "gpu_hour_eur"}
        if extra:
            raise ConfigError(f"compute_prices has unknown keys {sorted(extra)}; it takes cpu_core_hour_eur and "
                              "gpu_hour_eur (EUR per hour)")
        for key in ("cpu_core_hour_eur", "gpu_hour_eur"):
            v = self.compute_prices.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ConfigError(f"compute_prices.{key} should be a number of EUR per hour >= 0, got {v!r}")
        if not 0.0 <= self.control_fleet < 1.0:
            raise ConfigError(f"control_fleet should be a share in [0, 1) of each machine kind, got {self.control_fleet}")
        if self.bridge_host not in BRIDGE_HOSTS:
            raise ConfigError(f"bridge_host {self.bridge_host!r} is not one of {', '.join(BRIDGE_HOSTS)}")
        if self.collectors < 1:
            raise ConfigError(f"collectors should be >= 1, got {self.collectors}")

    @property
    def period_s(self) -> float:
        return parse_duration(self.period)

    @property
    def run_name(self) -> str:
        return self.campaign

    @property
    def mqtt_name(self) -> str:
        """What the campaign's MQTT client ids carry (its collectors', its bridge's): the campaign and
        its topic root, so that campaigns sharing a broker never take each other's sessions, also two
        of one name under topic roots of their own."""
        return f"{self.campaign}-{self.topic_root.replace('/', '-')}"


def default_config_path(name: str = "demo") -> Path:
    return Path(str(resources.files("flywheel") / "configs" / f"{name}.yaml"))


def load_campaign(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                  validate_stages: bool = True) -> CampaignConfig:
    """Load a campaign config (default: the embedded demo) and check every stage section."""
    cfg = load(CampaignConfig, path or default_config_path("demo"), list(overrides))
    if validate_stages:
        stage_configs(cfg)
    return cfg


def stage_configs(cfg: CampaignConfig):
    """Build each stage's typed config from the campaign; errors name the section and key."""
    from flywheel.base.features import WindowConfig

    try:
        window = from_dict(WindowConfig, cfg.window, prefix="window.")
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    out = {"window": window}
    _check_window_in_plant_time(cfg, window)
    from ingest import BuildConfig

    build_fields = {f.name for f in dataclasses.fields(BuildConfig)}
    data = dict(cfg.dataset)
    if "window" in build_fields:
        data["window"] = window
    if "seed" in build_fields:
        data.setdefault("seed", cfg.seed)
    out["dataset"] = _build(BuildConfig, data, "dataset.")
    from finetune import TrainConfig

    train = dict(cfg.train)
    if not train.get("costs"):
        train["costs"] = decision_costs(cfg)
    train.setdefault("base_model", cfg.base_model)
    policy = dataclasses.asdict(cfg.governance)
    train.setdefault("governance", policy)
    train.setdefault("seed", cfg.seed)
    out["train"] = _build(TrainConfig, train, "train.")
    from serve import BridgeConfig, ServeConfig

    serve = dict(cfg.serve)
    serve.setdefault("governance", policy)
    out["serve"] = _build(ServeConfig, serve, "serve.")
    # No window for the bridge: it reads the one the served model version was trained on.
    out["bridge"] = _build(BridgeConfig, dict(cfg.bridge), "bridge.")
    if out["train"].promote_after_shadow and out["serve"].shadow != "challenger":
        raise ConfigError("train.promote_after_shadow=true needs the challenger shadowed in the plant period: "
                          "set serve.shadow=challenger as well" + (" (and drop serve.canary_share: a canary period "
                          "decides the promotion itself)" if out["serve"].canary_share else ""))
    if out["bridge"].canary_adapter or out["bridge"].canary_machines or out["bridge"].canary_threshold is not None:
        raise ConfigError("bridge.canary_adapter, bridge.canary_machines and bridge.canary_threshold are set by the "
                          "campaign each period (serve.canary_share), not by hand: drop them")
    if out["bridge"].shadow_adapter:
        raise ConfigError("bridge.shadow_adapter is set by the campaign (serve.shadow=challenger), not by hand: "
                          "drop it")
    return out


def _check_window_in_plant_time(cfg: CampaignConfig, window) -> None:
    """Refuse, before anything starts, a window the campaign's plant can never produce: a stride
    that is not a whole number of the scenario's ticks (window ends fall between readings), or a
    window longer than a period (turn 1 would have nothing to train on); and periods whose plant
    times would run past the wire contract's last one."""
    from factory_sim import load_scenario

    scenario = load_scenario(cfg.scenario, cfg.scenario_overrides)
    tick_s = float(scenario.tick_s)
    from flywheel.base.contract import MAX_TS

    # turn 0, the learning turns and the held-out period, at most: the plant's times stay in the contract
    if scenario.epoch_ts + (cfg.turns + 2) * cfg.period_s >= MAX_TS:
        raise ConfigError(f"period={cfg.period} over turns={cfg.turns} from the scenario's epoch ({scenario.epoch}) "
                          "runs past the year 9999, the last plant time the wire contract carries: give a shorter "
                          "period or fewer turns")
    if window.stride_s % tick_s != 0:
        raise ConfigError(f"window.stride_s should be a multiple of the plant tick ({tick_s:g} s in scenario "
                          f"{cfg.scenario!r}), got {window.stride_s:g}")
    span_s = window.length * tick_s
    if cfg.turns > 0 and span_s > cfg.period_s:
        span = f"{span_s / 86400:.1f} plant days" if span_s >= 86400 else f"{span_s / 3600:.1f} plant hours"
        raise ConfigError(f"window.length={window.length} readings span {span} (one reading every {tick_s:g} s), "
                          f"longer than a period ({cfg.period}): turn 1 would have no window to train on; shorten "
                          "window.length or lengthen period")


def decision_costs(cfg: CampaignConfig) -> dict:
    """The money one maintenance decision costs per machine kind, from the campaign's scenario
    (``costs`` and each kind's maintenance and repair durations), for the cost-optimal operating
    point (``train.costs``): a false alarm is a maintenance and its lost production (plus
    ``costs.false_alarm_eur``); a caught failure, the same maintenance; a missed failure, the
    repair, the scrapped part and the production lost while broken."""
    from factory_sim import load_scenario

    sc = load_scenario(cfg.scenario, cfg.scenario_overrides)
    c = sc.costs
    out: dict = {"false_alarm": {}, "caught": {}, "missed": {}}
    for kind in ("milling", "pump"):
        p = getattr(sc, kind)
        maintain = c.planned_maintenance_eur + p.maintenance_s / 3600.0 * c.downtime_eur_per_h
        out["false_alarm"][kind] = maintain + c.false_alarm_eur
        out["caught"][kind] = maintain
        out["missed"][kind] = c.breakdown_eur + c.scrap_part_eur + p.repair_s / 3600.0 * c.downtime_eur_per_h
    return out


def _build(cls, data: dict, prefix: str):
    try:
        return from_dict(cls, data, prefix=prefix)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from None
