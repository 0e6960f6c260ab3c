"""``flywheel serve``: run the model server (and optionally the MQTT bridge); roll back; show status.

    flywheel serve                                   # serve fault-detector@champion from the workdir's MLflow
    flywheel serve --bridge --broker mqtt://127.0.0.1:1884 bridge.threshold=0.4
    flywheel serve serve.poll_s=5 serve.max_batch_size=32
    flywheel serve rollback --url http://127.0.0.1:8000
    flywheel serve status --url http://127.0.0.1:8000
    flywheel serve bridge --url http://127.0.0.1:8000 --broker mqtt://127.0.0.1:1884
    flywheel serve pause --broker mqtts://operator:...@broker:8883 --reason "line 2 inspection"
    flywheel serve resume --broker mqtts://operator:...@broker:8883
    flywheel serve approve maintain-L1-mill-01-1440 --broker mqtts://operator:...@broker:8883

Overrides are ``serve.key=value`` (ServeConfig) and ``bridge.key=value`` (BridgeConfig), the
grammar of ``flywheel.base.config``; ``--config`` takes a file with ``serve:`` and ``bridge:``
sections (a campaign file works).  The actions are sub-commands with their own options.
"""

from __future__ import annotations

import argparse

from flywheel.base.errors import UsageError
from flywheel.base.mqtt import redact_url
from flywheel.base.rayinit import stop_on_signals
from flywheel.base.tracking import existing_store

_FMT = argparse.RawDescriptionHelpFormatter

EPILOG = """\
config: sections serve (ServeConfig) and bridge (BridgeConfig); overrides serve.KEY=VALUE and
bridge.KEY=VALUE (nested keys dotted); --config FILE holds serve: and bridge: sections (a campaign
file works).

examples:
  flywheel serve
  flywheel serve --port 8000 serve.adapters.pump=pump-detector@champion
  flywheel serve serve.ingress=direct      # the replica's own port, no proxy hop (lowest latency)
  flywheel serve --bridge --broker mqtt://127.0.0.1:1884 bridge.threshold=0.4 bridge.cooldown_s=7200
  flywheel serve rollback --url http://127.0.0.1:8000
  flywheel serve status --url http://127.0.0.1:8000
  flywheel serve bridge --url http://127.0.0.1:8000 --broker mqtt://127.0.0.1:1884 bridge.threshold=0.4
  flywheel serve pause --broker mqtt://127.0.0.1:1884 --reason "line 2 inspection"
  flywheel serve resume --broker mqtt://127.0.0.1:1884
"""


