"""A small HTTP client for the serve app (stdlib only; one keep-alive connection per client).

Used by the MQTT bridge, :class:`serve.handle.ServingHandle`, the CLI and the benchmark::

    c = ServeClient("http://127.0.0.1:8000")
    out = c.predict([{"text": "pump. vib 4.1 high rising."}])   # {"model_version", "predictions"}
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from typing import Callable
from urllib.parse import urlsplit

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError


class ServeHTTPError(FlywheelError, RuntimeError):
    """The app answered with an error status (``status``) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(f"HTTP {status}: {message}" if status else message)

    def __reduce__(self):   # picklable (a bridge in a Ray actor raises it to the campaign)
        return type(self), (self.status, self.message)


class ServeClient:
    """``resolve``: optional callable giving the app's current URL, asked when the app cannot be
    reached (a replica restarted on another port under direct ingress); one retry there."""

    def __init__(self, url: str, timeout_s: float = 30.0, resolve: Callable[[], str] | None = None,
                 token: str | None = None):
        """``token``: the app's API token (``serve.api_token``), sent as a bearer token; None = the
        environment's ``FLYWHEEL_API_TOKEN`` if set."""
        self.timeout_s = timeout_s
        self.resolve = resolve
        self._token = token if token is not None else os.environ.get("FLYWHEEL_API_TOKEN") or None
        self._set_url(url)
        self._local = threading.local()   # http.client connections are not thread-safe

    def _set_url(self, url: str) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"serve URL {url!r} should look like http://127.0.0.1:8000 (the URL `flywheel serve` printed)")
        self.url = url.rstrip("/")
        self._host, self._port, self._prefix = parts.hostname, parts.port or 80, parts.path

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        return c

    def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        # A kept-alive connection the server closed is retried once, fresh; then once more at the
        # URL ``resolve`` gives, if it moved.
        for attempt in (0, 1, 2):
            conn = self._conn()
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 0:
                    continue
                if attempt == 1 and self._moved():
                    continue
                raise ServeHTTPError(0, f"cannot reach the serve app at {self.url}: {exc}; check that it runs "
                                        "(`flywheel serve`, or a campaign) and that this is its URL") from None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return resp.status, payload

    def _moved(self) -> bool:
        """Ask ``resolve`` where the app is now; True if that is somewhere else."""
        if self.resolve is None:
            return False
        try:
            url = self.resolve().rstrip("/")
        except Exception:  # noqa: BLE001 - the caller reports the unreachable URL instead
            return False
        if url == self.url:
            return False
        self._set_url(url)
        return True

    def call(self, method: str, path: str, body: object = None) -> object:
        status, payload = self.request(method, path, body)
        if status >= 400:
            detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
            raise ServeHTTPError(status, str(detail))
        return payload

    def predict(self, windows: list[dict], adapter: str | None = None) -> dict:
        body = {"windows": windows}
        if adapter:
            body["adapter"] = adapter
        return self.call("POST", "/predict", body)

    def health(self) -> dict:
        return self.call("GET", "/health")

    def version(self) -> dict:
        return self.call("GET", "/version")

    def refresh(self) -> dict:
        return self.call("POST", "/refresh")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None
