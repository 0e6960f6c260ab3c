"""``flywheel serve``: run the model server (and optionally the MQTT bridge); roll back; show status.

    flywheel serve                                   # serve fault-detector@champion from the workdir's MLflow
    flywheel serve --bridge --broker mqtt://127.0.0.1:1884 bridge.threshold=0.4
    flywheel serve rollback --url http://127.0.0.1:8000
    flywheel serve status --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse

from flywheel.base.errors import UsageError
from flywheel.base.mqtt import redact_url
from flywheel.base.rayinit import stop_like_ctrl_c

ACTIONS = ("start", "rollback", "status", "bridge")

EPILOG = """\
actions (first positional argument, default start):
  start      deploy the app on Ray Serve and keep it running (Ctrl-C stops it)
  rollback   move the alias back to the previous champion, then refresh the app at --url
  status     print which version(s) the app at --url serves, and the last refusal if any

config: a YAML file with optional sections `serve:` (ServeConfig) and `bridge:` (BridgeConfig);
overrides are dotted by section, e.g. serve.poll_s=5 serve.max_batch_size=32 bridge.threshold=0.3

examples:
  flywheel serve
  flywheel serve --port 8000 serve.adapters.pump=pump-detector@champion
  flywheel serve serve.ingress=direct      # the replica's own port, no proxy hop (lowest latency)
  flywheel serve --bridge --broker mqtt://127.0.0.1:1884 bridge.threshold=0.4 bridge.cooldown_s=7200
  flywheel serve rollback --url http://127.0.0.1:8000
  flywheel serve status --url http://127.0.0.1:8000
"""


def register(sub, common) -> None:
    p = sub.add_parser(
        "serve", help="serve the fault detector (Ray Serve + MQTT bridge); rollback; status",
        description="Serve the registered fault detector (LoRA adapter from MLflow, alias champion) with Ray "
                    "Serve: POST /predict, GET /health, GET /version, OpenAPI at /docs. The app hot-swaps when "
                    "the alias moves. With --bridge it also turns plant telemetry on MQTT into predictions "
                    "and maintenance commands.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add(p, broker=True, workdir=True, mlflow=True, ray=True, config=True)
    p.add_argument("--model-name", default="fault-detector", help="registered model (default fault-detector)")
    p.add_argument("--alias", default="champion", help="alias to serve and roll back (default champion)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: a free port)")
    p.add_argument("--host", default=None, help="HTTP interface (default 127.0.0.1)")
    p.add_argument("--url", default=None, help="a running app's URL (rollback/status)")
    p.add_argument("--bridge", action="store_true", help="also run the MQTT bridge (needs --broker)")
    p.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
    p.set_defaults(func=run)


def _split(overrides: list[str]) -> tuple[str, list[str], list[str]]:
    from flywheel.base.config import ConfigError

    action, rest = "start", list(overrides)
    if rest and rest[0] in ACTIONS:
        action = rest.pop(0)
    serve_o, bridge_o = [], []
    for o in rest:
        if o.startswith("serve."):
            serve_o.append(o[len("serve."):])
        elif o.startswith("bridge."):
            bridge_o.append(o[len("bridge."):])
        else:
            raise ConfigError(f"override {o!r} should start with serve. or bridge. (e.g. serve.poll_s=5), "
                              f"or be one of the actions {', '.join(ACTIONS)} as the first argument")
    return action, serve_o, bridge_o


def run(args) -> int:
    from pathlib import Path

    from flywheel.base.config import load

    from serve.config import BridgeConfig, ServeConfig

    action, serve_o, bridge_o = _split(args.overrides)
    tracking_uri = args.mlflow_uri or f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}"
    if action == "status":
        return _status(args)
    if action == "bridge":
        return _bridge_only(args, load(BridgeConfig, args.config, bridge_o, section="bridge"))
    if action == "rollback":    # the same implementation as `flywheel train rollback`
        from finetune.registry import rollback_alias

        print(rollback_alias(tracking_uri, args.model_name, args.alias, args.url))
        return 0
    cfg = load(ServeConfig, args.config, serve_o, section="serve")
    if args.port is not None:
        cfg.http_port = args.port
    if args.host is not None:
        cfg.http_host = args.host
    bcfg = load(BridgeConfig, args.config, bridge_o, section="bridge")
    if args.bridge and not args.broker:
        raise UsageError("--bridge needs --broker mqtt://host:port (the plant's broker)")
    return _serve(args, tracking_uri, cfg, bcfg)


def _bridge_only(args, bcfg) -> int:
    """``flywheel serve bridge --url URL --broker URL``: only the MQTT bridge, against a running app
    (e.g. a KubeRay RayService); the app itself is deployed elsewhere."""
    import signal
    import time

    from serve.bridge import Bridge

    if not args.url or not args.broker:
        raise UsageError("serve bridge needs the running app's --url and the plant's --broker")
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    bridge = Bridge(args.broker, args.url, bcfg, topic_root=args.topic_root).start()
    print(f"bridge: {redact_url(args.broker)} -> {args.url} (threshold {bcfg.threshold}); Ctrl-C stops")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        bridge.stop()
    return 0


def _status(args) -> int:
    import json

    from serve.client import ServeClient

    if not args.url:
        raise UsageError("serve status needs the app's --url (printed by `flywheel serve`)")
    info = ServeClient(args.url).version()
    info.pop("config", None)
    print(json.dumps(info, indent=2))
    return 0


def _serve(args, tracking_uri, cfg, bcfg) -> int:
    import signal
    import time

    from rich.console import Console
    from rich.live import Live

    from serve.handle import start_serving

    console = Console()
    with console.status(f"deploying {args.model_name}@{args.alias} on Ray Serve ..."):
        # a ServeError says why it cannot serve; the CLI prints it on one line (exit 1)
        handle = start_serving(tracking_uri, args.model_name, args.alias, cfg, ray_address=args.ray_address)
    # SIGTERM (docker stop, Kubernetes, kill) stops as cleanly as Ctrl-C: bridge offline, app deleted.
    # (Installed once there is an app to delete; ray.init inside start_serving keeps it either way.)
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    bridge = None
    try:
        console.print(f"serving {args.model_name}@{args.alias} version {handle.version()} at {handle.url} "
                      f"(OpenAPI: {handle.url}/docs)")
        if handle.url != handle.proxy_url:
            console.print(f"direct ingress: the replica answers at {handle.url}; "
                          f"Ray Serve's proxy at {handle.proxy_url}")
        if args.bridge:
            from serve.bridge import Bridge

            bridge = Bridge(args.broker, handle.url, bcfg, topic_root=args.topic_root,
                            resolve_url=handle.current_url).start()
            console.print(f"bridge: {args.broker and redact_url(args.broker)} topics {args.topic_root}/+/+/telemetry "
                          f"-> predictions and commands (threshold {bcfg.threshold})")
        with Live(console=console, refresh_per_second=2, transient=True) as live:
            while True:
                line = f"version {handle.version()}"
                if bridge is not None:
                    s = bridge.stats()
                    line += (f" | telemetry {s['telemetry']} windows {s['windows']} predictions {s['predictions']} "
                             f"commands {s['commands']} decode errors {sum(s['decode_errors'].values())}")
                live.update(line)
                time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        if bridge is not None:
            bridge.stop()
        handle.shutdown()
    return 0


