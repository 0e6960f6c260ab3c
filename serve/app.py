"""The Ray Serve application: one base model per replica, versions from MLflow, batching.

A version is a LoRA adapter on the replica's base model or a tree model (``train.family=gbdt``,
LightGBM, no base model); either serves any adapter name and a hot swap may change the family
(:mod:`serve.adapters`). Readings are featurised with the serving version's own featuriser.

Endpoints (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json``, with the limits below):

* ``POST /predict``  - one or many windows -> label probabilities (dynamic batching
  across requests: :mod:`serve.batcher` by default, or Ray's ``@serve.batch``; windows
  of different adapters share one batch, one forward per adapter)
* ``GET /health``    - ``{"status": "ok", "version": ...}`` once a model serves, else 503
* ``GET /version``   - which registered version serves each adapter, why the last
  candidate was refused if it was, batching counters and the request limits.  The
  replica id, process id, MLflow run ids and the full config are shown only with
  ``ServeConfig.version_details`` (this API has no authentication yet; a plant network
  should not learn them)
* ``POST /refresh``  - check the registry now and hot-swap moved aliases (answers as /version)

Status codes (every error body is JSON ``{"detail": ...}``):

* 400 - the body is not UTF-8, or Content-Length is not a number
* 404 - ``/predict`` names an adapter this app does not serve
* 413 - the body is over ``max_body_bytes`` (any endpoint; refused before the body is
  read), or ``/predict`` carries more than ``max_windows_per_request`` windows
* 422 - the JSON does not fit the request schema, or a window breaks a limit or the
  contract (:mod:`serve.api`); the detail names the window, field and position
* 500 - the model failed on a window that passed validation (a bug, not bad input); only
  that request fails: other requests batched with it are answered (:mod:`serve.batcher`)
* 503 - ``/health`` before a model serves

Each replica polls the registry every ``poll_s`` seconds as well.  Deploy it with
:func:`serve.handle.start_serving` (or ``flywheel serve``), not by importing this module.

(No ``from __future__ import annotations`` here: FastAPI must see the real types of the
endpoint parameters through Ray Serve's ingress wrapper.)
"""


import asyncio
import copy
import json
import logging
import hashlib
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.base.contract import LABELS
from serve.adapters import AdapterPool
from serve.api import (DEFAULT_LIMITS, BadRequest, BearerToken, BodySizeLimit, ErrorResponse, Limits, PredictBody,
                       PredictResponse, WindowPrediction, featurise, parse_windows, publish_limits)
from serve.batcher import ContinuousBatcher, forward_isolated
from serve.config import ServeConfig
from serve.source import AdapterSource, ServeError

log = logging.getLogger("serve.app")

# The limits of the replica in this process (a replica process holds one FaultDetector,
# whose __init__ sets them).  The body-size middleware and the OpenAPI document belong
# to the app, which exists before any config does, so they ask current_limits() per
# request.  Only module-level functions touch the variable: Ray ships the deployment class
# and a frozen copy of the app to the replica by value, and module-level functions are the
# parts that resolve, there, to this module's one variable.
_limits: Limits = DEFAULT_LIMITS


def current_limits() -> Limits:
    return _limits


def _use_limits(limits: Limits) -> None:
    global _limits
    _limits = limits


def _max_body_bytes() -> int:
    return _limits.max_body_bytes


# The sha256 (hex) of this replica's API token, "" = no token needed (see current_limits).
_token_sha256 = ""


def _use_token(api_token: str) -> None:
    global _token_sha256
    if not api_token:
        _token_sha256 = ""
    elif api_token.startswith("sha256:"):      # what start_serving passes: the digest, never the secret
        _token_sha256 = api_token.removeprefix("sha256:")
    else:                                     # a RayService config with ${FLYWHEEL_API_TOKEN} expanded
        _token_sha256 = hashlib.sha256(api_token.encode()).hexdigest()


def _api_token_sha256() -> str:
    return _token_sha256


class _API(FastAPI):
    """FastAPI whose OpenAPI document carries this replica's configured limits."""

    def openapi(self) -> dict:
        return publish_limits(copy.deepcopy(super().openapi()), current_limits())


