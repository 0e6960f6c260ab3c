"""One base model, several LoRA adapters beside it, and atomic hot swaps between them.

An :class:`AdapterPool` lives in each serving replica.  It loads the base model once
and keeps every served adapter on it under a unique internal PEFT name.  Requests are
routed by *public* adapter name (``default``, ``pump``, ...) to a :class:`Slot`; a
request pins its slot when it arrives, so a swap never changes the version of a request
already in flight.

A swap loads the new adapter *beside* the old one, checks it (it loads, the label set
matches the contract, its featuriser is one this release knows, predictions on a fixed probe
set of windows (featurised with that featuriser) are finite
probabilities summing to 1), and only then re-points the public name.  A refused
adapter is unloaded and the old one keeps serving.  An old adapter is deleted once no
pinned request uses it any more.

A tree version (family ``gbdt``, ``finetune.gbdt``) needs no base model: the pool loads it
with ``finetune.gbdt.load_gbdt`` (which refuses a ``model.txt`` that is not a LightGBM model,
labels or feature names other than recorded, and a featuriser that does not make numbers),
probes it the same way and keeps it beside the LoRA adapters; a request's windows go to the
model of their slot, so a swap may change the family of a name (LoRA -> trees or back).  A
directory whose family differs from the version's ``flywheel.family`` tag is refused.

Usage (no Ray needed)::

    pool = AdapterPool(device="cpu")
    pool.install("default", Resolved("fault-detector", "champion", "3", None), "/path/to/adapter")
    slot = pool.acquire("default"); probs = pool.predict(texts, [slot.peft_name] * len(texts))
    pool.release(slot)
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from flywheel.base.contract import LABELS
from flywheel.base.features import REFERENCE, WindowConfig, get_featuriser
from serve.source import Resolved

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One loaded adapter: a registered version under an internal PEFT name."""

    name: str                 # public name requests use
    model_name: str
    ref: str
    version: str
    run_id: str | None
    peft_name: str
    base_model: str
    featuriser: Callable = field(default_factory=get_featuriser)   # readings -> this version's model input
    window: WindowConfig | None = None                            # the window config it was trained on
    family: str = "lora"                                          # lora (an adapter on the base) or gbdt (trees)
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    retired: bool = False

    def describe(self) -> dict:
        return {"model_name": self.model_name, "ref": self.ref, "version": self.version, "run_id": self.run_id,
                "base_model": self.base_model, "family": self.family, "loaded_at": self.loaded_at,
                "featuriser": self.featuriser.spec.to_dict(),
                "window": self.window.to_dict() if self.window is not None else None}


def probe_windows() -> list[tuple[str, list[dict[str, float]]]]:
    """A fixed probe set of (kind, readings): every machine kind at its reference point and under
    stress, and a kind no model was trained on."""
    out = []
    for kind, ref in REFERENCE.items():
        raw = {n: typical for n, (_, typical, _) in ref.items() if n not in ("power_w", "temp_diff_k")}
        calm = [dict(raw) for _ in range(6)]
        stressed = [{n: v + (i * 0.6 * ref[n][2]) for n, v in raw.items()} for i in range(6)]
        out += [(kind, calm), (kind, stressed)]
    out.append(("unknown machine", [{"vibration_mm_s": 9.99 + i} for i in range(6)]))
    return out


def check_probabilities(probs: np.ndarray, n: int) -> str | None:
    """Why ``probs`` are not a usable (n, len(LABELS)) probability matrix, or None when they are."""
    if probs.shape != (n, len(LABELS)):
        return f"probe predictions have shape {probs.shape}, expected ({n}, {len(LABELS)}) for labels {LABELS}"
    if not np.all(np.isfinite(probs)):
        return "probe predictions contain NaN or infinite values"
    if probs.min() < 0 or probs.max() > 1:
        return f"probe probabilities outside [0, 1] (min {probs.min():.3g}, max {probs.max():.3g})"
    worst = float(np.abs(probs.sum(axis=1) - 1).max())
    if worst > 1e-3:
        return f"probe probabilities do not sum to 1 (off by up to {worst:.3g})"
    return None


def _tree_forward(trees, features: list) -> np.ndarray:
    """A tree model's probabilities for featurised windows (dicts of the featuriser's named floats)."""
    names = trees.feature_names
    x = np.array([[f[n] for n in names] for f in features], dtype=np.float64).reshape(len(features), len(names))
    return trees.predict_proba(x)


