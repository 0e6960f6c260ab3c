"""Serve: the Ray Serve app (LoRA adapters from MLflow, batching, hot swap) and the MQTT bridge.

Public API::

    from serve import ServeConfig, BridgeConfig, start_serving, ServingHandle
    from serve.bridge import Bridge
    from serve import BridgeHost      # a Bridge in a Ray actor of its own (serve/bridge_host.py)
    from serve import BridgeHostDied  # what its calls raise once its actor is gone

Importing this package is cheap: Ray, torch and MLflow load only when serving starts.
"""

from serve.config import CANARY_ADAPTER, SHADOW_ADAPTER, BridgeConfig, ServeConfig
from serve.handle import ServingHandle, check_ingress, prepare_local_ray, start_serving
from serve.source import ServeError

__all__ = ["ServeConfig", "BridgeConfig", "start_serving", "ServingHandle", "ServeError", "Bridge",
           "check_ingress", "prepare_local_ray", "SHADOW_ADAPTER", "bridge_metrics", "BridgeHost",
           "BridgeHostDied"]


def __getattr__(name: str):
    if name in ("Bridge", "bridge_metrics"):   # paho and the HTTP client load only when a bridge is wanted
        from serve import bridge

        return getattr(bridge, name)
    if name in ("BridgeHost", "BridgeHostDied"):
        from serve import bridge_host

        return getattr(bridge_host, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
