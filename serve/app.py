"""The Ray Serve application: one base model per replica, LoRA adapters from MLflow, batching.

Endpoints (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /predict``  - one or many windows -> label probabilities (dynamic batching
  across requests: :mod:`serve.batcher` by default, or Ray's ``@serve.batch``; windows
  of different adapters share one batch, one forward per adapter)
* ``GET /health``    - 200 once a model serves
* ``GET /version``   - which registered version serves each adapter, and why the last
  candidate was refused if it was
* ``POST /refresh``  - check the registry now and hot-swap moved aliases

Each replica polls the registry every ``poll_s`` seconds as well.  Deploy it with
:func:`serve.handle.start_serving` (or ``flywheel serve``), not by importing this module.

(No ``from __future__ import annotations`` here: FastAPI must see the real types of the
endpoint parameters through Ray Serve's ingress wrapper.)
"""


import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Annotated

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve as ray_serve

from flywheel.contract import LABELS
from serve.adapters import AdapterPool
from serve.api import BadRequest, PredictBody, PredictResponse, WindowPrediction, window_texts
from serve.batcher import ContinuousBatcher
from serve.config import ServeConfig
from serve.source import AdapterSource, ServeError

log = logging.getLogger("serve.app")

api = FastAPI(title="flywheel fault detector",
              description="Label probabilities for machine telemetry windows, from a LoRA-adapted model "
                          "served from the MLflow registry. Labels: " + ", ".join(LABELS),
              version="1")


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the offending input, which may be NaN and then cannot be
    # written as JSON (a 500); location and message are what a client needs.
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": errors})


