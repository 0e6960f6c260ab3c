"""The ``flywheel`` command: one entry point, one sub-command per stage.

Each stage package registers its own sub-commands (``<package>/cli.py`` with a
``register(subparsers, common)`` function), so this file stays a table of contents.
Heavy libraries (torch, ray, mlflow) are imported inside the commands, never here, so
``flywheel --help`` is instant.

Config overrides have one grammar, ``section.key=value`` (``flywheel.base.config``): a
command's positional words are overrides of its sections, or, for a command that has
actions, an action's name first (``flywheel train rollback``, ``flywheel serve status``).

    flywheel demo                                  # the whole loop on embedded defaults
    flywheel broker                                # an embedded MQTT broker
    flywheel sim --scenario demo                   # the factory simulator
    flywheel train --dataset ds-1 train.epochs=2   # one stage, its section's overrides
    flywheel --help                                # everything else
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import Callable

from flywheel.base.config import ConfigError
from flywheel.base.errors import FlywheelError, one_line
from flywheel.base.workdir import DEFAULT_WORKDIR

#: Modules that register sub-commands, in the order they appear in ``--help``.
COMMAND_MODULES = (
    "flywheel.loop_cli",      # demo, run, turn, report
    "flywheel.broker_cli",    # broker
    "factory_sim.cli",        # sim
    "gateway.cli",            # gateway
    "ingest.cli",             # ingest, dataset
    "finetune.cli",           # train
    "serve.cli",              # serve
    "flywheel.bench_cli",     # bench
    "flywheel.audit_cli",     # lineage
)


def _workdir(text: str) -> str:
    """``--workdir``: a folder, or a path to make one at; a file there is refused by every command
    (those that only read it said "no lake" or "no MLflow store" there, and a fix that could not work)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: name a folder (it is made if missing)")
    return text

