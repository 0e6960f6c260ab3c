"""``flywheel gateway``: connect a plant (OPC UA server or Sparkplug B edge nodes) to the stack.

    flywheel gateway --mapping plant.yaml --broker mqtt://127.0.0.1:1883
    flywheel gateway --mapping plant.yaml --check          # read and check the mapping, then exit

The mapping file (docs/gateway.md) names the protocol, the plant's endpoint and, per machine,
which node or metric is which reading.  Ctrl-C stops it (its status goes offline).
"""

from __future__ import annotations

import argparse
import signal
import threading

EXAMPLES = """examples:
  flywheel sim --scenario tiny --serve-opcua 4840 --speed 60 --write-mapping plant.yaml
  flywheel gateway --mapping plant.yaml --broker mqtt://127.0.0.1:1883
  flywheel sim --scenario tiny --sparkplug --speed 60 --broker mqtt://127.0.0.1:1883 --write-mapping sp.yaml
  flywheel gateway --mapping sp.yaml --broker mqtt://127.0.0.1:1883
  flywheel gateway --mapping plant.yaml --check
  flywheel gateway --make-certificate certs      # the gateway's OPC UA certificate, for a PLC that wants one
  flywheel gateway --mapping plant.yaml --broker mqtt://127.0.0.1:1883 --metrics-port 9104
"""


def register(sub, common) -> None:
    p = sub.add_parser("gateway", help="read a plant over OPC UA or Sparkplug B and publish it on the contract topics",
                       description="Read a plant's machines over OPC UA (subscriptions) or Sparkplug B (a host "
                                   "application on the plant's broker), publish their telemetry and machine events on "
                                   "<root>/<line>/<machine>/telemetry|event with deterministic event ids, and send "
                                   "maintenance commands back (OPC UA method Maintain, Sparkplug DCMD). Bad values, "
                                   "unknown nodes, sequence gaps and rebirths are counted by reason on the retained "
                                   "status <root>/_status/<component>.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mapping", metavar="FILE", help="the mapping file, YAML or JSON (docs/gateway.md); required "
                                                      "except with --make-certificate")
    p.add_argument("--make-certificate", default=None, metavar="DIR",
                   help="make the gateway's OPC UA application certificate (DIR/gateway-cert.der, self-signed, "
                        "application URI urn:flywheel:gateway) and key (DIR/gateway-key.pem), print the mapping's "
                        "opcua.security for them, and exit; the PLC must then trust gateway-cert.der")
    p.add_argument("--plant-broker", default=None, metavar="URL",
                   help="Sparkplug: the plant's broker if it is not --broker (or sparkplug.broker in the mapping)")
    p.add_argument("--component", default="gateway", help="name on the status topic (default gateway)")
    p.add_argument("--duration", default=None, help="wall time to run, e.g. 90m (default: until Ctrl-C)")
    p.add_argument("--check", action="store_true", help="check the mapping file and exit")
    common.add(p, broker=True, metrics=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from flywheel.base.config import parse_duration
    from flywheel.base.metrics import start_metrics
    from flywheel.base.mqtt import DEFAULT_URL, check_reachable

    from flywheel.base.config import ConfigError

    from gateway import GatewayService, gateway_metrics, load_mapping

    if args.make_certificate:
        return _make_certificate(args.make_certificate)
    if not args.mapping:
        raise ConfigError("flywheel gateway needs --mapping FILE (the plant's mapping, docs/gateway.md; "
                          "flywheel sim --write-mapping FILE writes one for the simulator)")
    mapping = load_mapping(args.mapping)
    where = mapping.endpoint if mapping.protocol == "opcua" else f"Sparkplug group {mapping.group!r}"
    print(f"flywheel gateway: {args.mapping}: {mapping.protocol}, {where}, {len(mapping.machines)} machines, "
          f"{sum(len(m.readings) for m in mapping.machines)} readings")
    if args.check:
        return 0
    duration = parse_duration(args.duration) if args.duration else None
    svc = GatewayService(mapping, args.broker or DEFAULT_URL, plant_broker=args.plant_broker,
                         component=args.component)
    # bad or busy port: a MetricsError (exit 2, named) before anything connects
    metrics = start_metrics(args.metrics_port, {args.component: lambda: gateway_metrics(svc.gateway)})
    if metrics is not None:
        print(f"flywheel gateway: Prometheus metrics on {metrics.url}")
    try:
        # the stack's broker, named with its fix (the plant's side is waited for and retried)
        check_reachable(args.broker or DEFAULT_URL, fix="start it (`flywheel broker` runs one) or check --broker")
        svc.start()
        done = threading.Event()
        old = signal.signal(signal.SIGINT, lambda *a: done.set())
        try:
            done.wait(duration)
        finally:
            signal.signal(signal.SIGINT, old)
            svc.stop()
    finally:
        if metrics is not None:
            metrics.close()
    c = svc.counters
    print("flywheel gateway: " + ", ".join(f"{k} {v:g}" for k, v in sorted(c.items())))
    return 0


def _make_certificate(directory: str) -> int:
    from pathlib import Path

    from flywheel.base.config import ConfigError
    from flywheel.base.opcua_security import GATEWAY_URI, make_certificate

    d = Path(directory).resolve()
    try:
        cert, key = make_certificate(d / "gateway-cert.der", d / "gateway-key.pem", GATEWAY_URI)
    except OSError as exc:
        raise ConfigError(f"--make-certificate {directory}: cannot write there ({exc.strerror}); "
                          "choose a directory you can write") from None
    print(f"flywheel gateway: certificate {cert} (application URI {GATEWAY_URI}) and key {key}.\n"
          "Add the certificate to the OPC UA server's trusted certificates, and to the mapping:\n"
          "opcua:\n"
          "  security: {policy: Basic256Sha256, mode: SignAndEncrypt,\n"
          f"             certificate: {cert}, private_key: {key}}}\n"
          "  user: NAME                      # if the server asks for one\n"
          "  password: ${PLANT_OPCUA_PASSWORD}")
    return 0
