"""MLflow plumbing for a training turn: batched metrics, params, dataset lineage, runs.

Everything goes through an explicit ``MlflowClient(tracking_uri)`` - no global tracking
URI is set - so the loop, the CLI and tests can point at different stores in one process.

* ``MetricBatcher`` buffers per-step metrics and sends them with one ``log_batch`` call
  every ``every`` steps (one SQLite transaction instead of one per value); it measures
  the time it spends so the benchmark can show the overhead.
* ``log_dataset`` records the snapshot as the run's input (``mlflow.data``), once.
* ``open_run`` uses the caller's run or makes one in experiment ``flywheel-<campaign>``
  with its artifacts beside a SQLite store (never ``./mlruns`` in the working directory).
* ``seed_sqlite_store`` starts a new SQLite store as a copy of an empty one MLflow migrated
  once, instead of MLflow running its ~50 schema migrations for every new workdir.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from flywheel.base.errors import FlywheelError

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def plain_uri(tracking_uri: str) -> str:
    """The tracking URI without ``user:password@``, the credentials moved to MLflow's own variables.

    MLflow prints its tracking URI ("View run ... at http://...") and stores it in run
    metadata, so credentials written into the URI would end up in logs.  An ``http(s)``
    URI that carries them sets ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
    (MLflow's documented basic-auth settings) in this process, unless they are set
    already, and the URI MLflow sees is the one without them.  Every process that talks
    to MLflow (the loop, Serve replicas, training workers) goes through here, so the
    URI handed between them may carry the credentials.

    A ``sqlite:///`` store that does not exist yet is created here from the migrated empty
    store (:func:`seed_sqlite_store`).
    """
    import os
    from urllib.parse import unquote, urlsplit, urlunsplit

    if tracking_uri.startswith("sqlite:///"):
        seed_sqlite_store(tracking_uri)
        check_sqlite_store(tracking_uri)
    try:
        parts = urlsplit(tracking_uri)
        user, password = parts.username, parts.password
    except (ValueError, TypeError):
        return tracking_uri
    if parts.scheme not in ("http", "https") or not (user or password):
        return tracking_uri
    if user:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


#: Where the migrated empty MLflow store is kept (see :func:`seed_sqlite_store`); empty: nowhere.
CACHE_ENV = "FLYWHEEL_CACHE_DIR"


def cache_dir() -> Path | None:
    """The user's cache for the stack: ``$FLYWHEEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/flywheel``,
    else ``~/.cache/flywheel``; None when ``FLYWHEEL_CACHE_DIR`` is set empty (no cache)."""
    import os

    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flywheel"


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a plain ``sqlite:///PATH`` URI (None with query options or in memory)."""
    path = tracking_uri[len("sqlite:///"):]
    if not path or "?" in path or path.startswith(":memory:"):
        return None
    return Path(path)


def _is_empty_store(path: Path, revision: str) -> bool:
    """Whether ``path`` is an SQLite file holding MLflow's tables at ``revision`` and no experiment."""
    import sqlite3
    from urllib.request import pathname2url

    try:
        with contextlib.closing(sqlite3.connect(f"file:{pathname2url(str(path))}?mode=ro", uri=True)) as con:
            version = con.execute("SELECT version_num FROM alembic_version").fetchall()
            experiments = con.execute("SELECT count(*) FROM experiments").fetchone()[0]
    except sqlite3.Error:
        return False
    return version == [(revision,)] and experiments == 0


def _empty_store(cache: Path) -> Path:
    """The cache's empty store for the installed MLflow's schema revision, built by MLflow's own
    migrations on first use (and again if the file there is not such a store).

    Built under a temporary name and renamed into place, so a process that finds the file finds
    it whole; two processes building it at once each rename a complete copy."""
    import os
    import tempfile

    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    revision = db_utils._get_latest_schema_revision()
    template = cache / f"mlflow-empty-{revision}.db"
    if _is_empty_store(template, revision):
        return template
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{template.name}.", suffix=".partial", dir=cache)
    os.close(fd)
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            db_utils._initialize_tables(engine)   # MLflow's tables and every migration; no experiment yet
            db_utils._verify_schema(engine)
        finally:
            engine.dispose()
        os.replace(tmp, template)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return template


def seed_sqlite_store(tracking_uri: str) -> bool:
    """Create the SQLite store of ``tracking_uri`` as a copy of the cache's migrated empty store,
    when its file does not exist yet and its folder does; True when it did.

    MLflow builds a new SQLite store by running every schema migration it has (1-2 s of CPU
    here), once per new workdir: many times over in a test suite or a sweep of campaigns.  The
    copy holds MLflow's tables at the latest revision of the installed MLflow and nothing else:
    MLflow still checks the revision and adds its Default experiment when it opens the store,
    as it does for one it built.  The empty store is built once per MLflow schema revision in
    :func:`cache_dir` (``FLYWHEEL_CACHE_DIR=`` turns this off).  The copy goes in under a
    temporary name and is linked into place only if no file is there, so a store another
    process created meanwhile is never replaced; on any failure MLflow builds the store itself,
    as it would without this.
    """
    import logging
    import os
    import secrets
    import shutil

    db = _sqlite_path(tracking_uri)
    if db is None or db.exists() or not db.parent.is_dir():
        return False
    tmp = None
    try:
        cache = cache_dir()
        if cache is None:
            return False
        template = _empty_store(cache)
        # a new file (the umask's mode, as MLflow's own) under a name no other seeding uses
        tmp = db.parent / f".{db.name}.{os.getpid()}.{secrets.token_hex(4)}.seed"
        shutil.copyfile(template, tmp)
        os.link(tmp, db)          # fails if the store appeared meanwhile: that one is kept
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # noqa: BLE001 - an optimisation: MLflow builds the store itself
        logging.getLogger(__name__).debug("not seeding %s from the cache (%s): MLflow builds it", db, exc)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class TrackingStoreError(FlywheelError, RuntimeError):
    """The file of a ``sqlite:///`` tracking URI is not a SQLite database, or (for a command that
    only reads the registry) is not there."""


def store_exists(tracking_uri: str) -> bool:
    """False only for a ``sqlite:///`` store whose file is not there yet (a new workdir's): nothing
    to ask it, and no need to import MLflow to find that out."""
    db = _sqlite_path(tracking_uri) if tracking_uri.startswith("sqlite:///") else None
    return db is None or db.exists()


def existing_store(tracking_uri: str) -> str:
    """``tracking_uri`` for a command that only reads the registry (``flywheel serve``, ``bom``,
    ``rollback``): a ``sqlite:///`` store that is not there raises :class:`TrackingStoreError`
    naming it and the fix, where MLflow would make an empty store (and its workdir) only to find
    no model in it, after a screen of its own start-up lines."""
    if not store_exists(tracking_uri):
        raise TrackingStoreError(f"no MLflow store at {_sqlite_path(tracking_uri)}, so no model is registered "
                                 "there: train one in that workdir first (`flywheel train`, or `flywheel demo`), "
                                 "or name the workdir or store that holds it (--workdir, --mlflow-uri)")
    return tracking_uri


def check_sqlite_store(tracking_uri: str) -> None:
    """Raise :class:`TrackingStoreError` when the file of a ``sqlite:///`` URI exists but does not open
    as a SQLite database (damaged, cut short, another file under that name), naming it and the fix:
    MLflow's own error is a SQLAlchemy traceback from its first query.  (One read of the schema
    table, under a millisecond.)  A store that is locked or cannot be opened at all is left to
    MLflow, which says why."""
    import sqlite3
    from urllib.request import pathname2url

    db = _sqlite_path(tracking_uri)
    if db is None or not db.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{pathname2url(str(db))}?mode=ro", uri=True)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        return
    except sqlite3.DatabaseError as exc:
        raise TrackingStoreError(f"the MLflow store {db} is not a readable SQLite database ({exc}); it holds "
                                 "the runs and the model registry of its workdir's campaigns: put back a good "
                                 "copy of it, or run in a new --workdir") from None


#: MLflow's error codes for HTTP 401 and 403 from a tracking server with authentication.
AUTH_ERROR_CODES = {"UNAUTHENTICATED": "the server did not accept the credentials",
                    "PERMISSION_DENIED": "this user has no permission for that experiment or model"}
CREDENTIALS_HINT = ("give the user and password in the URI (http://USER:PASSWORD@host:port) or in "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")


class TrackingAuthError(FlywheelError, PermissionError):
    """The tracking server refused this process's credentials (401) or their rights (403)."""


def auth_error(exc: BaseException, tracking_uri: str) -> TrackingAuthError | None:
    """``exc`` as a ``TrackingAuthError`` that says what to do, or None when it is not one.

    Callers that read "not found" into an MLflow error (no champion yet, no such version)
    check this first: with wrong credentials nothing is "not found", the server said no.
    """
    code = getattr(exc, "error_code", None)
    if code not in AUTH_ERROR_CODES:
        return None
    from flywheel.base.mqtt import redact_url

    return TrackingAuthError(f"MLflow at {redact_url(tracking_uri)} refused the request "
                             f"({code}: {AUTH_ERROR_CODES[code]}); {CREDENTIALS_HINT}")


def error_message(exc: BaseException) -> str | None:
    """A one-line message for an MLflow error reaching the CLI (credentials redacted), else None."""
    import re
    import sys

    if isinstance(exc, TrackingAuthError):
        return str(exc)
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None or not isinstance(exc, mlflow_exceptions.MlflowException):
        return None
    text = re.sub(r"//[^/@\s]+:[^/@\s]*@", "//***:***@", str(exc)).strip()
    hint = AUTH_ERROR_CODES.get(getattr(exc, "error_code", ""))
    if hint:
        text += f" ({hint}: {CREDENTIALS_HINT})"
    return f"MLflow error: {text}"


def client_for(tracking_uri: str):
    from mlflow import MlflowClient

    uri = plain_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class MetricBatcher:
    """``report(step, metrics)`` callback that logs to MLflow in batches."""

    def __init__(self, tracking_uri: str, run_id: str, every: int = 10):
        self.client = client_for(tracking_uri)
        self.run_id = run_id
        self.every = max(1, every)
        self.buffer: list = []
        self.seconds = 0.0  # time spent building and sending metrics: the logging overhead
        self.calls = 0

    def __call__(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        t = time.perf_counter()
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        self.seconds += time.perf_counter() - t
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        t = time.perf_counter()
        for i in range(0, len(self.buffer), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=self.buffer[i:i + MAX_BATCH], synchronous=True)
            self.calls += 1
        self.buffer.clear()
        self.seconds += time.perf_counter() - t


def log_metrics(client, run_id: str, metrics: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, metrics=items[i:i + MAX_BATCH], synchronous=True)


def log_params(client, run_id: str, params: dict) -> None:
    """Log params not yet on the run (MLflow refuses to change a logged param's value)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)


def flatten(prefix: str, obj, leaf: Callable[[Any], Any] | None = None) -> dict:
    """Nested dicts as one flat dict of dotted keys (MLflow params): ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    ``leaf`` writes each value that is not a dict; by default lists and tuples are joined
    with commas and everything else is kept as it is.  An empty dict leaves no key.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v, leaf))
        return out
    if leaf is not None:
        return {prefix: leaf(obj)}
    if isinstance(obj, (list, tuple)):
        return {prefix: ",".join(map(str, obj))}
    return {prefix: obj}


def _is_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_dataset(client, run_id: str, snapshot, context: str = "train") -> bool:
    """Record the snapshot's split as a run input unless the run already has it; True if logged."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    df = snapshot.train if context == "train" else snapshot.eval
    # MLflow digests the split's rows itself, so train and eval of one snapshot stay distinct
    # inputs; the snapshot's content hash is in the run's params (data.content_hash).
    with warnings.catch_warnings():
        # MLflow registers its local-file dataset source twice and warns that a path is
        # "ambiguous" between the two identical candidates; harmless.
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_pandas(df, source=str(snapshot.path), targets="label", name=snapshot.dataset_id)
    for existing in client.get_run(run_id).inputs.dataset_inputs:
        ds = existing.dataset
        ctx = {t.key: t.value for t in existing.tags}.get("mlflow.data.context")
        if ds.name == dataset.name and ds.digest == dataset.digest and ctx == context:
            return False
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", context)])])
    return True


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file; other stores decide themselves."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name))


def open_run(client, tracking_uri: str, run_id: str | None, campaign: str | None, turn: int | None,
             tags: dict | None = None) -> tuple[str, bool]:
    """(run_id, created): the caller's run, or a new run in ``flywheel-<campaign>``."""
    if run_id:
        client.get_run(run_id)  # raises a clear MlflowException when it does not exist
        return run_id, False
    exp_id = ensure_experiment(client, f"flywheel-{campaign or 'train'}", tracking_uri)
    all_tags = {"flywheel.stage": "train", **(tags or {})}
    if turn is not None:
        all_tags["flywheel.turn"] = str(turn)
    run = client.create_run(exp_id, tags=all_tags, run_name=f"train-turn-{turn}" if turn is not None else "train")
    return run.info.run_id, True


def log_artifacts(client, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    client.log_artifacts(run_id, str(local_dir), artifact_path)


def metric_history(client, run_id: str, keys: Iterable[str]) -> dict:
    return {k: [m.value for m in client.get_metric_history(run_id, k)] for k in keys}
