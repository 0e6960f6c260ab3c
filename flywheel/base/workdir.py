"""The working directory: one object that names every place the stack keeps state.

Every CLI takes ``--workdir`` (default ``.flywheel``); everything below it is named here
and nowhere else::

    <workdir>/lake/                  the data lake (raw/, deadletter/, aborted/, datasets/)
    <workdir>/lake/datasets/<ID>/    dataset snapshots
    <workdir>/mlflow.db              MLflow tracking + registry (SQLite) unless --mlflow-uri
    <workdir>/checkpoints/           training checkpoints (resume after a kill)
    <workdir>/campaigns/<name>/      a campaign's state.json and plant states
    <workdir>/reports/<name>/        report.md and the PNG plots
    <workdir>/broker/                the embedded broker's config and persistence

    wd = Workdir(".flywheel")
    wd.lake_uri, wd.mlflow_uri, wd.dataset("ds-0123456789ab"), wd.campaign("demo")

``lake`` and ``mlflow`` may point elsewhere (an ``s3://`` lake, an MLflow server); the
other places always live under the root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from flywheel.base.config import ConfigError
from flywheel.base.snapshot import child_uri

DEFAULT_WORKDIR = ".flywheel"


@dataclass(frozen=True)
class Workdir:
    root: Path
    lake_override: str | None = None
    mlflow_override: str | None = None

    def __init__(self, root: str | os.PathLike = DEFAULT_WORKDIR, *, lake: str | None = None,
                 mlflow_uri: str | None = None):
        object.__setattr__(self, "root", Path(root).resolve())
        object.__setattr__(self, "lake_override", lake or None)
        object.__setattr__(self, "mlflow_override", mlflow_uri or None)

    @property
    def lake_uri(self) -> str:
        """The lake: ``--lake`` when given (a path or ``s3://bucket/prefix``), else ``<workdir>/lake``."""
        return self.lake_override or str(self.root / "lake")

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking URI: ``--mlflow-uri`` when given, else ``sqlite:///<workdir>/mlflow.db``."""
        return self.mlflow_override or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def datasets(self) -> str:
        """Where dataset snapshots live (under the lake, so an ``s3://`` lake keeps them too)."""
        return child_uri(self.lake_uri, "datasets")

    def dataset(self, dataset_id: str) -> str:
        """A snapshot's path or URI (``s3://bucket/lake/datasets/ds-1?endpoint_override=...``)."""
        return child_uri(self.lake_uri, "datasets", dataset_id)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def campaigns(self) -> Path:
        return self.root / "campaigns"

    def campaign(self, name: str) -> Path:
        return self.campaigns / check_campaign_name(name)

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, name: str) -> Path:
        return self.reports / name

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def keys(self) -> Path:
        """The signing key pair (``signing.key``, ``signing.pub``; ``flywheel keys init``)."""
        return self.root / "keys"


def writable_folder(path: str | os.PathLike, option: str) -> Path:
    """Make the folder ``path`` (parents too) if it is missing and return it; a
    :class:`~flywheel.base.config.ConfigError` naming ``option`` (``--workdir``, ``--lake``, ...),
    the reason and the fix when it is a file or cannot be made.

    Commands that write call this before they start anything (a broker, Ray, a plant), so a folder
    that cannot be made ends them at once with one line instead of a traceback halfway through."""
    from flywheel.base.config import ConfigError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {p} is a file, not a folder: name a folder (it is made if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {p}: cannot make this folder ({exc.strerror or exc}); name a folder you can "
                          "write (it is made if missing)") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {p}: no permission to write in this folder; name a folder you can write")
    return p


def check_campaign_name(name: str, what: str = "campaign name") -> str:
    """``name`` as a campaign's name: it names a folder under ``campaigns/`` and the MLflow
    experiment ``flywheel-<name>``, so nothing that leaves that folder (``..``, ``a/b``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"{what} should be 1-64 of [A-Za-z0-9_.-], starting with a letter or digit, got {name!r}")
    return name
