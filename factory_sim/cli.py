"""``flywheel sim``: run the simulated plant against an MQTT broker, with a live status line.

    flywheel sim --scenario demo --speed max --duration 1d --broker mqtt://127.0.0.1:1884
    flywheel sim --scenario ai4i --out ai4i.jsonl          # calibration run; stops by itself
    flywheel sim --scenario demo --speed 600 scenario.milling.repair_s=7200 scenario.machines.pump=4

Overrides are ``scenario.key=value`` on the --scenario's settings (a bare key means
``scenario.``), the grammar of ``flywheel.base.config``; ``--config`` takes a file with a
``scenario:`` section or Scenario keys at its top, or a campaign file (its scenario, with its
scenario_overrides).

Without ``--broker`` an embedded broker is started (its URL is printed; it stops with the
sim).  Ctrl-C stops after the current tick and prints the final KPIs; a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import signal

EXAMPLES = """config: the --scenario's Scenario, section scenario; overrides scenario.KEY=VALUE, nested keys
dotted (a bare KEY=VALUE means scenario.KEY=VALUE); --config FILE holds a scenario: section or
Scenario keys at its top, or is a campaign file (its scenario and scenario_overrides).

examples:
  flywheel sim --scenario demo --speed max --duration 1d --broker mqtt://127.0.0.1:1884
  flywheel sim --scenario demo --speed 3600 --duration 12h        # one plant hour per second
  flywheel sim --scenario ai4i --out ai4i.jsonl                  # calibration run (stops after 10,000 parts)
  python -m factory_sim.calibration ai4i.jsonl                   # ...compared with the AI4I 2020 data set
  flywheel sim --scenario drift --duration 4d scenario.drift.at_s=86400 scenario.machines.milling=6
  flywheel sim --config flywheel/configs/demo.yaml --duration 2d       # a campaign's plant
  flywheel sim --scenario tiny --lockstep --broker mqtt://127.0.0.1:1884   # wait for the serving bridge
  flywheel sim --scenario tiny --serve-opcua 4840 --speed 60 --write-mapping plant.yaml   # a plant of PLCs
  flywheel sim --scenario tiny --sparkplug --speed 60 --write-mapping sp.yaml             # Sparkplug B edge nodes
  FLYWHEEL_OPCUA_PASSWORD=... flywheel sim --scenario tiny --serve-opcua 4840 --opcua-secure certs \\
      --write-mapping plant.yaml                    # a PLC that signs and encrypts, and asks for a password
  (then: flywheel gateway --mapping plant.yaml --broker mqtt://127.0.0.1:1884)
"""


def register(sub, common) -> None:
    p = sub.add_parser("sim", help="run the simulated factory (publishes telemetry/events, obeys commands)",
                       description="Run a plant of milling machines and pumps in plant time and publish its "
                                   "telemetry and events over MQTT (QoS 1). The same --scenario and --seed give a "
                                   "byte-identical stream at any --speed. Maintenance commands arrive on "
                                   "<root>/<line>/<machine>/command; the retained status is <root>/_status/sim.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=None,
                   help="scenario name or YAML path (default demo, or the scenario of a campaign --config)")
    p.add_argument("--speed", default="max", help="plant seconds per wall second, or max (default max)")
    p.add_argument("--duration", default=None,
                   help="plant time to run: 90m, 12h, 7d (default 1d; self-stopping scenarios: until done)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="also write every published message here, one {topic, payload} object a line")
    p.add_argument("--topic-root", default="factory", help="MQTT topic root (default factory)")
    p.add_argument("--lockstep", action="store_true",
                   help="at each window end wait for the serving bridge's predictions (closed loop, deterministic)")
    p.add_argument("--lockstep-timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for predictions before going on (default 30)")
    p.add_argument("--bridge-restart-timeout", type=float, default=600.0, metavar="S",
                   help="lockstep: how long to wait for a serving bridge that went offline (restarting) before "
                        "stopping with an error (default 600)")
    p.add_argument("--stride-s", type=float, default=600.0, help="window stride in plant seconds (default 600)")
    p.add_argument("--window-length", type=int, default=10, help="telemetry readings per window (default 10)")
    p.add_argument("--no-live", action="store_true", help="no live status line (plain output)")
    plant = p.add_argument_group("speaking a plant's protocols (read by flywheel gateway instead of the JSON topics)")
    plant.add_argument("--serve-opcua", type=int, default=None, metavar="PORT",
                       help="expose each machine as an OPC UA object at opc.tcp://HOST:PORT/flywheel/ (readings as "
                            "variables with engineering units, a Maintain method) instead of publishing on MQTT")
    plant.add_argument("--opcua-host", default="127.0.0.1", help="address the OPC UA server binds (default 127.0.0.1)")
    plant.add_argument("--opcua-secure", default=None, metavar="DIR",
                       help="with --serve-opcua: offer only a signed and encrypted endpoint (Basic256Sha256, "
                            "SignAndEncrypt) for user 'gateway' with the password in $FLYWHEEL_OPCUA_PASSWORD; makes "
                            "the server's and the gateway's certificates in DIR (kept when valid), and --write-mapping "
                            "points the gateway at them")
    plant.add_argument("--sparkplug", action="store_true",
                       help="publish Sparkplug B (an edge node per line, a device per machine) instead of the JSON topics")
    plant.add_argument("--sparkplug-group", default="flywheel", help="Sparkplug group id (default flywheel)")
    plant.add_argument("--write-mapping", default=None, metavar="FILE",
                       help="write the flywheel gateway mapping file for this plant and protocol")
    common.add(p, broker=True, seed=True, config=True, metrics=True)
    p.set_defaults(func=run)


def _speed(text: str) -> float | None:
    if text.strip().lower() == "max":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        from flywheel.base.config import ConfigError

        raise ConfigError(f"--speed {text!r} should be a number of plant seconds per wall second > 0, or max")
    return v


def _fmt_duration(seconds: float) -> str:
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    return f"{d}d {h:02d}:{rem // 60:02d}" if d else f"{h:02d}:{rem // 60:02d}"


def load_sim_scenario(name: str | None, config: str | None, overrides) -> "Scenario":
    """The scenario ``name`` (default demo), then --config and scenario.key=value overrides.

    A campaign file (``scenario: NAME``, ``scenario_overrides: [...]``) gives the plant it runs.
    """
    from flywheel.base.config import load_section, read_config_file

    from factory_sim import load_scenario
    from factory_sim.scenario import Scenario

    overrides = list(overrides or [])
    data = read_config_file(config) if config else {}
    if isinstance(data.get("scenario"), str):      # a campaign file: its plant, not Scenario keys
        name = name or data["scenario"]
        overrides = [f"scenario.{o}" for o in data.get("scenario_overrides") or []] + overrides
        config = None
    return load_section(Scenario, "scenario", config, overrides, base=load_scenario(name or "demo"))


def run(args) -> int:
    from datetime import datetime, timezone

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from flywheel.base.config import ConfigError, parse_duration
    from flywheel.base.mqtt import ConnectError

    from factory_sim import Plant
    from factory_sim.mqtt_runner import MqttSimRunner

    console = Console(stderr=False, highlight=False, soft_wrap=True, markup=False)
    scenario = load_sim_scenario(args.scenario, args.config, args.overrides)
    speed = _speed(args.speed)
    if args.duration is not None:
        duration_s = parse_duration(args.duration)
        if duration_s < scenario.tick_s:
            raise ConfigError(f"--duration {args.duration!r} is shorter than one tick ({scenario.tick_s:g} s)")
        from flywheel.base.contract import MAX_TS

        if scenario.epoch_ts + duration_s >= MAX_TS:   # its messages would leave the contract's times
            raise ConfigError(f"--duration {args.duration!r} from the scenario's epoch ({scenario.epoch}) runs past "
                              "the year 9999, the last plant time the wire contract carries: give a shorter one")
    elif scenario.stop_after_parts:
        duration_s = 10 * 365 * 86400.0       # runs until its parts are made
    else:
        duration_s = 86400.0
    if args.seed < 0:
        raise ConfigError(f"--seed should be >= 0, got {args.seed}")
    if args.out:   # before the broker and the plant start
        from pathlib import Path

        from flywheel.base.workdir import writable_folder

        if Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a folder: name the file to write "
                              f"(e.g. {Path(args.out) / 'plant.jsonl'})")
        writable_folder(Path(args.out).absolute().parent, "--out's folder")
    plant = Plant(scenario, seed=args.seed)
    if args.serve_opcua is not None or args.sparkplug or args.write_mapping:
        return _run_plant_protocol(args, plant, speed, duration_s, console)

    broker = None
    url = args.broker
    if url is None:
        from flywheel.base.broker import EmbeddedBroker

        broker = EmbeddedBroker()
        broker.start()      # a BrokerError says why and ends the command (exit 1)
        url = broker.url
        console.print(f"embedded {broker.impl} broker at {url} (it stops with the sim)")
    from flywheel.base.features import WindowConfig

    # bad --stride-s / --window-length: WindowConfig or the runner raises ConfigError (exit 2)
    window = WindowConfig(length=args.window_length, stride_s=args.stride_s)
    runner = MqttSimRunner(plant, url, topic_root=args.topic_root, speed=speed, lockstep=args.lockstep,
                           lockstep_timeout_s=args.lockstep_timeout, out_path=args.out, window=window,
                           bridge_restart_timeout_s=args.bridge_restart_timeout)
    from flywheel.base.metrics import start_metrics
    from factory_sim.mqtt_runner import sim_metrics

    metrics = start_metrics(args.metrics_port, {"sim": lambda: sim_metrics(runner)})  # bad port: exit 2, named
    if metrics is not None:
        console.print(f"Prometheus metrics on {metrics.url}")
    lines = sorted({v.line for v in plant.machines})
    n = len(plant.machines)
    until = (f"until {scenario.stop_after_parts:,} parts are made" if scenario.stop_after_parts and args.duration is None
             else f"{_fmt_duration(duration_s)} of plant time")
    console.print(f"flywheel sim: scenario {scenario.name} ({n} machine{'s' if n > 1 else ''} on "
                  f"{len(lines)} line{'s' if len(lines) > 1 else ''}), seed {args.seed}, speed "
                  f"{'max' if speed is None else f'{speed:g}x'}, {until}, broker {runner.url.redacted()}, "
                  f"topics {args.topic_root}/...")

    def line(s) -> Text:
        k = plant.cumulative_kpis().to_dict()
        ts = datetime.fromtimestamp(plant.now_ts, timezone.utc).strftime("%Y-%m-%d %H:%M")
        return Text(f"plant {ts} | {s.messages_per_s:,.0f} msg/s | published {s.published:,} | OEE {k['oee']:.3f} | "
                    f"failures {k['failures']} | parts {k['parts']:,} | commands {s.commands_applied} "
                    f"(refused {s.commands_refused})")

    interrupted = {"n": 0}

    def on_sigint(signum, frame):
        interrupted["n"] += 1
        if interrupted["n"] > 1:
            raise KeyboardInterrupt
        runner.stop()

    try:
        old = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:         # not the main thread (embedded use): Ctrl-C is the caller's business
        old = None
    live = None if args.no_live or not console.is_terminal else Live(Text(""), console=console, refresh_per_second=4)
    last_print = {"t": 0.0}

    def progress(s) -> None:
        if live is not None:
            live.update(line(s))
        elif not args.no_live and s.wall_s - last_print["t"] >= 10.0:   # logs: a line every 10 s
            last_print["t"] = s.wall_s
            console.print(line(s))

    try:
        if live is not None:
            live.start()
        summary = runner.run(duration_s, progress=progress)
    except ConnectError as exc:
        raise ConnectError(f"{exc} (or leave out --broker: the simulator then starts an embedded one)") from None
    except KeyboardInterrupt:
        console.print("flywheel sim: aborted")
        return 130
    finally:
        if live is not None:
            live.stop()
        if old is not None:
            signal.signal(signal.SIGINT, old)
        if broker is not None:
            broker.close()
        if metrics is not None:
            metrics.close()
    k = plant.cumulative_kpis()
    how = {"duration": "ran its duration", "finished": "finished its parts", "stop": "stopped (Ctrl-C)"}[summary.stopped_by]
    console.print(f"flywheel sim: {how}: {_fmt_duration(summary.plant_end_ts - summary.plant_start_ts)} of plant "
                  f"time in {summary.wall_s:.1f} s, {summary.published:,} messages "
                  f"({summary.messages_per_s:,.0f}/s), commands applied {summary.commands_applied}, "
                  f"refused {summary.commands_refused}, lockstep timeouts {summary.lockstep_timeouts}")
    console.print(f"KPIs: {k.summary()}")
    for name, lk in k.by_line().items():
        console.print(f"  {name}: {lk.summary()}")
    if summary.last_error:
        console.print(f"last error: {summary.last_error}")
    if args.out:
        console.print(f"messages written to {args.out}")
        if scenario.name == "ai4i":
            console.print(f"compare with the AI4I 2020 data set: python -m factory_sim.calibration {args.out}")
    return 0



#: The environment variable holding the password of the simulated PLC's user ``gateway``.
OPCUA_PASSWORD_ENV = "FLYWHEEL_OPCUA_PASSWORD"


def _opcua_security(directory: str):
    """``--opcua-secure DIR``: the server's security and the gateway's side of the mapping."""
    import os
    from pathlib import Path

    from flywheel.base.config import ConfigError
    from flywheel.base.opcua_security import GATEWAY_URI, PLANT_URI, make_certificate

    from factory_sim.opcua_server import PlantSecurity

    password = os.environ.get(OPCUA_PASSWORD_ENV)
    if not password:
        raise ConfigError(f"--opcua-secure needs the password of the server's user 'gateway' in ${OPCUA_PASSWORD_ENV}: "
                          f"export {OPCUA_PASSWORD_ENV}=... (the gateway reads the same variable)")
    d = Path(directory).resolve()
    try:
        cert, key = make_certificate(d / "plant-cert.der", d / "plant-key.pem", PLANT_URI, server=True)
        gw_cert, gw_key = make_certificate(d / "gateway-cert.der", d / "gateway-key.pem", GATEWAY_URI)
    except OSError as exc:
        raise ConfigError(f"--opcua-secure {directory}: cannot write the certificates there ({exc.strerror}); "
                          "choose a directory you can write") from None
    security = PlantSecurity(certificate=str(cert), private_key=str(key), users={"gateway": password})
    return security, {"security": {"policy": security.policy, "mode": security.mode, "certificate": str(gw_cert),
                                   "private_key": str(gw_key), "server_certificate": str(cert)},
                      "user": "gateway", "password": "${" + OPCUA_PASSWORD_ENV + "}"}


def _run_plant_protocol(args, plant, speed, duration_s, console) -> int:
    """``--serve-opcua`` / ``--sparkplug``: the plant speaks a plant protocol; ``flywheel gateway`` reads it."""
    import yaml

    from flywheel.base.config import ConfigError

    from factory_sim.plant_tags import gateway_mapping

    if (args.serve_opcua is not None) == bool(args.sparkplug):
        raise ConfigError("choose one plant protocol: --serve-opcua PORT or --sparkplug "
                          "(--write-mapping writes the mapping for the one chosen)")
    if args.lockstep:
        raise ConfigError("--lockstep runs over the JSON topics only; leave it out with --serve-opcua / --sparkplug")
    if args.opcua_secure and args.serve_opcua is None:
        raise ConfigError("--opcua-secure secures the OPC UA server: add --serve-opcua PORT")
    broker = None
    if args.serve_opcua is not None:
        from factory_sim.opcua_server import OpcUaPlantServer

        if not 0 < args.serve_opcua < 65536:
            raise ConfigError(f"--serve-opcua {args.serve_opcua} should be a TCP port (1-65535)")
        security, gateway_side = _opcua_security(args.opcua_secure) if args.opcua_secure else (None, None)
        link = OpcUaPlantServer(plant, args.serve_opcua, host=args.opcua_host, speed=speed, out_path=args.out,
                                topic_root=args.topic_root, security=security)
        mapping = gateway_mapping(plant, "opcua", endpoint=link.endpoint, topic_root=args.topic_root)
        if gateway_side:
            mapping["opcua"].update(gateway_side)
        where = link.endpoint + (" (Basic256Sha256, SignAndEncrypt, user gateway)" if security else "")
    else:
        from factory_sim.sparkplug_edge import SparkplugPlant

        url = args.broker
        if url is None:        # as on the JSON path: an embedded broker, its URL printed, gone with the sim
            from flywheel.base.broker import EmbeddedBroker

            broker = EmbeddedBroker()
            broker.start()
            url = broker.url
            console.print(f"embedded {broker.impl} broker at {url} (it stops with the sim)")
        link = SparkplugPlant(plant, url, group=args.sparkplug_group, speed=speed, out_path=args.out,
                              topic_root=args.topic_root)
        mapping = gateway_mapping(plant, "sparkplug", group=args.sparkplug_group, topic_root=args.topic_root)
        where = f"spBv1.0/{args.sparkplug_group}/# on {link.url.redacted()}"
    if args.write_mapping:
        with open(args.write_mapping, "w") as f:
            f.write(f"# flywheel gateway --mapping {args.write_mapping}\n")
            yaml.safe_dump(mapping, f, sort_keys=False)
        console.print(f"gateway mapping written to {args.write_mapping}")
    try:
        link.start()
        console.print(f"flywheel sim: scenario {plant.scenario.name}, seed {args.seed}, "
                      f"{len(plant.machines)} machines at {where}, speed {'max' if speed is None else f'{speed:g}x'}")
        summary = link.run(duration_s)
    finally:
        link.close()
        if broker is not None:
            broker.close()
    lost = sum(len(v) for v in summary.lost.values())
    console.print(f"flywheel sim: {summary.ticks} ticks in {summary.wall_s:.1f} s, {summary.samples:,} samples "
                  f"exposed ({lost} lost), commands applied {summary.commands_applied}, refused "
                  f"{summary.commands_refused}")
    console.print(f"KPIs: {plant.cumulative_kpis().summary()}")
    return 0
