"""Typed configuration of the serve stage: the Ray Serve app and the MQTT bridge.

On the command line they are sections ``serve`` and ``bridge`` (``flywheel serve
serve.poll_s=5 bridge.threshold=0.3``); from Python, each loads from YAML with ``key=value``
overrides through :func:`flywheel.base.config.load`::

    from flywheel.base.config import load
    cfg = load(ServeConfig, "serve.yaml", ["poll_s=5", "max_batch_size=32"])
    bcfg = load(BridgeConfig, None, ["threshold=0.3"])   # windowing comes from the served model

Times in the bridge are plant seconds (from telemetry ``ts``) unless the name says wall.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Optional

from flywheel.base.config import ConfigError
from flywheel.base.features import WindowConfig
from flywheel.base.governance import GovernancePolicy


#: The adapter name under which ``ServeConfig.shadow`` serves the challenger beside the champion.
SHADOW_ADAPTER = "shadow"
#: The adapter name under which ``ServeConfig.canary_share`` serves the challenger for the canary machines.
CANARY_ADAPTER = "canary"


@dataclass
class ServeConfig:
    base_model: str = field(default="", metadata={
        "help": "base model to serve adapters on; empty = the base_model the champion adapter names"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda (decided once per replica)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU or on a CPU with native bf16 instructions, else fp32), fp32 or bf16"})
    http_host: str = field(default="127.0.0.1", metadata={"help": "interface the HTTP proxy binds"})
    http_port: int = field(default=0, metadata={
        "help": "HTTP port; 0 = a free port (ignored when Ray Serve already runs on this cluster)"})
    ingress: str = field(default="proxy", metadata={
        "help": "how HTTP reaches the app. proxy: through Ray Serve's HTTP proxy on http_port, which balances "
                "over the replicas. direct: the replica answers on its own port (Ray Serve's direct ingress, "
                "RAY_SERVE_ENABLE_DIRECT_INGRESS=1): one hop less, about 15 ms lower p50 on a 2-core machine "
                "(benchmarks/RESULTS.md); one replica; the Ray cluster must run with that variable (a Ray that "
                "flywheel starts itself gets it). The demo and tiny campaigns use direct (one replica on a "
                "laptop, in lockstep with the plant); keep proxy on a cluster of several replicas"})
    require_signature: bool = field(default=False, metadata={
        "help": "verify each version's signature (finetune.signing) against signing_public_key before loading "
                "it; a missing, foreign or broken signature is refused and the serving version stays. On in the "
                "demo campaigns and the infra profiles"})
    signing_public_key: str = field(default="", metadata={
        "help": "the signer's public key (PEM) for require_signature; a campaign uses <workdir>/keys/signing.pub"})
    governance: GovernancePolicy = field(default_factory=GovernancePolicy, metadata={
        "help": "which base models and licences a served version may build on (flywheel.base.governance, read "
                "from the version's tags); a version outside them is refused and the serving version stays. A "
                "campaign copies its top-level governance section here"})
    api_token: str = field(default="", metadata={
        "help": "when set, every endpoint but /health needs 'Authorization: Bearer <token>' (401 otherwise); "
                "write it as ${FLYWHEEL_API_TOKEN}. The app keeps only its sha256; it is never logged, recorded "
                "in MLflow or written to the campaign's files. Clients (the bridge, flywheel serve status ...) "
                "send the campaign's token or $FLYWHEEL_API_TOKEN"})
    app_name: str = field(default="flywheel", metadata={"help": "Ray Serve application name"})
    route_prefix: str = field(default="/", metadata={"help": "URL prefix of the app, e.g. / or /fault"})
    num_replicas: int = field(default=1, metadata={"help": "replicas (each loads the base model once)"})
    num_cpus_per_replica: float = field(default=1.0, metadata={"help": "Ray CPUs reserved per replica"})
    num_gpus_per_replica: float = field(default=0.0, metadata={"help": "Ray GPUs per replica"})
    torch_threads: int = field(default=0, metadata={
        "help": "torch intra-op threads per replica; 0 = torch's default under Ray (one per reserved CPU), "
                "-1 = every core the replica's machine offers (one replica on a laptop, e.g. the demo, "
                "whose plant waits for each prediction)"})
    batching: str = field(default="continuous", metadata={
        "help": "continuous (one forward at a time over all windows queued meanwhile; see serve/batcher.py) "
                "or ray (Ray Serve's @serve.batch)"})
    max_batch_size: int = field(default=64, metadata={"help": "windows per model forward (dynamic batching)"})
    batch_wait_ms: float = field(default=0.0, metadata={
        "help": "how long an idle replica waits for more requests to join a batch (wall ms); 0 = only those "
                "already received; a busy replica batches whatever queued during the last forward anyway"})
    max_windows_per_request: int = field(default=1024, metadata={"help": "windows one POST /predict may carry"})
    max_readings_per_window: int = field(default=512, metadata={"help": "readings one structured window may carry"})
    max_text_chars: int = field(default=4000, metadata={
        "help": "longest window text accepted, whether sent as text or rendered from readings"})
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata={
        "help": "largest POST body accepted, in bytes; a longer one gets 413 before it is read into memory "
                "(checked on Content-Length, and counted while a chunked body streams in). The default, "
                "4 MiB, fits max_windows_per_request text windows of max_text_chars at their defaults"})
    version_details: bool = field(default=False, metadata={
        "help": "GET /version also shows the replica id, process id, each adapter's MLflow run id and the "
                "full serve config; off by default because /version is unauthenticated: turn it on only "
                "where the HTTP port is reachable from trusted hosts alone"})
    max_length_tokens: int = field(default=96, metadata={"help": "tokenizer truncation length"})
    poll_s: float = field(default=10.0, metadata={
        "help": "wall seconds between registry checks for a moved alias; 0 = only on refresh"})
    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "extra named adapters on the same base: name -> 'ref' (alias or version of the served "
                "model) or 'other-model@ref'; chosen per request with \"adapter\": name"})
    shadow: str = field(default="", metadata={
        "help": "'' (off) or challenger: also serve the version holding the registry alias 'challenger' as adapter "
                "'shadow' beside the champion. A campaign's bridge then asks it for every live window too and "
                "publishes its predictions on {root}/{line}/{machine}/prediction/shadow (lake: raw/predictions, "
                "role=shadow); a shadow never commands. The turn scores both on the period's outcomes (live.*, "
                "shadow.*)"})
    canary_share: float = field(default=0.0, metadata={
        "help": "0 (off) or the share of the plant's machines, in (0, 1), the challenger commands for a plant "
                "period while the champion commands the rest: the version at the registry alias 'challenger' is "
                "served as adapter 'canary', and a campaign's bridge asks it for the windows of those machines "
                "(chosen by the campaign's seed and the turn, at least one per line; the control fleet never) and "
                "sends its orders (predictions role=canary on the usual topic). The turn compares both groups' "
                "cost per machine-hour and promotes the challenger only if the canary group is not worse by more "
                "than train.canary_margin; otherwise the champion takes the machines back. Not with shadow"})
    kind_adapters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "default adapter per machine kind for windows that name none, e.g. {pump: pump}"})
    access_log: bool = field(default=False, metadata={"help": "log every HTTP request in the replicas"})
    health_timeout_s: float = field(default=180.0, metadata={
        "help": "how long start_serving waits for the app to run and answer /health (the replica loads the model)"})
    drain_check_s: float = field(default=0.1, metadata={
        "help": "wall seconds between a stopping replica's checks for requests still in flight (Ray Serve's "
                "graceful_shutdown_wait_loop_s). Ray's default, 2 s, is a sleep before the first check, so every "
                "stop of an idle replica (the end of a campaign, flywheel serve stop) waited 2 s for nothing; "
                "requests in flight are still waited for, up to Ray's graceful_shutdown_timeout_s (20 s)"})

    def replica_dict(self) -> dict:
        """The config as the replica gets it: the API token only as its sha256 (``sha256:<hex>``), so
        the secret never passes through Ray (deployment arguments, controller logs)."""
        d = asdict(self)
        if self.api_token and not self.api_token.startswith("sha256:"):
            d["api_token"] = "sha256:" + hashlib.sha256(self.api_token.encode()).hexdigest()
        return d

    def __post_init__(self):
        if isinstance(self.governance, dict):   # the replica gets its config as a dict (asdict)
            self.governance = GovernancePolicy(**self.governance)
        if self.num_replicas < 1:
            raise ConfigError(f"num_replicas should be >= 1, got {self.num_replicas}")
        if not 0 <= self.http_port < 65536:
            raise ConfigError(f"http_port should be 0 (free port) or 1..65535, got {self.http_port}")
        if self.torch_threads < -1:
            raise ConfigError(f"torch_threads should be -1 (all cores), 0 (torch default) or a thread count, "
                              f"got {self.torch_threads}")
        if self.ingress not in ("proxy", "direct"):
            raise ConfigError(f"ingress should be proxy or direct, got {self.ingress!r}")
        if self.ingress == "direct" and self.num_replicas != 1:
            raise ConfigError(f"ingress=direct serves one replica on its own port, got num_replicas="
                              f"{self.num_replicas}; use ingress=proxy to balance over several replicas")
        if not self.drain_check_s > 0:
            raise ConfigError(f"drain_check_s should be > 0 (wall seconds between a stopping replica's checks), "
                              f"got {self.drain_check_s}; leave it unset for 0.1")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size should be >= 1, got {self.max_batch_size}")
        if self.batching not in ("continuous", "ray"):
            raise ConfigError(f"batching should be continuous or ray, got {self.batching!r}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"batch_wait_ms should be >= 0, got {self.batch_wait_ms}")
        if self.max_windows_per_request < 1:
            raise ConfigError(f"max_windows_per_request should be >= 1, got {self.max_windows_per_request}")
        if self.max_readings_per_window < 1:
            raise ConfigError(f"max_readings_per_window should be >= 1, got {self.max_readings_per_window}")
        if self.max_text_chars < 1:
            raise ConfigError(f"max_text_chars should be >= 1, got {self.max_text_chars}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes should be >= 1024 (one window with its JSON), got "
                              f"{self.max_body_bytes}")
        if self.poll_s < 0:
            raise ConfigError(f"poll_s should be >= 0 (0 = no polling), got {self.poll_s}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix should start with '/', got {self.route_prefix!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device should be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision should be auto, fp32 or bf16, got {self.precision!r}")
        if "default" in self.adapters:
            raise ConfigError("adapters may not redefine 'default' (it is the served model at its alias)")
        if self.shadow not in ("", "challenger"):
            raise ConfigError(f"shadow should be '' (off) or challenger (the version at the registry alias "
                              f"'challenger'), got {self.shadow!r}")
        if self.shadow:
            if self.adapters.get(SHADOW_ADAPTER, self.shadow) != self.shadow:
                raise ConfigError(f"adapters.{SHADOW_ADAPTER} is {self.adapters[SHADOW_ADAPTER]!r} but shadow="
                                  f"{self.shadow} serves the alias {self.shadow!r} under that name; drop "
                                  f"adapters.{SHADOW_ADAPTER}")
            self.adapters = {**self.adapters, SHADOW_ADAPTER: self.shadow}
        if not 0.0 <= self.canary_share < 1.0:
            raise ConfigError(f"canary_share is the share of machines the challenger commands, in [0, 1) (0 = off), "
                              f"got {self.canary_share!r}; e.g. serve.canary_share=0.25")
        if self.canary_share:
            if self.shadow:
                raise ConfigError(f"a plant period runs the challenger either as the shadow or as the canary: "
                                  f"shadow={self.shadow} and canary_share={self.canary_share} both ask for it; "
                                  "drop one")
            if self.adapters.get(CANARY_ADAPTER, "challenger") != "challenger":
                raise ConfigError(f"adapters.{CANARY_ADAPTER} is {self.adapters[CANARY_ADAPTER]!r} but canary_share "
                                  f"serves the alias 'challenger' under that name; drop adapters.{CANARY_ADAPTER}")
            self.adapters = {**self.adapters, CANARY_ADAPTER: "challenger"}
        for kind, name in self.kind_adapters.items():
            if name != "default" and name not in self.adapters:
                raise ConfigError(f"kind_adapters.{kind} names adapter {name!r}, which is not in adapters "
                                  f"({', '.join(['default', *self.adapters])})")


@dataclass
class BridgeConfig:
    window: Optional[WindowConfig] = field(default=None, metadata={
        "help": "windowing (length, stride_s, horizon_s); None = the window config the served model version "
                "records (set it only for a version that records none; it must match one that does)"})
    threshold: float = field(default=0.5, metadata={
        "help": "risk = 1 - P(ok) at or above which a maintain command is sent"})
    cooldown_s: float = field(default=3600.0, metadata={
        "help": "plant seconds after a command before the same machine may get another"})
    silent_after_s: float = field(default=1800.0, metadata={
        "help": "a machine with no telemetry for this many plant seconds (behind the plant clock) counts as down"})
    max_orders_per_line_per_h: int = field(default=0, metadata={
        "help": "guardrail: at most this many maintenance orders per line in any plant hour; more are refused "
                "(suppressed_line_order_cap); 0 = no cap"})
    max_down_per_line: int = field(default=0, metadata={
        "help": "guardrail: no order that would take more than this many machines of one line down at once "
                "(down by the plant's events, or ordered and not yet started; suppressed_line_down_cap); 0 = no cap"})
    mode: str = field(default="auto", metadata={
        "help": "auto: orders go to the plant; approve: each order is proposed on {root}/_review/serve-bridge and "
                "sent only once an operator approves it (flywheel serve approve COMMAND_ID); dry_run: orders are "
                "only counted (would_order), the plant runs without the model"})
    proposal_ttl_s: float = field(default=3600.0, metadata={
        "help": "approve mode: plant seconds after its window during which a proposal may be approved; a later "
                "approval is refused (approvals_expired): the evidence is stale"})
    paused: bool = field(default=False, metadata={
        "help": "start with the off switch on: predictions flow, no order is sent (suppressed_paused) until "
                "`flywheel serve resume` (a retained message on {root}/_control/serve-bridge overrides this)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter to ask the model for; None = the app's choice"})
    shadow_adapter: str | None = field(default=None, metadata={
        "help": "an adapter of the app to ask for every window as well (e.g. shadow, which serve.shadow=challenger "
                "serves): its predictions go to {root}/{line}/{machine}/prediction/shadow, it never commands. None: "
                "no shadow. A failed shadow call is counted (shadow_errors) and never delays the champion's orders "
                "beyond one try"})
    canary_adapter: str | None = field(default=None, metadata={
        "help": "an adapter of the app that answers, and commands, the windows of canary_machines in the champion's "
                "place (e.g. canary, which serve.canary_share serves): its predictions carry role canary on the usual "
                "prediction topic and its orders carry its version. If the app does not serve it (or it windows "
                "otherwise), the champion answers those machines too (canary_fallback). None: no canary"})
    canary_threshold: float | None = field(default=None, metadata={
        "help": "the canary adapter's operating point (its risk at or above which it orders maintenance); None = "
                "threshold. A campaign sets the challenger's own (chosen on its calibration split)"})
    canary_machines: list[str] = field(default_factory=list, metadata={
        "help": "the machine ids canary_adapter commands; a campaign sets both from serve.canary_share"})
    flush_idle_ms: float = field(default=10.0, metadata={
        "help": "send the pending windows once no telemetry arrived for this long (wall ms)"})
    max_pending: int = field(default=64, metadata={"help": "send at once when this many windows are pending"})
    http_timeout_s: float = field(default=30.0, metadata={"help": "timeout of one call to the model (wall s)"})
    retry_s: float = field(default=1.0, metadata={"help": "wait before retrying a failed model call (wall s)"})
    max_retries: int = field(default=30, metadata={"help": "model call attempts before a batch is dropped"})
    status_interval_s: float = field(default=5.0, metadata={"help": "wall seconds between status publications"})
    component: str = field(default="serve-bridge", metadata={"help": "status component name"})
    client_id: str = field(default="", metadata={
        "help": "MQTT client id, stable across restarts: the broker keeps this bridge's session (its "
                "subscriptions and the QoS 1 messages that arrive while it is away) under it; '' = "
                "flywheel-bridge-{topic root}. One running bridge per id: a second one with the same id "
                "disconnects the first"})
    session_expiry_s: int = field(default=86400, metadata={
        "help": "how long the broker keeps the session of a bridge that went away (wall s; MQTT 5 session "
                "expiry; MQTT 3.1.1 keeps it until the broker forgets it)"})
    state_dir: str = field(default="", metadata={
        "help": "where the bridge keeps its state file (<state_dir>/<client_id>.json: each machine's window "
                "readings, pending windows, the policy's cooldowns and caps), written after every answered batch "
                "before the messages it covers are acknowledged; a restarted bridge resumes from it and decides "
                "as an uninterrupted one would. '' = none (a restart starts the windows afresh); flywheel serve "
                "uses <workdir>/bridge"})

    def __post_init__(self):
        if isinstance(self.window, dict):  # convenience for Python callers
            self.window = WindowConfig(**self.window)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a risk in [0, 1], got {self.threshold}")
        if self.cooldown_s < 0:
            raise ConfigError(f"cooldown_s should be >= 0 plant seconds, got {self.cooldown_s}")
        if self.silent_after_s <= 0:
            raise ConfigError(f"silent_after_s should be > 0 plant seconds, got {self.silent_after_s}")
        if self.max_pending < 1:
            raise ConfigError(f"max_pending should be >= 1, got {self.max_pending}")
        if self.mode not in ("auto", "approve", "dry_run"):
            raise ConfigError(f"mode {self.mode!r} is not one of auto, approve, dry_run")
        if self.session_expiry_s < 0:
            raise ConfigError(f"session_expiry_s should be >= 0 wall seconds, got {self.session_expiry_s}")
        if self.client_id and (len(self.client_id) > 128 or any(c in self.client_id for c in "/+#")):
            raise ConfigError(f"client_id should be at most 128 characters without / + #, got {self.client_id!r}")
        if self.proposal_ttl_s <= 0:
            raise ConfigError(f"proposal_ttl_s should be > 0 plant seconds, got {self.proposal_ttl_s}")
        for name in ("max_orders_per_line_per_h", "max_down_per_line"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} should be >= 0 (0 = no cap), got {getattr(self, name)}")
        if self.flush_idle_ms < 0:
            raise ConfigError(f"flush_idle_ms should be >= 0, got {self.flush_idle_ms}")
        if self.canary_threshold is not None and not 0.0 <= self.canary_threshold <= 1.01:
            raise ConfigError(f"canary_threshold is a risk in [0, 1] (or 1.01: never), got {self.canary_threshold}")
        if self.canary_machines and not self.canary_adapter:
            raise ConfigError(f"canary_machines {self.canary_machines} need canary_adapter (the adapter that commands "
                              "them), e.g. bridge.canary_adapter=canary")
        if self.canary_adapter and self.canary_adapter == self.shadow_adapter:
            raise ConfigError(f"adapter {self.canary_adapter!r} cannot be both the shadow and the canary")
        if self.max_retries < 1:
            raise ConfigError(f"max_retries should be >= 1, got {self.max_retries}")
