"""Typed configuration of the ingest stage: the collectors and the dataset builder.

On the command line they are sections ``ingest`` and ``dataset`` (``flywheel ingest
ingest.collectors=2``, ``flywheel dataset build dataset.eval_fraction=0.25``).  Both are
plain dataclasses, so from Python ``flywheel.base.config.load`` builds them from YAML plus
``key=value`` overrides (unknown keys are an error)::

    from flywheel.base.config import load
    cfg = load(BuildConfig, "dataset.yaml", ["window.length=12", "eval_fraction=0.25"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.base.config import ConfigError
from flywheel.base.contract import DEFAULT_MAX_PAYLOAD_BYTES
from flywheel.base.features import WindowConfig


@dataclass(frozen=True)
class IngestConfig:
    collectors: int = field(default=1, metadata={
        "help": "collector actors sharing the stream through one MQTT 5 shared subscription"})
    client_prefix: str = field(default="flywheel", metadata={
        "help": "client ids are <prefix>-collector-<i>; keep them stable so a restarted collector "
                "resumes its broker session, and distinct per deployment so two stacks never collide"})
    share_group: str = field(default="ingest", metadata={"help": "shared-subscription group name"})
    subscription: str = field(default="auto", metadata={
        "help": "auto: a plain subscription for one collector, an MQTT 5 shared subscription "
                "($share/<group>/...) for several; shared/plain force one. Mosquitto 2.0.11 does not "
                "restore shared subscriptions from persistence: after a broker restart it drops what is "
                "published before the collectors resubscribe; a plain subscription keeps it"})
    batch_max_messages: int = field(default=5000, metadata={
        "help": "flush a batch at this many messages (at most inflight_window / 2)"})
    batch_max_age_s: float = field(default=1.0, metadata={
        "help": "flush a batch when its oldest message waited this long (wall seconds)"})
    inflight_window: int = field(default=10_000, metadata={
        "help": "MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send before it waits "
                "for acks (max 65535); batches flush at half of it, so the stream never stalls on a flush"})
    idle_flush_s: float | None = field(default=None, metadata={
        "help": "flush early when no message arrived for this long (wall seconds), so the end of a burst "
                "lands without waiting for batch_max_age_s; None: 0.25 s with MQTT 5 (the Receive Maximum "
                "keeps the broker sending during a flush), 0.05 s with MQTT 3.1.1 (the broker's own "
                "in-flight limit, unknown here, stalls the stream until a batch is acked)"})
    session_expiry_s: int = field(default=7 * 24 * 3600, metadata={
        "help": "how long the broker keeps a disconnected collector's session and queue"})
    offline_after_s: int = field(default=30, metadata={
        "help": "MQTT 5 Will Delay: a crashed collector is marked offline on its status topic only if it "
                "has not reconnected within this many seconds (a Ray restart usually takes a few)"})
    max_payload_bytes: int = field(default=DEFAULT_MAX_PAYLOAD_BYTES, metadata={
        "help": "payloads above this size are dead-lettered (reason too_large)"})
    deadletter_max_bytes: int = field(default=4096, metadata={
        "help": "raw bytes kept per dead letter (the rest is cut; the full size is recorded)"})
    status_interval_s: float = field(default=1.0, metadata={
        "help": "seconds between retained status updates on <root>/_status/ingest-<i>"})
    actor_num_cpus: float = field(default=0.25, metadata={
        "help": "Ray CPUs reserved per collector (mostly network and Parquet I/O)"})
    max_restarts: int = field(default=-1, metadata={"help": "Ray restarts of a crashed collector (-1: always)"})

    def __post_init__(self):
        if self.collectors < 1:
            raise ConfigError(f"collectors should be >= 1, got {self.collectors}")
        if self.batch_max_messages < 1:
            raise ConfigError(f"batch_max_messages should be >= 1, got {self.batch_max_messages}")
        if not self.batch_max_age_s > 0:
            raise ConfigError(f"batch_max_age_s should be > 0 seconds, got {self.batch_max_age_s}")
        if not 2 <= self.inflight_window <= 65535:
            raise ConfigError(f"inflight_window should be 2..65535 (an MQTT 5 Receive Maximum), "
                             f"got {self.inflight_window}")
        if self.idle_flush_s is not None and not self.idle_flush_s > 0:
            raise ConfigError(f"idle_flush_s should be > 0 seconds or None, got {self.idle_flush_s}")
        if self.session_expiry_s < 1:
            raise ConfigError(f"session_expiry_s should be >= 1 so the broker keeps the session across a "
                             f"restart, got {self.session_expiry_s}")
        if self.offline_after_s < 0:
            raise ConfigError(f"offline_after_s should be >= 0 seconds, got {self.offline_after_s}")
        if self.deadletter_max_bytes < 0:
            raise ConfigError(f"deadletter_max_bytes should be >= 0, got {self.deadletter_max_bytes}")
        if self.subscription not in ("auto", "shared", "plain"):
            raise ConfigError(f"subscription should be auto, shared or plain, got {self.subscription!r}")
        if self.subscription == "plain" and self.collectors > 1:
            raise ConfigError(f"subscription=plain with {self.collectors} collectors would give every collector "
                             "every message; use subscription=shared (or auto)")
        if not self.client_prefix or any(c in self.client_prefix for c in "/+#"):
            raise ConfigError(f"client_prefix should be a plain name, got {self.client_prefix!r}")
        if not self.share_group or any(c in self.share_group for c in "/+#"):
            raise ConfigError(f"share_group should be a plain name, got {self.share_group!r}")

    @property
    def shared(self) -> bool:
        return self.subscription == "shared" or (self.subscription == "auto" and self.collectors > 1)

    def client_id(self, index: int) -> str:
        return f"{self.client_prefix}-collector-{index}"

    @property
    def flush_at(self) -> int:
        """Messages per batch: the size cap, but never more than half the in-flight window."""
        return max(1, min(self.batch_max_messages, self.inflight_window // 2))


@dataclass(frozen=True)
class BuildConfig:
    window: WindowConfig = field(default_factory=WindowConfig, metadata={
        "help": "window length (readings), stride_s and label horizon_s (plant seconds)"})
    eval_fraction: float = field(default=0.2, metadata={
        "help": "latest fraction of each machine's plant-time range held out for evaluation"})
    calibration_fraction: float = field(default=0.1, metadata={
        "help": "the fraction before it, held out for calibration: where a model's operating point "
                "is chosen (0 = none: the operating point is then chosen on eval)"})
    seed: int = field(default=0, metadata={"help": "seed of the (optional) ok-window down-sampling"})
    ok_per_failure: float | None = field(default=None, metadata={
        "help": "keep at most this many ok windows per non-ok window in TRAIN (None: keep all); "
                "evaluation is never down-sampled"})
    engine: str = field(default="ray", metadata={
        "help": "ray: Ray Data reads the lake and windows machines in parallel (laptop or cluster); "
                "local: the same per-machine function in this process (small lakes, no Ray start-up cost)"})
    partitions: int = field(default=4, metadata={
        "help": "Ray Data shuffle partitions for grouping telemetry by machine (raise on a cluster)"})

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction should lie in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.calibration_fraction < 1.0 - self.eval_fraction:
            raise ConfigError(f"calibration_fraction should lie in [0, 1 - eval_fraction) = "
                              f"[0, {1.0 - self.eval_fraction:g}), got {self.calibration_fraction}")
        if self.engine not in ("ray", "local"):
            raise ConfigError(f"engine should be 'ray' or 'local', got {self.engine!r}")
        if self.partitions < 1:
            raise ConfigError(f"partitions should be >= 1, got {self.partitions}")
        if self.ok_per_failure is not None and not self.ok_per_failure > 0:
            raise ConfigError(f"ok_per_failure should be > 0 or None, got {self.ok_per_failure}")