class AdapterPool:
    def __init__(self, base_model: str = "", device: str = "auto", max_length_tokens: int = 96,
                 torch_threads: int = 0, precision: str = "auto"):
        self.base_model = base_model          # "" = taken from the first adapter's metadata
        self.device = device
        self.precision = precision
        self.spec = None                      # the DeviceSpec, decided when the base model loads
        self.max_length_tokens = max_length_tokens
        self.torch_threads = torch_threads
        self.model = None                     # a PeftModel once the first adapter is in
        self.tokenizer = None
        self._slots: dict[str, Slot] = {}
        self._retired: list[Slot] = []
        self._state_lock = threading.Lock()   # slots, pins
        self._model_lock = threading.Lock()   # the module tree: forward vs load/delete
        self._ids = count(1)
        self._probe = probe_windows()
        self._trees: dict = {}                # internal name -> finetune.gbdt.GbdtModel (tree versions)

    # ------------------------------------------------------------------ routing
    def names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str) -> Slot | None:
        return self._slots.get(name)

    def acquire(self, name: str) -> Slot:
        """Pin the slot serving ``name`` for one request (KeyError if there is none)."""
        with self._state_lock:
            slot = self._slots[name]
            slot.inflight += 1
            return slot

    def release(self, slot: Slot) -> None:
        with self._state_lock:
            slot.inflight -= 1

    # ------------------------------------------------------------------ inference
    def predict(self, texts: list[str], peft_names: list[str]) -> np.ndarray:
        """Probabilities for ``texts``, each through its adapter; one forward per adapter in the batch.

        PEFT's single-pass mixed-adapter forward (``adapter_names=``) does not cover every
        head (a trained BERT pooler is not a Linear layer), so a mixed batch is split by
        adapter here; the model lock makes the active-adapter switch safe.
        """
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(peft_names):
            groups.setdefault(name, []).append(i)
        out = np.empty((len(texts), len(LABELS)), dtype=np.float32)
        with self._model_lock:
            self._delete_unused()
            for name, idx in groups.items():
                trees = self._trees.get(name)
                out[idx] = self._forward(name, [texts[i] for i in idx]) if trees is None else \
                    _tree_forward(trees, [texts[i] for i in idx])
        return out

    def _forward(self, peft_name: str, texts: list[str]) -> np.ndarray:
        """One adapter's forward pass (model lock held)."""
        from finetune.model import predict_proba

        if self.model.active_adapter != peft_name:  # PEFT's set_adapter walks every module: only on a change
            self.model.set_adapter(peft_name)
        return predict_proba(self.model, self.tokenizer, texts, batch_size=max(1, len(texts)),
                             max_length=self.max_length_tokens, set_eval=False,  # eval mode set at install
                             device=self.spec)

    # ------------------------------------------------------------------ swaps
    def install(self, name: str, resolved: Resolved, adapter_dir: str) -> Slot:
        """Load ``adapter_dir`` beside what serves ``name``, check it, then switch; raise ModelError if refused."""
        from finetune.families import GBDT, model_family
        from finetune.model import (ModelError, adapter_featuriser, adapter_window, check_adapter_dir, load_adapter,
                                    resolve_base_model)

        family = model_family(adapter_dir)
        if resolved.family and family != resolved.family:
            raise ModelError(f"{resolved.model_name} v{resolved.version} says family {resolved.family!r} (tag "
                             f"flywheel.family) but its model directory holds a {family} model; register the "
                             "model directory again (flywheel train)")
        if family == GBDT:
            return self._install_trees(name, resolved, adapter_dir)
        # label set, safetensors only, a known featuriser and a valid window, before touching the model
        meta = check_adapter_dir(adapter_dir)
        featuriser = get_featuriser(adapter_featuriser(meta))
        window = adapter_window(meta)
        adapter_base = str(meta.get("base_model") or "")
        base = self.base_model or adapter_base
        if not base:
            raise ModelError(f"adapter {adapter_dir} does not say which base model it was trained on "
                             "(base_model in flywheel_model.json); set serve base_model explicitly")
        if adapter_base and self.model is not None and \
                resolve_base_model(adapter_base) != resolve_base_model(self.base_model):
            raise ModelError(f"adapter {resolved.model_name} v{resolved.version} was trained on base "
                             f"{adapter_base!r} but this replica serves {self.base_model!r}")
        peft_name = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}_v{resolved.version}_{next(self._ids)}")
        t0 = time.perf_counter()
        with self._model_lock:
            if self.model is None:
                self._load_base(base)
            try:
                self.model = load_adapter(self.model, adapter_dir, peft_name)
                self.model.eval()
                probs = self._forward(peft_name, [featuriser(kind, rows) for kind, rows in self._probe])
            except ModelError:
                self._forget(peft_name)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of an untrusted adapter is a refusal
                self._forget(peft_name)
                raise ModelError(f"adapter {adapter_dir} fails on the probe windows: {exc}") from None
            why = check_probabilities(probs, len(self._probe))
            if why is not None:
                self._forget(peft_name)
                raise ModelError(f"adapter {resolved.model_name} v{resolved.version} refused: {why}")
        new = Slot(name=name, model_name=resolved.model_name, ref=resolved.ref, version=resolved.version,
                   run_id=resolved.run_id, peft_name=peft_name, base_model=self.base_model,
                   featuriser=featuriser, window=window)
        return self._switch(new, t0)

    def _install_trees(self, name: str, resolved: Resolved, model_dir: str) -> Slot:
        """Load a tree version (``load_gbdt`` checks model file, labels, features and featuriser), probe it, switch."""
        from finetune.gbdt import load_gbdt
        from finetune.model import ModelError

        t0 = time.perf_counter()
        trees = load_gbdt(model_dir)
        internal = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}_v{resolved.version}_{next(self._ids)}")
        try:
            probs = _tree_forward(trees, [trees.featuriser(kind, rows) for kind, rows in self._probe])
        except Exception as exc:  # noqa: BLE001 - any failure of an untrusted model is a refusal
            raise ModelError(f"tree model {model_dir} fails on the probe windows: {exc}") from None
        why = check_probabilities(probs, len(self._probe))
        if why is not None:
            raise ModelError(f"tree model {resolved.model_name} v{resolved.version} refused: {why}")
        with self._model_lock:
            self._trees[internal] = trees
        new = Slot(name=name, model_name=resolved.model_name, ref=resolved.ref, version=resolved.version,
                   run_id=resolved.run_id, peft_name=internal, base_model="", featuriser=trees.featuriser,
                   window=trees.window, family="gbdt")
        return self._switch(new, t0)

    def _switch(self, new: Slot, t0: float) -> Slot:
        with self._state_lock:  # the atomic switch: one dict assignment under the pin lock
            old = self._slots.get(new.name)
            self._slots[new.name] = new
            if old is not None:
                old.retired = True
                self._retired.append(old)
        log.info("serving %s = %s v%s (%s, loaded and checked in %.2fs)", new.name, new.model_name, new.version,
                 new.family, time.perf_counter() - t0)
        return new

    def _load_base(self, base: str) -> None:
        from finetune.model import load_base, pick_device
        from flywheel.base.threads import setup_torch

        # 0: torch's own count (in a Ray actor, one thread per reserved CPU); -1: all cores.
        setup_torch(self.torch_threads or None)
        self.spec = pick_device(self.device, self.precision, f"serve.device={self.device}")
        self.model, self.tokenizer = load_base(base, device=self.spec)
        self.base_model = base

    def _forget(self, peft_name: str) -> None:
        """Remove a half-loaded or refused adapter (model lock held)."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or set(self.model.peft_config) <= {peft_name}:
            # The first adapter failed: PEFT may have injected layers into the base in place, so
            # drop it; the next install loads a clean base.
            self.model = None
            return
        if peft_name in self.model.peft_config:
            try:
                self.model.delete_adapter(peft_name)
            except Exception as exc:  # noqa: BLE001 - PEFT may have half-injected it
                log.warning("could not fully remove refused adapter %s: %s", peft_name, exc)

    def _delete_unused(self) -> None:
        """Delete retired adapters no request pins any more (model lock held)."""
        with self._state_lock:
            done = [s for s in self._retired if s.inflight == 0]
            self._retired = [s for s in self._retired if s.inflight > 0]
        for s in done:
            if self._trees.pop(s.peft_name, None) is not None:
                log.info("unloaded %s v%s (%s, trees)", s.model_name, s.version, s.peft_name)
                continue
            if self.model is None:
                continue
            if s.peft_name in self.model.peft_config and len(self.model.peft_config) > 1:
                self.model.delete_adapter(s.peft_name)
                log.info("unloaded %s v%s (%s)", s.model_name, s.version, s.peft_name)

    def collect(self) -> None:
        """Unload retired adapters now (also happens before each forward)."""
        with self._model_lock:
            self._delete_unused()

    def describe(self) -> dict:
        with self._state_lock:
            return {"base_model": self.base_model,
                    "precision": self.spec.precision if self.spec is not None else None,
                    "adapters": {n: s.describe() for n, s in self._slots.items()},
                    "retired_pending": [s.peft_name for s in self._retired]}
