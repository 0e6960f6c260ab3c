"""``TrainConfig``: every knob of one fine-tune turn, as one typed dataclass.

Load it like every other stage config (``flywheel.base.config.load``)::

    from flywheel.base.config import load
    cfg = load(TrainConfig, "train.yaml", ["lora.rank=16", "epochs=2"])

Defaults fit the demo budget: about one to two minutes of LoRA training on two CPU
cores (MiniLM trains ~50-70 samples/s there), so one turn sees at most
``max_train_samples`` windows in total (all epochs together) after class balancing.

Class imbalance (failures are rare) is handled twice, on purpose:

1. each epoch keeps every failure window and at most ``ok_ratio`` x as many ``ok``
   windows (a fresh, seeded draw of ``ok`` windows per epoch, so over epochs the model
   still sees many different healthy windows);
2. the cross-entropy is class-weighted with inverse-frequency weights computed from that
   balanced epoch (weight_c = n / (K * n_c), K = labels present), clipped to
   [1 / class_weight_max, class_weight_max] so a label with three windows cannot dominate.

``family`` picks the challenger's model family (``finetune.families``): ``lora`` (the default,
a LoRA adapter on the base model) or ``gbdt`` (LightGBM trees, ``finetune.gbdt``); either is
registered, gated and served.  ``reference_family`` (default ``other``: the family the
challenger is not) also trains that family on the same snapshot each turn, balanced and seeded
the same way, as the reference the challenger is compared with; it is logged as
``reference_model.<family>.*``, never registered or served (``''`` = none: with ``family=gbdt``
the reference is a LoRA fine-tune, which costs far more than the trees themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.bootstrap import BOOTSTRAP_METRICS
from finetune.model import PRECISIONS, LoraSettings
from flywheel.base.config import ConfigError
from flywheel.base.features import require_featuriser
from flywheel.base.governance import GovernancePolicy

#: Gate metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = ("eval.ece", "eval.loss", "eval.brier")
#: The live scores ``promote_after_shadow`` may compare (``live.<m>`` / ``shadow.<m>``); cost: lower is better.
SHADOW_METRICS = ("f1_any_failure", "precision_any_failure", "recall_any_failure", "cost_per_1k_windows")


@dataclass
class TrainConfig:
    base_model: str = field(default="minilm", metadata={
        "help": "'minilm' (packaged all-MiniLM-L6-v2), a local model directory or a hub id"})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA rank/alpha/dropout/targets"})
    epochs: int = field(default=1, metadata={"help": "passes over the (balanced) training split"})
    batch_size: int = field(default=32, metadata={"help": "windows per optimizer step (all workers together)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate for the LoRA weights and the head"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_frac: float = field(default=0.06, metadata={"help": "fraction of steps with linear LR warm-up"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = no clipping)"})
    family: str = field(default="lora", metadata={
        "help": "the challenger's model family, registered, gated and served: lora (a LoRA adapter on base_model) "
                "or gbdt (LightGBM trees on numeric window statistics)"})
    featuriser: str = field(default="", metadata={
        "help": "how a window's readings become model input (name/version; recorded with the model); '' = the "
                "family's own: text-summary/1 for lora, numeric-stats/1 for gbdt"})
    max_length: int = field(default=96, metadata={"help": "max tokens per window text (batches pad dynamically)"})
    split_batches: bool = field(default=True, metadata={
        "help": "run a batch whose texts differ much in length (pump vs milling windows) as two parts, each padded "
                "to its own longest text, in one optimizer step with the whole batch's loss: the same step with "
                "fewer padded tokens (a split needs 20% fewer; finetune.data.split_by_length)"})
    max_train_samples: int = field(default=4000, metadata={
        "help": "windows trained on per turn, all epochs together, after class balancing (0 = no cap)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = no limit)"})
    ok_ratio: float = field(default=3.0, metadata={
        "help": "at most this many 'ok' windows per failure window in each epoch (0 = keep all)"})
    class_weight_max: float = field(default=10.0, metadata={"help": "clip for the class weights of the loss"})
    seed: int = field(default=0, metadata={"help": "seeds head init, LoRA init, data order and dropout"})
    num_workers: int = field(default=1, metadata={"help": "training workers; > 1 launches Ray Train"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (Ray Train) / train on CUDA"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads per worker (0 = cores available)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU or on a CPU with native bf16, else fp32), fp32 or bf16; "
                "also what the turn scores champion and challenger in"})
    checkpoint_every: int = field(default=50, metadata={"help": "write a resumable checkpoint every N steps (0 = never)"})
    checkpoint_dir: str = field(default="", metadata={
        "help": "where checkpoints go ('' = <tmp>/flywheel-checkpoints); a killed run resumes from here"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk (older ones deleted)"})
    log_every: int = field(default=10, metadata={"help": "send buffered per-step metrics to MLflow every N steps"})
    eval_batch_size: int = field(default=64, metadata={"help": "windows per inference batch in evaluation"})
    served_scores: bool = field(default=True, metadata={
        "help": "a campaign scores the champion, on the eval windows it answered in the plant, from the "
                "probabilities it served there (the lake's predictions) instead of running it again; the other "
                "windows run through it. The held-out evaluation does the same. false: every window runs again"})
    operating_point: str = field(default="cost", metadata={
        "help": "how the risk threshold is chosen on the calibration split: cost (the least money, from costs; "
                "without costs it falls back to f1) or f1 (the best any-failure F1)"})
    costs: dict = field(default_factory=dict, metadata={
        "help": "money per decision and machine kind: {false_alarm: {kind: EUR}, caught: {...}, missed: {...}} "
                "(finetune.evaluate.WindowCosts); a campaign derives them from its scenario's costs"})
    gate_metric: str = field(default="eval.macro_f1", metadata={"help": "metric the promotion gate compares"})
    gate_margin: float = field(default=0.01, metadata={
        "help": "the challenger must beat the champion (or the majority baseline) by more than this"})
    min_eval_windows: int = field(default=20, metadata={"help": "refuse to promote on a smaller eval split"})
    min_failure_windows: int = field(default=5, metadata={
        "help": "refuse to promote on an eval split with fewer failure windows than this"})
    gate_bootstrap: int = field(default=1000, metadata={
        "help": "paired block-bootstrap replicates of the gain; promote only if the interval's lower end "
                "clears gate_margin (0 = compare point estimates)"})
    gate_block_windows: int = field(default=8, metadata={
        "help": "consecutive windows of one machine resampled together (autocorrelation)"})
    gate_confidence: float = field(default=0.95, metadata={"help": "the bootstrap interval's level"})
    promote_after_shadow: bool = field(default=False, metadata={
        "help": "a campaign's challenger that passes the offline gate while a champion serves is not promoted at "
                "once: it runs as the shadow (serve.shadow=challenger) for the turn's plant period and is promoted "
                "only if its live score (shadow_metric on the period's outcomes) is not worse than the champion's by "
                "more than shadow_margin. The turn record says which rule decided (promotion_rule)"})
    shadow_metric: str = field(default="f1_any_failure", metadata={
        "help": "the live score promote_after_shadow compares, on the windows both models saw: f1_any_failure, "
                "precision_any_failure or recall_any_failure (the any-failure decision at each model's own "
                "operating point; higher is better) or cost_per_1k_windows (money per 1,000 windows under "
                "train.costs; lower is better)"})
    shadow_margin: float = field(default=0.0, metadata={
        "help": "promote_after_shadow: how much worse than the champion's live score the shadow's may be and still "
                "be promoted (in shadow_metric's unit)"})
    canary_margin: float = field(default=0.0, metadata={
        "help": "serve.canary_share > 0: how much more the canary group (the machines the challenger commanded) may "
                "cost than the champion's group, in the scenario's currency (EUR by default) per machine-hour, and "
                "the challenger still be promoted; the rule compares the upper end of the canary_confidence "
                "interval of the difference (canary - champion group), so a noisy period keeps the champion"})
    canary_confidence: float = field(default=0.9, metadata={
        "help": "the level of the bootstrap interval (over machines) of the canary groups' cost difference"})
    warm_start: bool = field(default=False, metadata={
        "help": "start from the champion's adapter (same base model) instead of a fresh LoRA; the adapter keeps "
                "the champion's layout (rank, targets, layers): lora.* settings apply to fresh adapters only"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow model code from the hub to run (off: only built-in architectures load)"})
    max_failures: int = field(default=0, metadata={"help": "Ray Train worker-failure restarts (resume from checkpoint)"})
    ray_poll_s: float = field(default=0.2, metadata={
        "help": "Ray Train: how often its controller checks the workers and takes a reported checkpoint (passed as "
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A worker that reports while the previous report is untaken "
                "waits for it, so Ray's default of 2 s held each checkpoint up to 2 s"})
    signing_key: str = field(default="", metadata={
        "help": "private key (PEM, P-256) that signs each registered version's files and BOM (finetune.signing); "
                "'' = versions are not signed. A campaign uses <workdir>/keys/signing.key, created on first use"})
    governance: GovernancePolicy = field(default_factory=GovernancePolicy, metadata={
        "help": "which base models and licences training may build on (flywheel.base.governance); checked before "
                "any compute (a tree model builds on none). A campaign copies its top-level governance section here"})
    reference_family: str = field(default="other", metadata={
        "help": "model family trained beside the challenger on the same snapshot and logged as "
                "reference_model.<family>.*, never served: 'other' = the family the challenger is not (gbdt "
                "beside lora, lora beside gbdt), or lora, gbdt, or '' = none (a lora reference beside gbdt "
                "trees costs a LoRA fine-tune per turn)"})

    def __post_init__(self):
        if isinstance(self.lora, dict):  # TrainConfig(lora={...}) from Python code
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.governance, dict):
            self.governance = GovernancePolicy(**self.governance)
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, max_length=self.max_length,
                        num_workers=self.num_workers, log_every=self.log_every,
                        eval_batch_size=self.eval_batch_size, keep_checkpoints=self.keep_checkpoints)
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} should be positive, got {value}")
        non_negative = dict(max_train_samples=self.max_train_samples, max_steps=self.max_steps,
                            min_failure_windows=self.min_failure_windows, gate_bootstrap=self.gate_bootstrap,
                            ok_ratio=self.ok_ratio, checkpoint_every=self.checkpoint_every,
                            num_threads=self.num_threads, gate_margin=self.gate_margin,
                            min_eval_windows=self.min_eval_windows, grad_clip=self.grad_clip,
                            weight_decay=self.weight_decay, max_failures=self.max_failures)
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} should be >= 0, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"lr should be > 0, got {self.lr}")
        if not self.ray_poll_s > 0:
            raise ConfigError(f"ray_poll_s should be > 0 seconds, got {self.ray_poll_s}; leave it unset for 0.2")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac should be in [0, 1), got {self.warmup_frac}")
        if self.shadow_metric not in SHADOW_METRICS:
            raise ConfigError(f"shadow_metric should be one of {', '.join(SHADOW_METRICS)}, got {self.shadow_metric!r}")
        if not self.shadow_margin >= 0:
            raise ConfigError(f"shadow_margin should be >= 0 (how much worse the shadow may score), got "
                              f"{self.shadow_margin}")
        if not self.canary_margin >= 0:
            raise ConfigError(f"canary_margin should be >= 0 (EUR per machine-hour the canary group may cost more), "
                              f"got {self.canary_margin}")
        if not 0.5 <= self.canary_confidence < 1:
            raise ConfigError(f"canary_confidence should be in [0.5, 1), e.g. 0.9, got {self.canary_confidence}")
        if self.gate_block_windows < 1:
            raise ConfigError(f"gate_block_windows should be >= 1, got {self.gate_block_windows}")
        if not 0.5 <= self.gate_confidence < 1:
            raise ConfigError(f"gate_confidence should be in [0.5, 1), got {self.gate_confidence}")
        if self.gate_bootstrap and self.gate_metric not in BOOTSTRAP_METRICS:
            raise ConfigError(f"gate_metric {self.gate_metric!r} cannot be bootstrapped; use one of "
                              f"{', '.join(BOOTSTRAP_METRICS)}, or gate_bootstrap=0 for the point rule")
        if self.operating_point not in ("cost", "f1"):
            raise ConfigError(f"operating_point should be cost or f1, got {self.operating_point!r}")
        if self.costs:
            self.window_costs()
        if self.class_weight_max < 1:
            raise ConfigError(f"class_weight_max should be >= 1, got {self.class_weight_max}")
        if not self.gate_metric.startswith("eval."):
            raise ConfigError(f"gate_metric should be an eval.* metric such as eval.macro_f1, got {self.gate_metric!r}")
        from finetune.families import DEFAULT_FEATURISERS, INPUTS, check_family, other_family

        check_family(self.family, "train.family")
        if not self.featuriser:
            self.featuriser = DEFAULT_FEATURISERS[self.family]
        try:   # the featuriser must make what the family reads
            require_featuriser(self.featuriser, INPUTS[self.family], "featuriser", DEFAULT_FEATURISERS[self.family])
        except ConfigError as exc:
            raise ConfigError(f"train.family={self.family}: {exc}") from None
        if self.family != "lora" and self.warm_start:
            raise ConfigError(f"warm_start continues the champion's LoRA adapter; train.family={self.family} "
                              "trains from scratch: drop train.warm_start or use train.family=lora")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision should be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        from finetune.families import FAMILIES

        if self.reference_family == "other":
            self.reference_family = other_family(self.family)
        if self.reference_family and self.reference_family not in FAMILIES:
            raise ConfigError(f"reference_family {self.reference_family!r} is not known; known: "
                              f"other, {', '.join(FAMILIES)}, or '' for none")
        if self.reference_family == self.family:
            raise ConfigError(f"reference_family {self.reference_family!r} is the challenger's own family "
                              f"(train.family={self.family}); the reference is another family: use "
                              f"reference_family=other ({other_family(self.family)}) or '' for none")
        if self.batch_size < self.num_workers:
            raise ConfigError(f"batch_size ({self.batch_size}) should be >= num_workers ({self.num_workers}): "
                             "each worker needs at least one window per step")

    def window_costs(self):
        """:attr:`costs` as a :class:`~finetune.evaluate.WindowCosts`, or None without costs."""
        if not self.costs:
            return None
        from finetune.evaluate import WindowCosts

        extra = set(self.costs) - {"false_alarm", "caught", "missed"}
        if extra:
            raise ConfigError(f"costs has unknown keys {sorted(extra)}; it takes false_alarm, caught and missed, "
                              "each {machine kind: EUR}")
        try:
            return WindowCosts(**{k: {kind: float(v) for kind, v in dict(self.costs.get(k) or {}).items()}
                                  for k in ("false_alarm", "caught", "missed")})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"costs: {exc}") from None

    @property
    def higher_is_better(self) -> bool:
        return self.gate_metric not in LOWER_IS_BETTER