@ray_serve.deployment(name="FaultDetector")
@ray_serve.ingress(api)
class FaultDetector:
    def __init__(self, tracking_uri: str, model_name: str, alias: str, config: dict):
        self.config = ServeConfig(**config)
        self.source = AdapterSource(tracking_uri, model_name)
        self.model_name, self.alias = model_name, alias
        self.refs = {"default": alias, **self.config.adapters}
        self.pool = AdapterPool(self.config.base_model, self.config.device, self.config.max_length_tokens,
                                self.config.torch_threads)
        self.refusals: dict[str, dict] = {}        # adapter name -> last refusal (version, reason, at)
        self._refused: set[tuple[str, str]] = set()  # (model, version) never retried: artifacts are immutable
        self.swaps = 0
        self.batches = 0              # forward passes, and windows through them (mean batch size)
        self.batched_windows = 0
        self.forward_s = 0.0
        self.last_check_at: float | None = None
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._infer.set_max_batch_size(self.config.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.config.batch_wait_ms / 1000)
        self._batcher = ContinuousBatcher(self._forward, self.config.max_batch_size,
                                          self.config.batch_wait_ms / 1000) \
            if self.config.batching == "continuous" else None
        self.refresh_now()
        if self.pool.slot("default") is None:
            why = self.refusals.get("default", {}).get("reason", "unknown")
            raise ServeError(f"no servable adapter for {model_name}@{alias}: {why}")
        if self.config.poll_s > 0:
            threading.Thread(target=self._poll, name="registry-poll", daemon=True).start()

    # ------------------------------------------------------------------ swaps
    def refresh_now(self) -> dict:
        """Check every adapter's ref in the registry; install moved ones (load beside, check, switch)."""
        from finetune.model import ModelError

        with self._swap_lock:
            for name, ref in self.refs.items():
                try:
                    resolved = self.source.resolve(ref)
                    cur = self.pool.slot(name)
                    if cur is not None and (cur.model_name, cur.version) == (resolved.model_name, resolved.version):
                        continue
                    key = (resolved.model_name, resolved.version)
                    if key in self._refused:
                        continue
                    tmp = tempfile.mkdtemp(prefix="flywheel-adapter-")
                    try:
                        adapter_dir = self.source.fetch(resolved, tmp)
                        self.pool.install(name, resolved, adapter_dir)
                    except ModelError as exc:
                        self._refused.add(key)
                        raise ServeError(str(exc)) from None
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
                    self.swaps += 1
                    self.refusals.pop(name, None)
                except Exception as exc:  # noqa: BLE001 - a bad candidate never stops the serving one
                    current = self.pool.slot(name)
                    log.error("adapter %r (%s) not swapped in: %s; still serving %s", name, ref, exc,
                              f"v{current.version}" if current else "nothing")
                    self.refusals[name] = {"ref": ref, "reason": str(exc), "at": time.time()}
            self.last_check_at = time.time()
            self.pool.collect()
        return self.describe()

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.refresh_now()
            except Exception:  # noqa: BLE001 - the poller must survive anything and keep serving
                log.exception("registry poll failed; serving continues on the current adapters")

    def describe(self) -> dict:
        pool = self.pool.describe()
        default = pool["adapters"].get("default", {})
        ctx = ray_serve.get_replica_context()
        return {"model_name": self.model_name, "alias": self.alias, "version": default.get("version"),
                "base_model": pool["base_model"], "adapters": pool["adapters"], "refusals": self.refusals,
                "swaps": self.swaps, "last_check_at": self.last_check_at, "labels": list(LABELS),
                "batches": self.batches, "batched_windows": self.batched_windows, "forward_s": self.forward_s,
                "replica": ctx.replica_id.unique_id if ctx else None, "pid": os.getpid(),
                "config": asdict(self.config)}

    # ------------------------------------------------------------------ inference
    async def _run_items(self, items: list[tuple[str, str]]) -> list:
        """(text, peft adapter name) per window -> probability rows, through the configured batcher."""
        if self._batcher is not None:
            return await self._batcher.submit_many(items)
        return await asyncio.gather(*[self._infer(it) for it in items])

    @ray_serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def _infer(self, items: list[tuple[str, str]]) -> list:
        return await self._forward(items)

    async def _forward(self, items: list[tuple[str, str]]) -> list:
        texts = [t for t, _ in items]
        names = [n for _, n in items]
        t0 = time.perf_counter()
        probs = await asyncio.to_thread(self.pool.predict, texts, names)
        self.forward_s += time.perf_counter() - t0
        self.batches += 1
        self.batched_windows += len(items)
        return list(probs)

    # ------------------------------------------------------------------ HTTP
    @api.post("/predict", response_model=PredictResponse,
              responses={404: {"description": "unknown adapter"}, 413: {"description": "too many windows"},
                         422: {"description": "malformed body or window"}})
    async def predict(self, body: Annotated[PredictBody, Body()]) -> PredictResponse:
        cfg = self.config
        try:
            windows = window_texts(body, max_windows=cfg.max_windows_per_request,
                                   max_readings=cfg.max_readings_per_window, max_text_chars=cfg.max_text_chars)
        except BadRequest as exc:
            raise HTTPException(exc.status, str(exc)) from None
        names = [a or cfg.kind_adapters.get(kind or "", "default") for _, a, kind in windows]
        slots = {}
        try:
            for n in dict.fromkeys(names):   # pin each adapter's current version for this request
                try:
                    slots[n] = self.pool.acquire(n)
                except KeyError:
                    raise HTTPException(404, f"unknown adapter {n!r}; this app serves: "
                                             f"{', '.join(self.pool.names())}") from None
            probs = await self._run_items([(text, slots[n].peft_name) for (text, _, _), n in zip(windows, names)])
        finally:
            for s in slots.values():
                self.pool.release(s)
        preds = []
        for p, n in zip(probs, names):
            pd = {label: float(x) for label, x in zip(LABELS, p)}
            preds.append(WindowPrediction(label=max(pd, key=pd.get), risk=1.0 - pd["ok"], probs=pd,
                                          model_version=slots[n].version, adapter=n))
        versions = ",".join(dict.fromkeys(p.model_version for p in preds))
        return PredictResponse(model_version=versions, predictions=preds)

    @api.get("/health")
    async def health(self) -> dict:
        slot = self.pool.slot("default")
        if slot is None:
            raise HTTPException(503, "no model loaded yet")
        return {"status": "ok", "version": slot.version}

    @api.get("/version")
    async def version(self) -> dict:
        return self.describe()

    @api.post("/refresh")
    async def refresh(self) -> dict:
        return await asyncio.to_thread(self.refresh_now)

    def __del__(self):
        self._stop.set()


def build_app(args: dict):
    """Application builder for ``serve run`` / KubeRay RayService (``import_path: serve.app:build_app``).

    ``args``: ``tracking_uri``, ``model_name`` (default fault-detector), ``alias`` (default
    champion) and ``config`` (ServeConfig fields).  Unknown keys are an error, as everywhere.
    """
    from flywheel.config import ConfigError, from_dict

    from serve.config import ServeConfig

    args = dict(args or {})
    unknown = set(args) - {"tracking_uri", "model_name", "alias", "config"}
    if unknown:
        raise ConfigError(f"serve.app:build_app got unknown args {sorted(unknown)}; "
                          "known: tracking_uri, model_name, alias, config")
    if not args.get("tracking_uri"):
        raise ConfigError("serve.app:build_app needs args.tracking_uri (the MLflow server)")
    config = from_dict(ServeConfig, args.get("config") or {}, prefix="config.")
    return FaultDetector.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=max(64, 4 * config.max_batch_size),
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
    ).bind(args["tracking_uri"], args.get("model_name", "fault-detector"), args.get("alias", "champion"),
           asdict(config))