def register(sub, common) -> None:
    p = sub.add_parser(
        "serve", help="serve the fault detector (Ray Serve + MQTT bridge); rollback; status; bridge",
        description="Serve the registered fault detector (LoRA adapter from MLflow, alias champion) with Ray "
                    "Serve: POST /predict, GET /health, GET /version, OpenAPI at /docs. The app hot-swaps when "
                    "the alias moves. With --bridge it also turns plant telemetry on MQTT into predictions "
                    "and maintenance commands.",
        epilog=EPILOG, formatter_class=_FMT)
    actions = common.actions(p, run=("start", "deploy the app on Ray Serve and keep it running (the default; "
                                              "Ctrl-C stops it)"),
                             overrides="section.key=value")
    common.add(p, broker=True, workdir=True, mlflow=True, ray=True, config=True, metrics=True)
    p.add_argument("--model-name", default="fault-detector", help="registered model (default fault-detector)")
    p.add_argument("--alias", default="champion", help="alias to serve (default champion)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: a free port)")
    p.add_argument("--host", default=None, help="HTTP interface (default 127.0.0.1)")
    p.add_argument("--bridge", action="store_true", help="also run the MQTT bridge (needs --broker)")
    p.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
    p.set_defaults(func=run)

    r = actions.add_parser(
        "rollback", help="move the alias back to the previous champion, then refresh the app at --url",
        description="Move --model-name's --alias back to the version it pointed to before (the same as "
                    "`flywheel train rollback`); with --url the running app reloads at once, otherwise at its "
                    "next registry poll.",
        epilog="examples:\n  flywheel serve rollback --url http://127.0.0.1:8000\n"
               "  flywheel serve rollback --mlflow-uri http://mlflow:5000 --model-name pump-detector",
        formatter_class=_FMT)
    r.add_argument("--url", default=None, help="the running app's URL, refreshed after the move")
    r.add_argument("--model-name", default="fault-detector", help="registered model (default fault-detector)")
    r.add_argument("--alias", default="champion", help="alias to roll back (default champion)")
    common.add(r, workdir=True, mlflow=True)
    r.set_defaults(func=run_rollback)

    st = actions.add_parser(
        "status", help="print which version(s) the app at --url serves, and the last refusal if any",
        epilog="examples:\n  flywheel serve status --url http://127.0.0.1:8000", formatter_class=_FMT)
    st.add_argument("--url", default=None, help="the running app's URL (printed by `flywheel serve`)")
    st.set_defaults(func=_status)

    b = actions.add_parser(
        "bridge", help="only the MQTT bridge, against an app already running at --url",
        description="Run only the MQTT bridge (plant telemetry -> predictions and maintenance commands) against "
                    "an app deployed elsewhere, e.g. a KubeRay RayService. Overrides are bridge.KEY=VALUE. It "
                    "connects under a stable client id (bridge.client_id, default flywheel-bridge-<topic root>) "
                    "with a persistent session and keeps its state in <workdir>/bridge/: restarted under the "
                    "same id (after a crash or kill -9), it answers everything that arrived while it was away.",
        epilog="examples:\n  flywheel serve bridge --url http://127.0.0.1:8000 --broker mqtt://127.0.0.1:1884 "
               "bridge.threshold=0.4",
        formatter_class=_FMT)
    b.add_argument("--url", default=None, help="the running app's URL")
    b.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
    common.add(b, broker=True, workdir=True, mlflow=True, config=True, metrics=True)
    b.set_defaults(func=run_bridge)

    for name, paused, what in (("pause", True, "stop the bridge from ordering maintenance (predictions go on)"),
                               ("resume", False, "let the bridge order maintenance again")):
        c = actions.add_parser(
            name, help=f"the off switch: {what}",
            description=f"The off switch: {what}. Publishes a retained control message on "
                        "{root}/_control/serve-bridge, which every running bridge obeys at once and a restarted "
                        "one reads when it connects. Under the broker's ACL only the operator identity may write "
                        "it: connect as that user.",
            epilog=f"examples:\n  flywheel serve {name} --broker mqtt://127.0.0.1:1884"
                   + (' --reason "line 2 inspection"' if paused else ""),
            formatter_class=_FMT)
        c.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
        c.add_argument("--reason", default="", help="why, recorded with the switch and logged by the bridge")
        c.add_argument("--component", default="serve-bridge", help="the bridge's component name (default serve-bridge)")
        common.add(c, broker=True)
        c.set_defaults(func=run_switch, paused=paused)

    a = actions.add_parser(
        "approve", help="approve a proposed maintenance order (a bridge in bridge.mode=approve)",
        description="Send a proposed order to the plant: a bridge in bridge.mode=approve publishes each order it "
                    "would give on {root}/_review/serve-bridge (a Command with its command_id) and sends it only when "
                    "this approval arrives within bridge.proposal_ttl_s plant seconds of its window. Under the "
                    "broker's ACL only the operator identity may approve.",
        epilog="examples:\n  flywheel serve approve maintain-L1-mill-01-1440 --broker mqtt://127.0.0.1:1884\n"
               "  mosquitto_sub -t 'factory/_review/serve-bridge'      # watch the proposals",
        formatter_class=_FMT)
    a.add_argument("command_id", help="the proposal's command_id (from the review topic)")
    a.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
    a.add_argument("--component", default="serve-bridge", help="the bridge's component name (default serve-bridge)")
    common.add(a, broker=True)
    a.set_defaults(func=run_approve)


def _workdir(args):
    from flywheel.base.workdir import Workdir

    return Workdir(args.workdir, mlflow_uri=args.mlflow_uri)


def load_configs(path, overrides, sections=("serve", "bridge")) -> dict:
    """ServeConfig and BridgeConfig from --config (serve: and bridge: sections) and section.key=value overrides."""
    from flywheel.base.config import load_sections

    from serve.config import BridgeConfig, ServeConfig

    classes = {"serve": ServeConfig, "bridge": BridgeConfig}
    return load_sections({name: classes[name] for name in sections}, path, list(overrides or []))


def run(args) -> int:
    """``flywheel serve`` (``flywheel serve start``): deploy the app, optionally with the bridge."""
    cfgs = load_configs(args.config, args.overrides)
    cfg, bcfg = cfgs["serve"], cfgs["bridge"]
    if args.port is not None:
        cfg.http_port = args.port
    if args.host is not None:
        cfg.http_host = args.host
    if args.bridge and not args.broker:
        raise UsageError("--bridge needs --broker mqtt://host:port (the plant's broker)")
    if args.bridge:   # the bridge runs in this process: a broker it cannot reach is said before Ray and Serve
        from flywheel.base.mqtt import check_reachable

        check_reachable(args.broker)
    return _serve(args, _workdir(args).mlflow_uri, cfg, bcfg)


def run_rollback(args) -> int:
    """``flywheel serve rollback``: the registry's shared rollback (as ``flywheel train rollback``)."""
    from finetune.registry import rollback_alias

    print(rollback_alias(existing_store(_workdir(args).mlflow_uri), args.model_name, args.alias, args.url))
    return 0


def run_bridge(args) -> int:
    return _bridge_only(args, load_configs(args.config, args.overrides, sections=("bridge",))["bridge"])


