"""``flywheel lineage``: which model ordered a machine's stop, trained on what, from which base model.

Reads the lake only (``flywheel.audit``: the documented DuckDB query of docs/architecture.md,
"The audit trail"); no MLflow, Ray or broker.
"""

from __future__ import annotations

import argparse


def register(sub, common) -> None:
    p = sub.add_parser(
        "lineage", help="the audit trail of a stop: command, model version, serving period, snapshots, base model",
        description="Find the maintain command that stopped --machine at or before --at and print its chain from "
                    "the lake alone: the command (risk vs threshold), the stop it caused, the model version that "
                    "sent it and where and when that version served, its training run, the snapshots it was "
                    "trained, calibrated and evaluated on with their content hashes, its base model (source, "
                    "sha256, licence) and its warm-start parents. The same query, in SQL for DuckDB, is in "
                    "docs/architecture.md, \"The audit trail\".",
        epilog="examples:\n  flywheel lineage --machine mill-01 --at 2024-10-05T13:20:00Z\n"
               "  flywheel lineage --machine pump-02 --at 1728134400 --workdir /tmp/fw-tiny\n"
               "  flywheel lineage --machine mill-01 --at 2024-10-05T13:20 --within 7200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", required=True, metavar="ID", help="the machine that stopped (as in the lake: mill-01)")
    p.add_argument("--at", required=True, metavar="TIME",
                   help="when it stopped (or any time after the command, up to --within later): plant time as the "
                        "lake stores it (epoch seconds, the `ts` column) or ISO-8601 (UTC when no zone is given)")
    p.add_argument("--within", type=float, default=None, metavar="SECONDS",
                   help="how much plant time before --at to search for the command (default 3600)")
    p.add_argument("--lake", default=None, help="the lake, when it is not <workdir>/lake")
    common.add(p, workdir=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from flywheel.audit import DEFAULT_WITHIN_S, LineageError, format_lineage, lineage, parse_time
    from flywheel.base.workdir import Workdir

    within = DEFAULT_WITHIN_S if args.within is None else args.within
    if not within > 0:
        raise LineageError(f"--within must be > 0 plant seconds, got {args.within}")
    at = parse_time(args.at)
    lake = Workdir(args.workdir, lake=args.lake).lake_uri
    print(format_lineage(lineage(lake, args.machine, at, within)))
    return 0
