"""The plant gateway: a real plant's OPC UA server or Sparkplug B edge nodes onto the wire contract.

A mapping file (:mod:`gateway.mapping`, format in ``docs/gateway.md``) says which node or metric
is which reading of which machine; :class:`GatewayService` reads the plant
(:mod:`gateway.opcua`, :mod:`gateway.sparkplug_host`), publishes contract telemetry with
deterministic event ids (:mod:`gateway.core`) and sends maintenance commands back to the plant.
``flywheel gateway`` (:mod:`gateway.cli`) runs it.  A stage: it imports the base layer only.
"""

from gateway.core import Gateway, gateway_metrics
from gateway.mapping import Mapping, MappingError, load_mapping, parse_mapping
from gateway.service import GatewayService

__all__ = ["Gateway", "GatewayService", "gateway_metrics", "Mapping", "MappingError", "load_mapping", "parse_mapping"]
