"""The HTTP API's request and response shapes, its limits, and turning a request into model input.

``POST /predict`` takes one window or many.  A window is either raw readings
(``{"kind": "pump", "readings": [{...}, ...]}``, oldest first: what the MQTT bridge sends),
which the app featurises with the featuriser the serving model version records (the one
it was trained with: ``text-summary/1`` for a LoRA version, ``numeric-stats/1`` for a tree
version), or, for a LoRA version only, model input already featurised
(``{"text": "pump. vib 4.1 high rising. ..."}``, as ``flywheel.base.features.render``
writes it; a text window sent to a tree version is a 422 that says to send readings).  ``adapter`` (per request or per window) picks a named adapter.  ``GET
/version`` names each adapter's featuriser and window config.

Shapes are checked strictly: readings must be finite JSON numbers (``"1.0"`` is not a
number), kinds must be the contract's, and every problem with a request is a 4xx naming
the window and the fix, never a 5xx.

Limits (every one applies to every form of input; the ``ServeConfig`` field sets it):

============================  ==========  ==========================================  ======
what                          default     config field                                status
============================  ==========  ==========================================  ======
POST body                     4 MiB       ``max_body_bytes`` (refused before reading)  413
windows per request           1..1024     ``max_windows_per_request``                 413
window text, sent or          1..4000     ``max_text_chars``                          422
rendered from readings        characters
readings per window           1..512      ``max_readings_per_window``                 422
names per reading             1..64       fixed: ``flywheel.base.contract.MAX_READINGS``   422
                                          (the MQTT telemetry cap)
============================  ==========  ==========================================  ======

Text must also be encodable as UTF-8, which is what the tokenizer takes: JSON's ``\\uXXXX``
escapes can carry a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 string holds;
such a window is a 422 naming the window and the character position.  The OpenAPI schema
publishes the limits (``maxLength``, ``maxItems``, ``minItems``, ``maxProperties``), with
the serving replica's configured values (:func:`publish_limits`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Annotated, Callable, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from flywheel.base.contract import LABELS, MACHINE_KINDS, MAX_READINGS, reading_bounds
from serve.config import ServeConfig

#: Names one reading may carry: the same cap as a telemetry message on MQTT.
MAX_NAMES_PER_READING = MAX_READINGS

Number = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]
_READING_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
_READING_RE = re.compile(_READING_PATTERN)


@dataclass(frozen=True)
class Limits:
    """The request limits one replica enforces (from its ServeConfig)."""

    max_windows: int
    max_readings: int
    max_text_chars: int
    max_body_bytes: int
    max_names_per_reading: int = MAX_NAMES_PER_READING

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Limits":
        return cls(max_windows=cfg.max_windows_per_request, max_readings=cfg.max_readings_per_window,
                   max_text_chars=cfg.max_text_chars, max_body_bytes=cfg.max_body_bytes)


DEFAULT_LIMITS = Limits.from_config(ServeConfig())

# The models carry the default limits in their JSON schema (so the schema is right for a
# default config even outside the app); the app rewrites them to its configured values.
# They are not enforced by pydantic: parse_windows checks them with messages naming the window.
Reading = Annotated[dict[str, Number], Field(json_schema_extra={
    "minProperties": 1, "maxProperties": MAX_NAMES_PER_READING,
    "propertyNames": {"pattern": _READING_PATTERN}})]


class TextWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="a window rendered by flywheel.base.features.render (valid Unicode: no lone "
                                  "surrogates); at most max_text_chars characters after trimming whitespace",
                      examples=["pump. vib 4.1 high rising. temp 341 normal flat."],
                      json_schema_extra={"minLength": 1, "maxLength": DEFAULT_LIMITS.max_text_chars})
    adapter: str | None = Field(default=None, description="named adapter for this window")


class ReadingsWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description=f"machine kind, one of {', '.join(MACHINE_KINDS)}", examples=["pump"],
                      json_schema_extra={"enum": list(MACHINE_KINDS)})
    readings: list[Reading] = Field(
        description="telemetry readings of one machine, oldest first; each maps snake_case names to finite "
                    f"numbers (at most {MAX_NAMES_PER_READING} names, as on MQTT); the rendered text is held "
                    "to the same max_text_chars as a text window",
        json_schema_extra={"minItems": 1, "maxItems": DEFAULT_LIMITS.max_readings})
    adapter: str | None = None


Window = Union[TextWindow, ReadingsWindow]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    windows: list[Window] = Field(description="one or more windows",
                                  json_schema_extra={"minItems": 1, "maxItems": DEFAULT_LIMITS.max_windows})
    adapter: str | None = Field(default=None, description="named adapter for every window that names none")


PredictBody = Union[PredictRequest, TextWindow, ReadingsWindow]


class WindowPrediction(BaseModel):
    label: str = Field(description="most probable label")
    risk: float = Field(description="1 - P(ok): probability of any failure within the horizon")
    probs: dict[str, float]
    model_version: str = Field(description="registered version that produced this prediction")
    adapter: str


class PredictResponse(BaseModel):
    model_version: str = Field(description="version(s) that served this request, comma-separated if several")
    labels: list[str] = list(LABELS)
    predictions: list[WindowPrediction]


class ErrorResponse(BaseModel):
    """Every error answer: ``detail`` says what is wrong and where (a list of problems for some 422s)."""

    detail: Union[str, list[dict]] = Field(description="what is wrong, naming the window or field")


class BadRequest(ValueError):
    """A request the model cannot take; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def _unencodable_at(text: str) -> int | None:
    """Position of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


@dataclass(frozen=True)
class ApiWindow:
    """One checked window of a request: model input ``text``, or ``readings`` still to featurise."""

    text: str | None
    readings: list[dict[str, float]] | None
    adapter: str | None
    kind: str | None


def parse_windows(body: PredictBody, *, max_windows: int, max_readings: int, max_text_chars: int
                  ) -> list[ApiWindow]:
    """Check every window of a request; raise BadRequest naming the bad window.

    Readings are featurised later, by :func:`featurise`, with the featuriser of the adapter
    the window is served by."""
    if isinstance(body, PredictRequest):
        windows, default_adapter = body.windows, body.adapter
        if not windows:
            raise BadRequest(422, "windows is empty; send at least one window ({\"text\": ...} or "
                                  "{\"kind\": ..., \"readings\": [...]})")
    else:
        windows, default_adapter = [body], None
    if len(windows) > max_windows:
        raise BadRequest(413, f"{len(windows)} windows in one request; the limit is {max_windows} "
                              "(split the request or raise serve max_windows_per_request)")
    out = []
    for i, w in enumerate(windows):
        where = f"windows[{i}]"
        adapter = w.adapter or default_adapter
        if isinstance(w, TextWindow):
            bad = _unencodable_at(w.text)
            if bad is not None:
                raise BadRequest(422, f"{where}.text has a lone UTF-16 surrogate (U+{ord(w.text[bad]):04X}) at "
                                      f"character {bad} (counting from 0); the model takes valid Unicode only: "
                                      "a \\ud800-\\udfff escape must be one half of a surrogate pair")
            text = w.text.strip()
            if not text:
                raise BadRequest(422, f"{where}.text is empty")
            if len(text) > max_text_chars:
                raise BadRequest(422, f"{where}.text has {len(text)} characters; the limit is {max_text_chars}")
            kind = text.split(".", 1)[0]
            out.append(ApiWindow(text, None, adapter, kind if kind in MACHINE_KINDS else None))
            continue
        if w.kind not in MACHINE_KINDS:
            raise BadRequest(422, f"{where}.kind {w.kind!r} is unknown; known kinds: {', '.join(MACHINE_KINDS)}")
        if not w.readings:
            raise BadRequest(422, f"{where}.readings is empty; send the window's readings, oldest first")
        if len(w.readings) > max_readings:
            raise BadRequest(422, f"{where} has {len(w.readings)} readings; the limit is {max_readings}")
        for j, r in enumerate(w.readings):
            if not r:
                raise BadRequest(422, f"{where}.readings[{j}] is empty; each reading maps names to numbers")
            if len(r) > MAX_NAMES_PER_READING:
                raise BadRequest(422, f"{where}.readings[{j}] has {len(r)} names; the limit is "
                                      f"{MAX_NAMES_PER_READING} per reading, as for telemetry on MQTT")
            bad = [n for n in r if not _READING_RE.match(n)]
            if bad:
                raise BadRequest(422, f"{where}.readings[{j}] has reading name {bad[0]!r}; names are "
                                      "snake_case with units, e.g. vibration_mm_s")
            for name, value in r.items():     # the bounds telemetry on MQTT is held to (the contract's)
                lo, hi = reading_bounds(name)
                if not lo <= value <= hi:
                    raise BadRequest(422, f"{where}.readings[{j}].{name} is {value:g}, physically impossible: "
                                          f"expected {lo:g}..{hi:g} for its unit")
        out.append(ApiWindow(None, [{k: float(v) for k, v in r.items()} for r in w.readings], adapter, w.kind))
    return out


def featurise(windows: list[ApiWindow], featurisers: list[Callable], max_text_chars: int) -> list:
    """Model input per window: sent text as is, readings through that window's featuriser (text for a
    LoRA version, named floats for a tree version; a tree version takes readings only)."""
    out: list = []
    for i, (w, feat) in enumerate(zip(windows, featurisers)):
        numeric = getattr(feat, "output", "text") != "text"
        if w.text is not None:
            if numeric:
                raise BadRequest(422, f"windows[{i}] sends text, but the version serving it reads numbers "
                                      f"({feat.spec.ref}, a tree model): send the window's raw readings "
                                      '({"kind": ..., "readings": [...]}) instead')
            out.append(w.text)
            continue
        if numeric:
            out.append(feat(w.kind, w.readings))
            continue
        text = feat(w.kind, w.readings)
        # Featurised text reaches the tokenizer like sent text, so it has the same limit (many
        # distinct names render long text even when each reading is small).
        if len(text) > max_text_chars:
            raise BadRequest(422, f"windows[{i}] renders to {len(text)} characters of text; the limit is "
                                  f"{max_text_chars} (send fewer distinct reading names)")
        out.append(text)
    return out


# --------------------------------------------------------------------------- OpenAPI
def publish_limits(schema: dict, limits: Limits) -> dict:
    """Write ``limits`` into an OpenAPI document of the app (in place; returns it)."""
    comps = schema.get("components", {}).get("schemas", {})

    def prop(model: str, name: str) -> dict:
        return comps.get(model, {}).get("properties", {}).get(name, {})

    prop("TextWindow", "text").update(minLength=1, maxLength=limits.max_text_chars)
    readings = prop("ReadingsWindow", "readings")
    readings.update(minItems=1, maxItems=limits.max_readings)
    if isinstance(readings.get("items"), dict):
        readings["items"].update(minProperties=1, maxProperties=limits.max_names_per_reading)
    prop("PredictRequest", "windows").update(minItems=1, maxItems=limits.max_windows)
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            resp = op.get("responses", {}).get("413") if isinstance(op, dict) else None
            if resp is not None:
                resp["description"] = _too_large(limits) if path.endswith("/predict") else \
                    f"the body is over {limits.max_body_bytes} bytes (refused before it is read)"
            if isinstance(op, dict) and "requestBody" in op:
                op["requestBody"]["x-max-body-bytes"] = limits.max_body_bytes
    return schema


def _too_large(limits: Limits) -> str:
    return (f"the body is over {limits.max_body_bytes} bytes (refused before it is read), or it carries "
            f"more than {limits.max_windows} windows")


# --------------------------------------------------------------------------- body size
class BearerToken:
    """ASGI middleware: when ``digest()`` gives a sha256 (hex) of the API token, every request
    but ``GET /health`` must carry ``Authorization: Bearer <token>``; otherwise 401 with the
    reason and ``WWW-Authenticate: Bearer``.  Compared in constant time, on digests."""

    def __init__(self, app, digest: Callable[[], str]):
        self.app = app
        self.digest = digest

    async def __call__(self, scope, receive, send):
        want = self.digest()
        if scope["type"] != "http" or not want:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path.rstrip("/") == "/health":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return await _refuse(send, 401, "this app needs an API token: send 'Authorization: Bearer <token>' "
                                            "(the serve.api_token it was started with; flywheel commands read "
                                            "$FLYWHEEL_API_TOKEN)", auth=True)
        got = hashlib.sha256(token.strip()).hexdigest()
        if not hmac.compare_digest(got, want):
            return await _refuse(send, 401, "wrong API token: send the serve.api_token this app was started with",
                                 auth=True)
        return await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: answer 413 to a body over ``max_bytes()`` without reading it into memory.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is
    read; a chunked body is counted as it streams in and refused as soon as the count
    passes the limit.  The body (at most the limit) is collected here and handed on whole,
    which costs nothing extra: the app reads all of it before parsing anyway.  The 413
    says ``Connection: close`` so the server stops reading the rest from the client.
    """

    def __init__(self, app, max_bytes: Callable[[], int]):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is None and b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, receive, send)      # no body: nothing to count
        limit = self.max_bytes()
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _refuse(send, 400, f"Content-Length {length[:40]!r} is not a number of bytes")
            if declared > limit:
                return await _refuse(send, 413, f"the body is {declared} bytes; the limit is {limit} "
                                                "(split the request or raise serve max_body_bytes)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return                                       # the client left: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _refuse(send, 413, f"the body is over {limit} bytes, the limit "
                                                "(split the request or raise serve max_body_bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                           # after the body: only a disconnect

        return await self.app(scope, replay, send)


async def _refuse(send, status: int, detail: str, auth: bool = False) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    if auth:
        headers.append((b"www-authenticate", b'Bearer realm="flywheel"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
