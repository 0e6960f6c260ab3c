"""A real multi-process Ray cluster on this machine, for tests that drive the CLI against it.

``RayCluster`` runs ``ray start --head --block`` and ``ray start --address=... --block``
(a second raylet: a separate "node" on the same machine) as child processes, each in
its own session, so teardown can end exactly the processes it started - never a bare
``ray stop``, which would end every Ray on the machine.

Every port is a free one (several Ray clusters may run here side by side), and the
session lives in a short temp dir (Unix socket paths must stay under ~107 bytes).
Token authentication (on by default for new clusters in Ray 2.60) is switched off with
``RAY_AUTH_MODE=disabled`` in the cluster's and its clients' environment: the cluster
listens on 127.0.0.1 only and lives for one test module.

    with RayCluster(num_cpus=2) as rc:
        subprocess.run(["flywheel", "train", "--ray-address", rc.address, ...], env=rc.env())
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's ray and flywheel scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def free_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` free ports, distinct from each other and from ``taken`` (which gets them too).

    Each socket stays bound until all are picked: one closed at a time, the kernel may hand the
    same port out twice, and ``ray start`` then refuses to start ("Ray component
    dashboard_agent_grpc is trying to use a port number ... that is used by other components")."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken:
                taken.add(port)
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


class RayCluster:
    """A head and ``workers`` worker nodes, each started with ``ray start --block``."""

    def __init__(self, num_cpus: int = 2, workers: int = 1, start_timeout_s: float = 180.0,
                 extra_env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.extra_env = dict(extra_env or {})
        self.workers = workers
        self.start_timeout_s = start_timeout_s
        self.taken: set[int] = set()      # every port handed to this cluster's nodes, never twice
        self.port = free_ports(1, self.taken)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def env(self, **extra: str) -> dict:
        """The environment for the cluster and for every client of it."""
        env = dict(os.environ)
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MLFLOW_ENABLE_ASYNC_LOGGING="false",
                   COLUMNS="200", PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        env.update(self.extra_env)
        env.update(extra)
        return env

    # -- lifecycle ------------------------------------------------------------------------------

    def _ports(self, *names: str) -> list[str]:
        return [f"--{n}={port}" for n, port in zip(names, free_ports(len(names), self.taken))]

    def _common(self) -> list[str]:
        # Fixed defaults (dashboard 8265, agent 52365, ...) would collide with other clusters here.
        return [f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1",
                "--disable-usage-stats", "--block",
                *self._ports("node-manager-port", "object-manager-port", "metrics-export-port",
                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")]

    def _launch(self, name: str, args: list[str], attempts: int = 1) -> None:
        for attempt in range(1, attempts + 1):
            log = Path(self.temp_dir) / f"{name}-{attempt}.log"
            with open(log, "wb") as out:
                # Own session: the whole node (gcs, raylet, workers) is one process group we can end.
                p = subprocess.Popen([str(BIN / "ray"), "start", *args, *self._common()], stdout=out,
                                     stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
            self.procs.append((name, p, log))
            deadline = time.monotonic() + self.start_timeout_s
            while "Ray runtime started" not in log.read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            else:
                return
            # On a busy machine a joining node can miss the GCS's 30 s startup deadline; try again.
            self._end(p)
            if attempt == attempts:
                raise RuntimeError(f"`ray start` ({name}) did not start (exit {p.poll()}); its log {log}:\n"
                                   + log.read_text(errors="replace")[-3000:])

    @staticmethod
    def _end(p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:  # a throwaway node: no need to wait out Ray's graceful drain (it took 30 s and more)
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of that node's process group
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def start(self) -> "RayCluster":
        try:
            self._launch("head", ["--head", f"--port={self.port}", "--include-dashboard=true",
                                  "--dashboard-host=127.0.0.1",
                                  *self._ports("dashboard-port", "ray-client-server-port")])
            for i in range(self.workers):
                self._launch(f"worker{i}", [f"--address={self.address}"], attempts=3)
            self.wait_nodes(1 + self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End the processes this cluster started: SIGTERM (``--block`` stops its node), then SIGKILL."""
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _ in reversed(self.procs):
            self._end(p)
        self._kill_stragglers()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_stragglers(self) -> None:
        """Processes that left the group but still name our session dir (ours by construction)."""
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid != os.getpid() and any(self.temp_dir in a for a in (proc.info["cmdline"] or [])):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def report(self, tail: int = 12) -> str:
        """What a failed test needs to tell a dead or silent node from a slow one: whether each
        ``ray start`` process still runs, the end of its log, the processes Ray saw exit, and the
        end of the GCS's and each raylet's log with their error lines (the session directory goes
        with ``stop``, so this is read while the cluster is still there)."""
        out = []
        for name, p, log in self.procs:
            state = "running" if p.poll() is None else f"exited with {p.returncode}"
            out.append(f"== {name} (`ray start`, pid {p.pid}): {state}; the end of {log.name}:")
            out += _tail(log, tail)
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        for name in ("ray_process_exit.log", "gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err",
                     "raylet.1.out", "raylet.1.err"):
            lines = _tail(logs / name, 2000)
            if not lines:
                continue
            errors = [x for x in lines if re.match(r"\[[^\]]* [EF] \d+", x)]
            out.append(f"== {name}: its last error lines, then its end:")
            out += errors[-tail:] + ["  ..."] + lines[-tail:]
        return "\n".join(out)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries (in a subprocess: the pytest process keeps its own local Ray) -------------------

    def python(self, code: str, timeout_s: float = 120.0):
        """Run ``code`` connected to this cluster in a fresh interpreter; return the JSON it prints last."""
        script = "import json, ray\nray.init(address=%r, include_dashboard=False, log_to_driver=False)\n" \
                 % self.address + textwrap.dedent(code)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=self.env(),
                           timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"query against {self.address} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def nodes(self) -> list[dict]:
        return self.python("""
            print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0),
                               "head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes()]))
        """)

    def wait_nodes(self, n: int, timeout_s: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [x for x in self.nodes() if x["alive"]]
            if len(alive) >= n:
                return alive
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(alive)} of {n} Ray nodes joined {self.address} in {timeout_s:.0f}s")
            time.sleep(1.0)

    def actors(self, class_name: str) -> list[dict]:
        """Actors whose class is ``class_name`` (alive or dead; nested classes match by their last name),
        from the cluster's state API, with their node ids."""
        return self.python(f"""
            from ray.util.state import list_actors
            rows = list_actors(address={self.address!r}, detail=True, limit=10000, raise_on_missing_output=False)
            print(json.dumps([{{"id": a.actor_id, "node": a.node_id, "state": a.state, "pid": a.pid,
                                "class_name": a.class_name}} for a in rows
                               if a.class_name.rsplit(".", 1)[-1] == {class_name!r}]))
        """)
