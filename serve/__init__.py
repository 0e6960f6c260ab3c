"""Serve: the Ray Serve app (LoRA adapters from MLflow, batching, hot swap) and the MQTT bridge.

Public API::

    from serve import ServeConfig, BridgeConfig, start_serving, ServingHandle
    from serve.bridge import Bridge

Importing this package is cheap: Ray, torch and MLflow load only when serving starts.
"""

from serve.config import BridgeConfig, ServeConfig
from serve.handle import ServingHandle, start_serving
from serve.source import ServeError

__all__ = ["ServeConfig", "BridgeConfig", "start_serving", "ServingHandle", "ServeError"]
