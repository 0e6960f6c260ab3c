"""Real servers for the infra tests: an `mlflow server` process and a throwaway PostgreSQL.

Both run on free loopback ports in private temp dirs and are stopped by process group (we
started the group, so nothing else is touched).  Loaded from the tests by path (pytest runs
with --import-mode=importlib, so tests/ is not a package).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: Start-up can take long on a busy 2-core box (the CLI and its uvicorn worker each import
#: MLflow); the limit only bounds a hang, a healthy start returns as soon as /health answers.
MLFLOW_START_TIMEOUT_S = 300


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # our own session: the CLI and its uvicorn worker
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class MlflowServer:
    url: str
    artifacts_dir: Path
    log_path: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        _stop_group(self.proc)

    def processes(self) -> list[str]:
        """The command lines of the server's process group (the CLI, its uvicorn worker, and
        whatever else they started)."""
        out = []
        for name in os.listdir("/proc"):
            try:
                if name.isdigit() and os.getpgid(int(name)) == self.proc.pid:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        out.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            except OSError:
                continue
        return out


def start_mlflow_server(root: Path, backend_store_uri: str,
                        basic_auth: tuple[str, str] | None = None) -> MlflowServer:
    """``mlflow server`` with ``backend_store_uri`` and proxied artifacts under ``root``.

    ``basic_auth=(user, password)`` starts MLflow's own ``basic-auth`` app (``mlflow[auth]``):
    that user is the admin, everybody else has no permission, and every API call without
    valid credentials gets 401.  Its user store lives in ``root``.
    """
    from flywheel.base.broker import free_port

    port = free_port()
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = root / "mlflow-server.log"
    if backend_store_uri.startswith("sqlite:///"):   # as the stack's own new stores start
        from flywheel.base.tracking import seed_sqlite_store

        seed_sqlite_store(backend_store_uri)
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", str(artifacts), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # MLflow 3 starts a job runner (huey) beside the server unless told not to; the stack runs no
    # MLflow jobs, and the runner cost ~30 s of CPU in the server's first minute (infra/README.md).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if basic_auth is not None:
        user, password = basic_auth
        ini = root / "basic_auth.ini"
        ini.write_text("[mlflow]\n"
                       "default_permission = NO_PERMISSIONS\n"
                       f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
                       f"admin_username = {user}\n"
                       "auth_cache_ttl_seconds = 60\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
        cmd += ["--app-name", "basic-auth"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=root, env=env)
    server = MlflowServer(f"http://127.0.0.1:{port}", artifacts, log_path, proc)
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer /health within {MLFLOW_START_TIMEOUT_S}s "
                       f"(exit code {proc.poll()}):\n{server.log()[-3000:]}")


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<v>/bin with initdb and postgres, or PATH's, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    root: Path
    port: int
    user: str
    password: str
    proc: subprocess.Popen

    def uri(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        _stop_group(self.proc, sig=signal.SIGINT)  # "fast" shutdown: a throwaway cluster needs no checkpoint


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: drop to the 'postgres' user (Debian's package makes it)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as") from None
    return ["runuser", "-u", "postgres", "--"]


def start_postgres(bin_dir: Path) -> Postgres:
    """A throwaway cluster in a temp dir on a free port, password auth, sockets in the dir."""
    from flywheel.base.broker import free_port

    root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    data = root / "data"
    password = secrets.token_urlsafe(12)
    (root / "pw").write_text(password + "\n")
    prefix = _as_postgres_user()
    if prefix:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chown(root / "pw", pw.pw_uid, pw.pw_gid)
    subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow",
                    "--auth=scram-sha-256", f"--pwfile={root / 'pw'}", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    (root / "pw").unlink()
    port = free_port()
    log = open(root / "postgres.log", "wb")
    proc = subprocess.Popen([*prefix, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                             "-k", str(root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    pg = Postgres(root, port, "mlflow", password, proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ready = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                               capture_output=True)
        if ready.returncode == 0:  # accepting connections, not just listening
            return pg
        time.sleep(0.1)
    pg.stop()
    raise RuntimeError(f"postgres did not start: {(root / 'postgres.log').read_text(errors='replace')[-2000:]}")
