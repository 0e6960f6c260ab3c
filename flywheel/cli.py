"""The ``flywheel`` command: one entry point, one sub-command per stage.

Each stage package registers its own sub-commands (``<package>/cli.py`` with a
``register(subparsers, common)`` function), so this file stays a table of contents.
Heavy libraries (torch, ray, mlflow) are imported inside the commands, never here, so
``flywheel --help`` is instant.

    flywheel demo                      # the whole loop on embedded defaults
    flywheel broker                    # an embedded MQTT broker
    flywheel sim --scenario demo       # the factory simulator
    flywheel --help                    # everything else
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import Callable

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError, one_line

#: Modules that register sub-commands, in the order they appear in ``--help``.
COMMAND_MODULES = (
    "flywheel.loop_cli",      # demo, run, turn, report
    "flywheel.broker_cli",    # broker
    "factory_sim.cli",        # sim
    "ingest.cli",             # ingest, dataset
    "finetune.cli",           # train
    "serve.cli",              # serve
    "flywheel.bench_cli",     # bench
)

DEFAULT_WORKDIR = ".flywheel"


class Common:
    """Adds the shared options (docs/architecture.md, "CLI") to a sub-command's parser."""

    @staticmethod
    def add(parser: argparse.ArgumentParser, *, broker: bool = False, workdir: bool = False,
            mlflow: bool = False, ray: bool = False, seed: bool = False, config: bool = False) -> None:
        g = parser.add_argument_group("common options")
        if broker:
            g.add_argument("--broker", metavar="URL", default=None,
                           help="MQTT broker, mqtt://user:pass@host:port or mqtts://... "
                                "(default: an embedded broker where the command can start one)")
        if workdir:
            g.add_argument("--workdir", default=DEFAULT_WORKDIR,
                           help=f"where the lake, MLflow database and artifacts live (default {DEFAULT_WORKDIR})")
        if mlflow:
            g.add_argument("--mlflow-uri", default=None,
                           help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db)")
        if ray:
            g.add_argument("--ray-address", default=None,
                           help="existing Ray cluster (e.g. ray://head:10001 or auto); default: local Ray")
        if seed:
            g.add_argument("--seed", type=int, default=0, help="random seed (plant, splits, training)")
        if config:
            g.add_argument("--config", metavar="FILE", default=None, help="YAML config file")
            g.add_argument("overrides", nargs="*", metavar="key=value",
                           help="config overrides, nested keys dotted (e.g. train.epochs=2)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flywheel",
        description="Industrial deployment data flywheel: factory -> MQTT -> Ray -> LoRA -> serve -> factory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  flywheel demo\n  flywheel broker --port 1884\n"
               "  flywheel sim --scenario demo --speed max --duration 1d --broker mqtt://127.0.0.1:1884\n"
               "  flywheel report --workdir .flywheel",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # stage not installed in this build; its commands are absent
                continue
            raise
        module.register(sub, Common)
    return parser


#: Third-party warnings that say nothing a flywheel user can act on (checked by hand; each
#: names code the stack does not control).  Everything else still shows.
QUIET_WARNINGS = (
    # mlflow.data.from_pandas on a snapshot with integer columns (they never hold missing values)
    (UserWarning, r"Hint: Inferred schema contains integer column"),
    # PEFT calls a transformers method that transformers renamed; nothing to change on our side
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


def quiet_known_warnings() -> None:
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flywheel train: error: ... (see flywheel train --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    # Every error the stack raises on purpose derives from FlywheelError and says what to do:
    # print it once, on one line, and end with its exit code (2: usage/config, 1: runtime).
    try:
        return int(func(args) or 0)
    except FlywheelError as exc:
        kind = "configuration error: " if isinstance(exc, ConfigError) else ""
        print(f"flywheel {args.command}: {kind}{one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"flywheel {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an MLflow server's refusal is a message, not a traceback
        from flywheel.base.tracking import error_message

        message = error_message(exc)
        if message is None:
            raise
        print(f"flywheel {args.command}: {one_line(message)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
