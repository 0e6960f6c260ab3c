"""The HTTP API's request and response shapes, and turning a request into window texts.

``POST /predict`` takes one window or many.  A window is either its rendered text
(``{"text": "pump. vib 4.1 high rising. ..."}``, what the MQTT bridge sends, rendered by
``flywheel.features``) or raw readings (``{"kind": "pump", "readings": [{...}, ...]}``,
oldest first), which are rendered here with the same :func:`flywheel.features.render`.
``adapter`` (per request or per window) picks a named adapter.

Shapes are checked strictly: readings must be finite JSON numbers (``"1.0"`` is not a
number), kinds must be the contract's, and every problem is a 4xx naming the window and
the fix, never a 5xx.
"""

from __future__ import annotations

import re
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from flywheel.contract import LABELS, MACHINE_KINDS
from flywheel.features import render

Number = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]
_READING_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class TextWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="a window rendered by flywheel.features.render",
                      examples=["pump. vib 4.1 high rising. temp 341 normal flat."])
    adapter: str | None = Field(default=None, description="named adapter for this window")


class ReadingsWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description=f"machine kind, one of {', '.join(MACHINE_KINDS)}", examples=["pump"])
    readings: list[dict[str, Number]] = Field(description="telemetry readings of one machine, oldest first")
    adapter: str | None = None


Window = Union[TextWindow, ReadingsWindow]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    windows: list[Window] = Field(description="one or more windows")
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


class BadRequest(ValueError):
    """A request the model cannot take; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def window_texts(body: PredictBody, *, max_windows: int, max_readings: int, max_text_chars: int
                 ) -> list[tuple[str, str | None, str | None]]:
    """(text, adapter or None, kind or None) per window; raise BadRequest naming the bad window."""
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
            text = w.text.strip()
            if not text:
                raise BadRequest(422, f"{where}.text is empty")
            if len(text) > max_text_chars:
                raise BadRequest(422, f"{where}.text has {len(text)} characters; the limit is {max_text_chars}")
            out.append((text, adapter, text.split(".", 1)[0] if text.split(".", 1)[0] in MACHINE_KINDS else None))
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
            bad = [n for n in r if not _READING_RE.match(n)]
            if bad:
                raise BadRequest(422, f"{where}.readings[{j}] has reading name {bad[0]!r}; names are "
                                      "snake_case with units, e.g. vibration_mm_s")
        out.append((render(w.kind, [{k: float(v) for k, v in r.items()} for r in w.readings]), adapter, w.kind))
    return out
