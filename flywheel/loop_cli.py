"""``flywheel demo | run | turn | report``: the loop from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES_DEMO = """examples:
  flywheel demo                                   # embedded defaults: broker, local Ray, MLflow on SQLite
  flywheel demo --seed 3 turns=4                  # another seed, one more turn
  flywheel demo --seeds 1,2,3                     # researchers: three campaigns, report with mean and spread
  flywheel demo --config flywheel/configs/tiny.yaml --workdir /tmp/fw   # a 2-minute smoke run
  flywheel demo --embedded-broker amqtt           # the pip-only path: the in-Python broker, even with Mosquitto
  flywheel demo scenario=drift campaign=drift     # the drift scenario: the drop after a supplier change
  flywheel demo scenario=drift campaign=drift-recover train.warm_start=true train.gate_metric=eval.f1_any_failure
                                                  # ... and the recovery (see benchmarks/RESULTS.md)
"""


def _embedded_broker_option(p) -> None:
    p.add_argument("--embedded-broker", choices=("auto", "mosquitto", "amqtt"), default=None,
                   help="the broker started when --broker is not given: auto (Mosquitto when installed, else the "
                        "in-Python amqtt: MQTT 3.1.1, one collector), mosquitto, or amqtt (default: "
                        "$FLYWHEEL_EMBEDDED_BROKER, else auto)")


def register(sub, common) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("demo", help="run the whole flywheel on embedded defaults and write the report",
                       description="Turn 0 runs the simulated plant to failure to collect data; each later turn "
                                   "builds a dataset, fine-tunes a LoRA challenger, gates and promotes it, hot-swaps "
                                   "Ray Serve, and runs the next plant period with maintenance driven by the model. "
                                   "Rerun with the same --workdir to continue a campaign.",
                       epilog=EXAMPLES_DEMO, formatter_class=fmt)
    common.add(p, broker=True, workdir=True, mlflow=True, ray=True, config=True)
    p.add_argument("--seed", type=int, default=None, help="plant/split/training seed (default: the config's, 0)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: one campaign per seed, then a combined report")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live view")
    _embedded_broker_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a campaign from a config file (any broker, Ray cluster, MLflow server)",
                       description="Like demo, but the config file is required: point it at your broker "
                                   "(--broker mqtts://...), cluster (--ray-address) and tracking server (--mlflow-uri).",
                       epilog="examples:\n  flywheel run --config plant.yaml --broker mqtts://campaign:${MQTT_CAMPAIGN_PASSWORD}@broker:8883 "
                              "--ray-address auto --mlflow-uri http://mlflow:5000",
                       formatter_class=fmt)
    common.add(p, broker=True, workdir=True, mlflow=True, ray=True, config=True)
    p.add_argument("--seed", type=int, default=None, help="seed (default: the config's)")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live view")
    _embedded_broker_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("turn", help="run one more turn of the campaign in --workdir",
                       description="Continue the campaign stored in --workdir by exactly one turn "
                                   "(against --broker / --ray-address / --mlflow-uri if given). Give the --config "
                                   "it ran with (default: the demo's); a turn starts no campaign: flywheel demo "
                                   "and flywheel run do.",
                       epilog="examples:\n  flywheel turn --workdir .flywheel turns=5", formatter_class=fmt)
    common.add(p, broker=True, workdir=True, mlflow=True, ray=True, config=True)
    p.add_argument("--seed", type=int, default=None, help="seed (default: the config's)")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live view")
    _embedded_broker_option(p)
    p.set_defaults(func=cmd_turn)

    p = sub.add_parser("report", help="write PNG plots and a Markdown summary of a campaign",
                       epilog="examples:\n  flywheel report\n  flywheel report --campaign demo --seeds 1,2,3",
                       formatter_class=fmt)
    common.add(p, workdir=True, mlflow=True)
    p.add_argument("--campaign", default="demo", help="campaign name (default demo)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: aggregate campaigns <campaign>-s<seed>")
    p.add_argument("--out", default=None, help="output directory (default <workdir>/reports/<campaign>)")
    p.set_defaults(func=cmd_report)


def _seeds(text: str | None) -> list[int] | None:
    from flywheel.base.config import ConfigError

    if text is None:          # no --seeds; an empty one is refused below, not read as "the default campaign"
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds should be comma-separated integers like 1,2,3, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds should name at least one seed, got {text!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:   # one campaign per seed: a seed named twice would count twice in the report's mean and interval
        raise ConfigError(f"--seeds names seed {', '.join(map(str, twice))} more than once ({text!r}); "
                          f"name each seed once, e.g. {','.join(map(str, sorted(set(seeds))))}")
    return seeds


def _load(args, require_config: bool = False):
    from flywheel.campaign import load_campaign
    from flywheel.base.config import ConfigError

    if require_config and not args.config:
        raise ConfigError("flywheel run needs --config FILE (flywheel demo runs the embedded defaults)")
    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return load_campaign(args.config, overrides)


def _run(args, cfg, max_new_turns=None) -> int:
    from flywheel.base.rayinit import stop_on_signals
    from flywheel.base.workdir import writable_folder
    from flywheel.loop import run_campaign
    from flywheel.report import write_report

    writable_folder(args.workdir, "--workdir")   # before Mosquitto, Ray or the plant start
    stop_on_signals()   # SIGTERM (docker stop, kill) and Ctrl-C, even in the background: a clean stop
    # a CampaignError says what to do; the CLI prints it on one line (exit 1)
    run_campaign(cfg, args.workdir, broker_url=args.broker, mlflow_uri=args.mlflow_uri,
                 ray_address=args.ray_address, max_new_turns=max_new_turns,
                 view=False if args.no_live else None, embedded_broker=args.embedded_broker)
    md = write_report(args.workdir, cfg.campaign, tracking_uri=args.mlflow_uri)
    _where_to_look(args, md)
    return 0


def _where_to_look(args, md: Path, mlflow: bool = True) -> None:
    import shlex

    from flywheel.base.mqtt import redact_url
    from flywheel.base.workdir import Workdir

    uri = Workdir(args.workdir, mlflow_uri=args.mlflow_uri).mlflow_uri
    print(f"\nreport:  {md}\nplots:   {md.parent}/*.png")
    if not mlflow:  # a multi-seed report is files only
        return
    if uri.startswith(("http://", "https://")):  # a tracking server has its own UI
        print(f"MLflow:  {redact_url(uri)}")
    else:
        # quoted: a workdir with a space in it must still give a command that can be pasted
        print(f"MLflow:  mlflow ui --backend-store-uri {shlex.quote(uri)}   (then open http://127.0.0.1:5000)")


def seed_campaign(cfg, seed: int):
    """One seed's campaign in a multi-seed run: its own state, MLflow experiment and registered
    model (a shared model would let one seed's champion gate another seed's challengers)."""
    import dataclasses

    return dataclasses.replace(cfg, seed=seed, campaign=f"{cfg.campaign}-s{seed}",
                               model_name=f"{cfg.model_name}-s{seed}")


def cmd_demo(args) -> int:
    from flywheel.report import write_report

    seeds = _seeds(args.seeds)
    cfg = _load(args)
    if not seeds:
        return _run(args, cfg)
    for s in seeds:
        rc = _run(args, seed_campaign(cfg, s))
        if rc:
            return rc
    md = write_report(args.workdir, cfg.campaign, seeds=seeds, tracking_uri=args.mlflow_uri)
    _where_to_look(args, md, mlflow=False)
    return 0


def cmd_run(args) -> int:
    return _run(args, _load(args, require_config=True))


def cmd_turn(args) -> int:
    cfg = _load(args)
    _campaign_to_continue(args.workdir, cfg.campaign)
    return _run(args, cfg, max_new_turns=1)


def _campaign_to_continue(workdir, campaign: str) -> None:
    """``flywheel turn`` continues a campaign: a :class:`ConfigError` naming what the workdir holds
    and the fix when ``campaign`` has no ``state.json`` there (a mistyped ``--workdir``, or a
    campaign run with another config), before anything is made or started."""
    import shlex

    from flywheel.base.config import ConfigError
    from flywheel.base.workdir import Workdir

    wd = Path(workdir)
    if wd.exists() and not wd.is_dir():
        return   # writable_folder names it
    folder = Workdir(wd).campaigns
    if (folder / campaign / "state.json").is_file():
        return
    held = sorted(p.parent.name for p in folder.glob("*/state.json")) if folder.is_dir() else []
    where = (f"{folder} holds {', '.join(repr(n) for n in held)}: continue one with the --config it ran with "
             f"(or campaign=<name>), or" if held else f"{wd} holds no campaign:")
    raise ConfigError(f"no campaign {campaign!r} in {wd} to continue (a turn continues one, it starts none); "
                      f"{where} start {campaign!r} with `flywheel run --config FILE --workdir {shlex.quote(str(wd))}` "
                      f"(`flywheel demo --workdir {shlex.quote(str(wd))}` for the embedded demo)")


def cmd_report(args) -> int:
    from flywheel.base.workdir import check_campaign_name
    from flywheel.report import write_report

    check_campaign_name(args.campaign, "--campaign")   # a folder under <workdir>/campaigns/, nothing outside it
    if args.out is not None:
        from flywheel.base.workdir import writable_folder

        writable_folder(args.out, "--out")
    # a ReportError says what is missing; the CLI prints it on one line (exit 1)
    md = write_report(args.workdir, args.campaign, seeds=_seeds(args.seeds), out_dir=args.out,
                      tracking_uri=args.mlflow_uri)
    _where_to_look(args, md, mlflow=not args.seeds)
    return 0
