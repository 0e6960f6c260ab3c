"""The project's error base: one class every flywheel error derives from, caught once by the CLI.

Each package keeps its own short hierarchy (``ContractError``, ``DatasetError``,
``ServeError``, ...); all of them also derive from :class:`FlywheelError`, so the
``flywheel`` command catches them in one place and prints one line on stderr that names the
problem and the fix.  ``exit_code`` says how the command ends: 2 for usage and configuration
errors (the user can fix the command line or the config), 1 for runtime failures.

    try:
        ...
    except FlywheelError as exc:
        print(f"flywheel train: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
"""

from __future__ import annotations


class FlywheelError(Exception):
    """Base of every error the stack raises on purpose; the message names the problem and the fix."""

    exit_code = 1


class UsageError(FlywheelError):
    """A command line that cannot run (missing or contradictory arguments)."""

    exit_code = 2


def one_line(exc: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined with '; ')."""
    parts = [p.strip() for p in str(exc).splitlines() if p.strip()]
    return "; ".join(parts) or type(exc).__name__
