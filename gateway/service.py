"""Run a gateway for a mapping: its contract side and its protocol side, in a background thread.

    svc = GatewayService(load_mapping("plant.yaml"), "mqtt://127.0.0.1:1883")
    svc.start()          # returns once both sides are connected (OPC UA: once it first tries)
    ...
    svc.stop()           # publishes the final status (offline) and disconnects
"""

from __future__ import annotations

import asyncio
import threading

from flywheel.base.mqtt import BrokerURL

from gateway.core import Gateway
from gateway.mapping import Mapping


class GatewayService:
    def __init__(self, mapping: Mapping, broker_url: str | BrokerURL, *, plant_broker: str | None = None,
                 component: str = "gateway", reconnect_s: float = 1.0):
        self.gateway = Gateway(mapping, broker_url, component=component)
        self.mapping = mapping
        self.plant_broker = plant_broker
        self.reconnect_s = reconnect_s
        self.source = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def counters(self) -> dict[str, float]:
        return dict(self.gateway.counters)

    def start(self) -> "GatewayService":
        self.gateway.start()
        if self.mapping.protocol == "sparkplug":
            from gateway.sparkplug_host import SparkplugHost

            self.source = SparkplugHost(self.gateway, self.plant_broker)
            self.source.start()
            return self
        from gateway.opcua import OpcUaSource

        self.source = OpcUaSource(self.gateway, reconnect_s=self.reconnect_s)
        ready = threading.Event()

        def main() -> None:
            async def go() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                ready.set()
                await self.source.run(self._stop)
            try:
                asyncio.run(go())
            except BaseException as exc:      # surfaced by stop(); the thread must not die silently
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=main, name="gateway-opcua", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until the protocol side ends (OPC UA) or ``timeout`` passes."""
        if self._thread is not None:
            self._thread.join(timeout)
        elif timeout is not None:
            threading.Event().wait(timeout)

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None and self._stop is not None:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._stop.set)
                self._thread.join(30)
        elif self.source is not None:
            self.source.close()
        self.gateway.close()
        if self._error is not None:
            raise self._error
