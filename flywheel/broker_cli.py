"""``flywheel broker``: run the embedded MQTT broker in the foreground."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "broker", help="run an embedded MQTT broker (Mosquitto if installed, else amqtt)",
        description="Run an MQTT broker for one laptop: Mosquitto as a child process if it is installed, "
                    "otherwise an in-Python broker (amqtt) in its own process. Prints the URL (amqtt: with "
                    "?protocol=3.1.1, and a line on what it lacks); Ctrl-C stops it.",
        epilog="examples:\n  flywheel broker\n  flywheel broker --port 1884 --impl amqtt",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: a free port)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    p.add_argument("--impl", choices=("auto", "mosquitto", "amqtt"), default=None,
                   help="broker implementation (default: $FLYWHEEL_EMBEDDED_BROKER, else auto: Mosquitto "
                        "when installed)")
    p.add_argument("--data-dir", default=None, help="persistence directory (default: a temp dir)")
    p.set_defaults(func=run)


def run(args) -> int:
    from flywheel.base.broker import run_foreground
    from flywheel.base.errors import UsageError

    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1..65535, got {args.port}")
    return run_foreground(args.port, args.host, args.impl, args.data_dir)   # BrokerError: exit 1