class _Actions(argparse._SubParsersAction):
    """The actions of a command that also runs on its own: ``flywheel train`` trains,
    ``flywheel train rollback`` rolls back.

    Each action is an argparse sub-command with its own options.  A first positional word that
    names no action starts the command's own run: it and every later positional are its
    ``section.key=value`` overrides (``args.overrides``), and options may follow them.
    """

    class _AnyWord(dict):
        """argparse checks the first word against the choices; __call__ sorts it out instead."""

        def __contains__(self, word) -> bool:
            return True

    def __init__(self, *args, run_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_name = run_name
        self.choices = self._AnyWord()

    def __call__(self, parser, namespace, values, option_string=None):
        name, rest = values[0], list(values[1:])
        if name in self._name_parser_map and name != self.run_name:
            sub = self._name_parser_map[name]
            if self.dest is not argparse.SUPPRESS:
                setattr(namespace, self.dest, name)
            subns, extras = sub.parse_known_args(rest, None)
            # Options given before the action name stay unless the action's own line sets them.
            for key, value in vars(subns).items():
                if key in sub._defaults or not hasattr(namespace, key) or value != sub.get_default(key):
                    setattr(namespace, key, value)
        else:
            if name == self.run_name:
                values = rest
            elif "=" not in name:
                actions = ", ".join(n for n in self._name_parser_map if n != self.run_name)
                raise argparse.ArgumentError(self, f"{name!r} is neither an action ({actions}) "
                                                   "nor a section.key=value override")
            n = next((i for i, v in enumerate(values) if v.startswith("-")), len(values))
            namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(values[:n])
            # what follows the overrides (options, more overrides) is the command's own line
            _, extras = parser.parse_known_args(values[n:], namespace) if values[n:] else (namespace, [])
        if extras:
            vars(namespace).setdefault(argparse._UNRECOGNIZED_ARGS_ATTR, []).extend(extras)


class Common:
    """Adds the shared options (docs/architecture.md, "CLI") to a sub-command's parser."""

    @staticmethod
    def actions(parser: argparse.ArgumentParser, *, run: tuple[str, str] | None = None,
                overrides: str = "section.key=value"):
        """Give ``parser`` actions (sub-commands, ``.add_parser(name, ...)`` each); call before :meth:`add`.

        Without an action the command runs itself with ``args.overrides``; ``run`` names that
        run as an action too (``("start", "help")``: ``flywheel serve start``).
        """
        parser.set_defaults(overrides=[])
        own = f"`{parser.prog} {run[0]}` or " if run else ""
        sub = parser.add_subparsers(
            action=_Actions, run_name=run[0] if run else None, metavar=f"[ACTION | {overrides}]", title="actions",
            description=f"without an action ({own}no positional word naming one) the command runs itself; its "
                        f"positional words are then {overrides} overrides")
        if run:
            sub.add_parser(run[0], help=run[1], add_help=False)
        parser._flywheel_actions = True
        return sub

    @staticmethod
    def add(parser: argparse.ArgumentParser, *, broker: bool = False, workdir: bool = False,
            mlflow: bool = False, ray: bool = False, seed: bool = False, config: bool = False,
            metrics: bool = False) -> None:
        g = parser.add_argument_group("common options")
        if broker:
            g.add_argument("--broker", metavar="URL", default=None,
                           help="MQTT broker, mqtt://user:pass@host:port or mqtts://... "
                                "(default: an embedded broker where the command can start one)")
        if workdir:
            g.add_argument("--workdir", default=DEFAULT_WORKDIR, type=_workdir,
                           help=f"where the lake, MLflow database and artifacts live (default {DEFAULT_WORKDIR})")
        if mlflow:
            g.add_argument("--mlflow-uri", default=None,
                           help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db)")
        if ray:
            g.add_argument("--ray-address", default=None,
                           help="existing Ray cluster (e.g. ray://head:10001 or auto), or local for a Ray of this "
                                "command's own; default: the cluster in $RAY_ADDRESS, else a local Ray")
        if seed:
            g.add_argument("--seed", type=int, default=0, help="random seed (plant, splits, training)")
        if metrics:
            g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                           help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (0: any free port; "
                                "default: none)")
        if config:
            g.add_argument("--config", metavar="FILE", default=None,
                           help="YAML config file, sections as top-level keys (a campaign file works)")
            if not getattr(parser, "_flywheel_actions", False):   # with actions, the positionals are theirs
                g.add_argument("overrides", nargs="*", metavar="section.key=value",
                               help="config overrides, nested keys dotted (e.g. train.epochs=2)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flywheel",
        description="Industrial deployment data flywheel: factory -> MQTT -> Ray -> LoRA -> serve -> factory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  flywheel demo\n  flywheel broker --port 1884\n"
               "  flywheel sim --scenario demo --speed max --duration 1d --broker mqtt://127.0.0.1:1884\n"
               "  flywheel train --dataset ds-1 train.epochs=2 train.lora.rank=16\n"
               "  flywheel serve rollback\n"
               "  flywheel report --workdir .flywheel\n\n"
               "config overrides are section.key=value everywhere (train.epochs=2, serve.poll_s=5, "
               "bridge.threshold=0.3);\na campaign's own keys need no section (flywheel run ... turns=3).",
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


def ctrl_c_in_the_background() -> None:
    """Ctrl-C stops every command as it does in a terminal, also one a script starts in the background
    (``cmd &``, with or without ``nohup``): such a process starts with SIGINT ignored and Python then
    installs no KeyboardInterrupt handler (long-running commands set theirs again with
    ``stop_on_signals``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    from flywheel.base.usage import no_usage_reports

    no_usage_reports()   # before any library that reports is imported
    quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        print("flywheel: error: name a command (see flywheel --help)", file=sys.stderr)
        return 2
    ctrl_c_in_the_background()
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
    except OSError as exc:
        # a file or folder the command could not read or write: its name and the reason on one line
        # (commands check the folders they write up front; this is the net under them)
        if exc.filename is None or args.verbose:
            raise
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        print(f"flywheel {args.command}: {exc.strerror or exc}: {where} (flywheel -v {args.command} ... shows "
              "where it happened)", file=sys.stderr)
        return 1
    except Exception as exc:  # an MLflow server's refusal is a message, not a traceback
        from flywheel.base.tracking import error_message

        message = error_message(exc)
        if message is None:
            raise
        print(f"flywheel {args.command}: {one_line(message)}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``flywheel`` command: :func:`main`, then exit with its code without the interpreter's
    last garbage collection.

    A process that imported MLflow, Ray, pyarrow and (for LoRA) torch holds millions of objects,
    and the collection Python runs while it shuts down walks all of them: 1.5 s after a tiny
    tree campaign had printed its last line (measured in benchmarks/RESULTS.md). Everything the
    command writes is written and closed before :func:`main` returns, and the exit handlers
    (``atexit``: logging, MLflow, Ray) still run; only objects caught in reference cycles keep
    their memory until the process is gone. :func:`main` itself, which tests and other Python
    code call in their own process, leaves the collector alone."""
    import gc

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()   # the final collection skips every object alive now
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