def _bridge_only(args, bcfg) -> int:
    """``flywheel serve bridge --url URL --broker URL``: only the MQTT bridge, against a running app
    (e.g. a KubeRay RayService); the app itself is deployed elsewhere."""
    import time

    from serve.bridge import Bridge

    if not args.url or not args.broker:
        raise UsageError("serve bridge needs the running app's --url and the plant's --broker")
    stop_on_signals()   # SIGTERM and Ctrl-C stop it cleanly, also when started in the background
    _default_state_dir(args, bcfg)
    bridge = Bridge(args.broker, args.url, bcfg, topic_root=args.topic_root).start()
    metrics = _bridge_metrics(args, bridge)
    print(f"bridge: {redact_url(args.broker)} -> {args.url} (threshold {bcfg.threshold}); client id "
          f"{bridge.client_id}" + (f", resumed from {bridge.restored_from}" if bridge.restored_from else "")
          + "; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        bridge.stop()
        if metrics is not None:
            metrics.close()
    return 0


def _bridge_metrics(args, bridge):
    """``--metrics-port``: the bridge's Prometheus metrics (:func:`serve.bridge.bridge_metrics`)."""
    from flywheel.base.metrics import start_metrics
    from serve.bridge import bridge_metrics

    metrics = start_metrics(getattr(args, "metrics_port", None), {"bridge": lambda: bridge_metrics(bridge)})
    if metrics is not None:
        print(f"Prometheus metrics on {metrics.url}")
    return metrics


def _default_state_dir(args, bcfg) -> None:
    """A bridge run from the command line keeps its state file in the workdir unless told otherwise."""
    if not bcfg.state_dir:
        bcfg.state_dir = str(_workdir(args).root / "bridge")


def run_switch(args) -> int:
    """``flywheel serve pause|resume``: the retained control message the bridges obey."""
    import getpass
    import time

    from flywheel.base import contract
    from flywheel.base.mqtt import publish_retained

    if not args.broker:
        raise UsageError(f"serve {'pause' if args.paused else 'resume'} needs the plant's --broker "
                         "(as the operator identity where the broker has an ACL)")
    topic = contract.Topics(args.topic_root).control(args.component)
    msg = contract.Control(paused=args.paused, by=getpass.getuser(), reason=args.reason, ts=time.time())
    publish_retained(args.broker, topic, contract.encode(msg))
    print(f"{'paused' if args.paused else 'resumed'}: {topic} on {redact_url(args.broker)}")
    return 0


def run_approve(args) -> int:
    """``flywheel serve approve COMMAND_ID``: one Approval on the bridge's approve topic."""
    import getpass
    import time

    from flywheel.base import contract
    from flywheel.base.mqtt import publish_once

    if not args.broker:
        raise UsageError("serve approve needs the plant's --broker (as the operator identity where the broker has an ACL)")
    if not args.command_id.strip():
        raise UsageError("serve approve needs the proposal's command_id (see the review topic)")
    topic = contract.Topics(args.topic_root).approve(args.component)
    publish_once(args.broker, topic, contract.encode(contract.Approval(command_id=args.command_id, by=getpass.getuser(),
                                                                       ts=time.time())))
    print(f"approved {args.command_id}: {topic} on {redact_url(args.broker)}")
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
    import time

    from rich.console import Console
    from rich.live import Live

    from serve.handle import start_serving

    existing_store(tracking_uri)    # a workdir without a store holds no model: said before Ray starts
    console = Console(soft_wrap=True, markup=False)   # a path or id whole and on one line, also in a pipe
    with console.status(f"deploying {args.model_name}@{args.alias} on Ray Serve ..."):
        # a ServeError says why it cannot serve; the CLI prints it on one line (exit 1)
        handle = start_serving(tracking_uri, args.model_name, args.alias, cfg, ray_address=args.ray_address)
    # SIGTERM (docker stop, Kubernetes, kill) stops as cleanly as Ctrl-C: bridge offline, app deleted;
    # Ctrl-C too where the command started with it ignored (in the background of a script).
    # (Installed once there is an app to delete; ray.init inside start_serving keeps them either way.)
    stop_on_signals()
    bridge = metrics = None
    try:
        console.print(f"serving {args.model_name}@{args.alias} version {handle.version()} at {handle.url} "
                      f"(OpenAPI: {handle.url}/docs)")
        if handle.url != handle.proxy_url:
            console.print(f"direct ingress: the replica answers at {handle.url}; "
                          f"Ray Serve's proxy at {handle.proxy_url}")
        if args.bridge:
            from serve.bridge import Bridge

            _default_state_dir(args, bcfg)
            bridge = Bridge(args.broker, handle.url, bcfg, topic_root=args.topic_root,
                            resolve_url=handle.current_url).start()
            metrics = _bridge_metrics(args, bridge)
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
        if metrics is not None:
            metrics.close()
        handle.shutdown()
    return 0