api = _API(title="flywheel fault detector",
           description="Label probabilities for machine telemetry windows, from a LoRA-adapted model "
                       "served from the MLflow registry. Labels: " + ", ".join(LABELS),
           version="1")


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error detail may quote a client's string, and one
    holding a lone surrogate cannot be written as UTF-8 (Starlette's default would 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the offending input, which may be NaN and then cannot be
    # written as JSON (a 500); location and message are what a client needs.
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return SafeJSONResponse(status_code=422, content={"detail": errors})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
        # FastAPI's own 400 says only "error parsing the body"; say what and where.
        detail = f"the body is not UTF-8 (byte {cause.start} cannot be decoded); JSON text must be UTF-8"
    return SafeJSONResponse(status_code=exc.status_code, content={"detail": detail},
                            headers=getattr(exc, "headers", None))


api.add_middleware(BodySizeLimit, max_bytes=_max_body_bytes)
api.add_middleware(BearerToken, digest=_api_token_sha256)     # added last: runs first

_ERROR = {"model": ErrorResponse}
_TOO_LARGE = {413: {**_ERROR, "description": "the body is over max_body_bytes (refused before it is read)"}}
PREDICT_RESPONSES = {
    400: {**_ERROR, "description": "the body is not UTF-8, or Content-Length is not a number"},
    404: {**_ERROR, "description": "a window or the request names an adapter this app does not serve"},
    413: {**_ERROR, "description": "the body is over max_body_bytes (refused before it is read), or it "
                                   "carries more than max_windows_per_request windows"},
    422: {**_ERROR, "description": "the body does not fit the schema, or a window breaks a limit (text "
                                   "length, also of text rendered from readings; readings per window; names "
                                   "per reading) or holds text that is not valid Unicode (a lone surrogate); "
                                   "the detail names the window and the position"},
    500: {**_ERROR, "description": "the model failed on a window that passed validation; only this request "
                                   "fails, other requests batched with it are answered"},
}


@ray_serve.deployment(name="FaultDetector")
@ray_serve.ingress(api)
class FaultDetector:
    def __init__(self, tracking_uri: str, model_name: str, alias: str, config: dict):
        self.config = ServeConfig(**config)
        _use_limits(Limits.from_config(self.config))
        _use_token(self.config.api_token)
        self.source = AdapterSource(tracking_uri, model_name)
        self.tracking_uri, self.model_name, self.alias = tracking_uri, model_name, alias
        self.refs = {"default": alias, **self.config.adapters}
        self.pool = AdapterPool(self.config.base_model, self.config.device, self.config.max_length_tokens,
                                self.config.torch_threads, self.config.precision)
        self.refusals: dict[str, dict] = {}        # adapter name -> last refusal (version, reason, at)
        # (model, version) never retried: what made them unservable stays (files that do not load, a bad
        # signature, a family or featuriser this release cannot serve). Refusals that rest on what can
        # change (no signature yet, the governance tags) are checked again at every poll.
        self._refused: set[tuple[str, str]] = set()
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
                    try:   # family and featuriser as the version's tags say, before anything is fetched
                        self.source.check_featuriser(resolved)
                    except ServeError:
                        self._refused.add(key)
                        raise
                    tmp = tempfile.mkdtemp(prefix="flywheel-adapter-")
                    try:
                        self.source.check_governance(resolved, self.config.governance)
                        adapter_dir = self.source.fetch(resolved, tmp)
                        if self.config.require_signature:   # before anything of it loads
                            self.source.verify(resolved, adapter_dir, self.config.signing_public_key)
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
                    last = self.refusals.get(name) or {}
                    # a refusal retried at every poll (an unsigned version) is logged once, not every poll
                    again = last.get("ref") == ref and last.get("reason") == str(exc)
                    log.log(logging.DEBUG if again else logging.ERROR, "adapter %r (%s) not swapped in: %s; "
                            "still serving %s", name, ref, exc, f"v{current.version}" if current else "nothing")
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

    def owner(self) -> dict:
        """The registry and model this app serves, asked through its Serve handle before another
        start deploys under the same app name (``serve.handle.check_app_name``)."""
        return {"tracking_uri": self.tracking_uri, "model_name": self.model_name}

    def describe(self) -> dict:
        pool = self.pool.describe()
        default = pool["adapters"].get("default", {})
        details = self.config.version_details
        # Without version_details, /version says what serves, not where or how it was built:
        # run ids, pid, replica id and config help an attacker more than a client.
        adapters = pool["adapters"] if details else \
            {n: {k: v for k, v in a.items() if k != "run_id"} for n, a in pool["adapters"].items()}
        out = {"model_name": self.model_name, "alias": self.alias, "version": default.get("version"),
               "base_model": pool["base_model"], "precision": pool["precision"], "adapters": adapters, "refusals": self.refusals,
               "swaps": self.swaps, "last_check_at": self.last_check_at, "labels": list(LABELS),
               "batches": self.batches, "batched_windows": self.batched_windows, "forward_s": self.forward_s,
               "limits": asdict(current_limits())}
        if details:
            ctx = ray_serve.get_replica_context()
            out.update(replica=ctx.replica_id.unique_id if ctx else None, pid=os.getpid(),
                       config={**asdict(self.config), "api_token": "***" if self.config.api_token else ""})
        return out

    # ------------------------------------------------------------------ inference
    async def _run_items(self, items: list[tuple[str, str]]) -> list:
        """(text, peft adapter name) per window -> probability row, or the exception that window
        failed with, through the configured batcher."""
        if self._batcher is not None:
            return await self._batcher.submit_many(items, return_exceptions=True)
        return await asyncio.gather(*[self._infer(it) for it in items], return_exceptions=True)

    @ray_serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def _infer(self, items: list[tuple[str, str]]) -> list:
        # Ray hands an exception raised here to every request in the batch; returned per item
        # instead, it reaches only the request whose window failed.
        return await forward_isolated(self._forward, items)

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
    @api.post("/predict", response_model=PredictResponse, responses=PREDICT_RESPONSES)
    async def predict(self, body: Annotated[PredictBody, Body()]) -> PredictResponse:
        cfg = self.config
        try:
            windows = parse_windows(body, max_windows=cfg.max_windows_per_request,
                                    max_readings=cfg.max_readings_per_window, max_text_chars=cfg.max_text_chars)
        except BadRequest as exc:
            raise HTTPException(exc.status, str(exc)) from None
        names = [w.adapter or cfg.kind_adapters.get(w.kind or "", "default") for w in windows]
        slots = {}
        try:
            for n in dict.fromkeys(names):   # pin each adapter's current version for this request
                try:
                    slots[n] = self.pool.acquire(n)
                except KeyError:
                    raise HTTPException(404, f"unknown adapter {n!r}; this app serves: "
                                             f"{', '.join(self.pool.names())}") from None
            try:   # readings become model input through the featuriser of the version that serves them
                texts = featurise(windows, [slots[n].featuriser for n in names], cfg.max_text_chars)
            except BadRequest as exc:
                raise HTTPException(exc.status, str(exc)) from None
            probs = await self._run_items([(text, slots[n].peft_name) for text, n in zip(texts, names)])
        finally:
            for s in slots.values():
                self.pool.release(s)
        failed = next((i for i, p in enumerate(probs) if isinstance(p, BaseException)), None)
        if failed is not None:
            exc = probs[failed]
            log.error("the model failed on windows[%d] of a request: %s: %s", failed, type(exc).__name__, exc)
            raise HTTPException(500, f"the model failed on windows[{failed}] ({type(exc).__name__}); "
                                     "the replica logs the cause")
        preds = []
        for p, n in zip(probs, names):
            pd = {label: float(x) for label, x in zip(LABELS, p)}
            preds.append(WindowPrediction(label=max(pd, key=pd.get), risk=1.0 - pd["ok"], probs=pd,
                                          model_version=slots[n].version, adapter=n))
        versions = ",".join(dict.fromkeys(p.model_version for p in preds))
        return PredictResponse(model_version=versions, predictions=preds)

    @api.get("/health", responses={503: {**_ERROR, "description": "no model serves yet"}, **_TOO_LARGE})
    async def health(self) -> dict:
        slot = self.pool.slot("default")
        if slot is None:
            raise HTTPException(503, "no model loaded yet")
        return {"status": "ok", "version": slot.version}

    @api.get("/version", responses=_TOO_LARGE)
    async def version(self) -> dict:
        return self.describe()

    @api.post("/refresh", responses=_TOO_LARGE)
    async def refresh(self) -> dict:
        return await asyncio.to_thread(self.refresh_now)

    def __del__(self):
        self._stop.set()


def build_app(args: dict):
    """Application builder for ``serve run`` / KubeRay RayService (``import_path: serve.app:build_app``).

    ``args``: ``tracking_uri``, ``model_name`` (default fault-detector), ``alias`` (default
    champion) and ``config`` (ServeConfig fields).  Unknown keys are an error, as everywhere.
    """
    from flywheel.base.config import ConfigError, from_dict

    from serve.config import ServeConfig

    args = dict(args or {})
    unknown = set(args) - {"tracking_uri", "model_name", "alias", "config"}
    if unknown:
        raise ConfigError(f"serve.app:build_app got unknown args {sorted(unknown)}; "
                          "known: tracking_uri, model_name, alias, config")
    if not args.get("tracking_uri"):
        raise ConfigError("serve.app:build_app needs args.tracking_uri (the MLflow server)")
    config = from_dict(ServeConfig, args.get("config") or {}, prefix="config.")
    return bind_app(args["tracking_uri"], args.get("model_name", "fault-detector"), args.get("alias", "champion"),
                    config)


def bind_app(tracking_uri: str, model_name: str, alias: str, config):
    """The app for ``config`` (a ServeConfig): replicas, their CPUs and GPUs, queue and drain check set
    from it. The one place both ``start_serving`` and ``build_app`` (``serve run``, KubeRay) get it."""
    return FaultDetector.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=max(64, 4 * config.max_batch_size),
        graceful_shutdown_wait_loop_s=config.drain_check_s,
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
    ).bind(tracking_uri, model_name, alias, config.replica_dict())
