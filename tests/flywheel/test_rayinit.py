"""init_ray keeps a command's SIGTERM handler: docker stop / kill must stop a command cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

SCRIPT = r"""
import os, signal, time
from flywheel.base.rayinit import init_ray

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
init_ray(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
import ray
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
    print("signal lost")
except KeyboardInterrupt:
    print("stopped cleanly")
finally:
    ray.shutdown()
"""


def test_a_sigterm_handler_set_before_ray_starts_still_runs_after_it():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # its own Ray, not a cluster
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "stopped cleanly" in done.stdout
    assert "SIGTERM received" not in out      # Ray's crash handler did not take the signal


BACKGROUND = r"""
import signal, sys, time
from flywheel.base.rayinit import restore_signals, stop_on_signals

assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN      # as a script's `cmd &` starts it
previous = stop_on_signals()
try:   # "ready" inside: the test signals as soon as it reads it, maybe before print returns
    print("ready", flush=True)
    time.sleep(60)
    print("signal lost", flush=True)
except KeyboardInterrupt:
    print("stopped cleanly", flush=True)
restore_signals(previous)
print("restored", signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_command_started_with_ctrl_c_ignored_still_stops_on_it(sig, in_the_background):
    """A long-running command (ingest, serve, a campaign) started in the background by a script
    inherits SIGINT as ignored; ``stop_on_signals`` makes Ctrl-C and SIGTERM stop it all the same."""
    import signal

    proc = subprocess.Popen(in_the_background([sys.executable, "-c", BACKGROUND]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.splitlines() == ["stopped cleanly", "restored True True"], out


def test_stop_children_ends_only_the_new_children():
    """A half-started Ray node's processes are children started during the failed try: the retry
    stops exactly those and leaves older children alone."""
    from flywheel.base.rayinit import children, stop_children

    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = children()
        assert old.pid in before
        # one child that ignores SIGTERM: it must still be gone, by SIGKILL after the grace
        new = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
               subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])]
        time.sleep(0.5)   # the second child has installed its handler
        fresh = children() - before
        assert fresh == {p.pid for p in new}
        stop_children(fresh, grace_s=1.0)
        assert children() & fresh == set()
        assert old.poll() is None
    finally:
        old.kill()
        old.wait()


def test_a_local_ray_gives_serves_proxy_time_to_start_on_a_busy_machine(ray_local):
    """Ray Serve kills a proxy not ready within 5 s; a local node started by init_ray passes its
    actors a longer limit (a value the user set wins)."""
    from flywheel.base.rayinit import SERVE_PATIENCE_ENV

    @ray_local.remote(num_cpus=0)
    def seen() -> dict:
        return {k: os.environ.get(k) for k in SERVE_PATIENCE_ENV}

    assert ray_local.get(seen.remote()) == {k: os.environ[k] for k in SERVE_PATIENCE_ENV}
    assert float(os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) > 5.0


def test_a_local_ray_reads_parquet_footers_with_one_actor_not_a_pool(ray_local, tmp_path):
    """Ray Data starts a pool of footer-reading actors (32 by default, each a worker process) at
    every Parquet read; on a local node started by init_ray one reads a local lake's footers."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flywheel.base.rayinit import LOCAL_DATA_ENV

    for i in range(4):
        pq.write_table(pa.table({"a": list(range(10))}), tmp_path / f"f{i}.parquet")

    def footer_readers() -> int:
        return sum(a["ActorClassName"] == "FooterReader" for a in ray_local._private.state.actors().values())

    before = footer_readers()
    ds = ray_local.data.read_parquet(sorted(glob.glob(str(tmp_path / "*.parquet"))), partitioning=None)
    assert sum(t.num_rows for t in ray_local.get(ds.select_columns(["a"]).to_arrow_refs())) == 40
    assert footer_readers() - before == 1
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == LOCAL_DATA_ENV["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"]


def test_importing_ray_builds_no_iri_grammar():
    """Every Ray process (driver, workers, agents, Serve replicas) imports jsonschema, which imports
    rfc3987-syntax when it is installed, and that builds a parser at import: ~1.9 s of CPU per
    process, 14 s instead of 6 s for ray.init on 2 cores. The project's dependencies leave it out
    (pyproject.toml); a dependency that brings it back fails here."""
    r = subprocess.run([sys.executable, "-c", "import sys, ray, jsonschema; "
                        "print(sorted(m for m in ('rfc3987_syntax', 'lark') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", (f"importing ray imported {r.stdout.strip()}: a dependency asks for "
                                      "jsonschema[format-nongpl] (rfc3987-syntax); name jsonschema's format "
                                      "checkers without it, as pyproject.toml does")


def test_ray_answers_while_its_gcs_runs(ray_local):
    """A stop asks Serve about its app only where the GCS still answers (a group's SIGTERM ends it:
    the resume chain's ``group@1`` run, tests/e2e/test_resume.py, is the other side)."""
    from flywheel.base.rayinit import ray_answers

    assert ray_answers()
    import ray

    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    assert host and int(port) > 0


STARTS = r"""
import json, os, sys
from flywheel.base.rayinit import names_cluster, starts_local_ray

out = []
for address, env in json.loads(sys.argv[1]):
    os.environ.pop("RAY_ADDRESS", None)
    if env is not None:
        os.environ["RAY_ADDRESS"] = env
    out.append([starts_local_ray(address), names_cluster(address)])
print(json.dumps([out, "ray" in sys.modules]))
"""
CASES = [  # (--ray-address, RAY_ADDRESS, starts a Ray of its own) as ray.init reads them
    (None, None, True), ("", None, True), (None, "", True), (None, "local", True), ("local", None, True),
    ("local", "10.0.0.1:6379", True),          # local: a Ray of its own, whatever the environment names
    (None, "10.0.0.1:6379", False), (None, "auto", False), ("auto", None, False),
    ("10.0.0.1:6379", None, False), ("ray://head:10001", "", False)]


def test_starts_local_ray_reads_an_address_as_ray_init_does_without_importing_ray():
    """The one answer every command (campaign, ingest, serve) uses to check its settings against
    the local CPUs before Ray starts, and training to choose Ray Train on a cluster: it must agree
    with what ``ray.init`` then does, and not pay for Ray's import to say so."""
    import json

    r = subprocess.run([sys.executable, "-c", STARTS, json.dumps([[a, e] for a, e, _ in CASES])],
                       capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 0, r.stderr[-2000:]
    answers, imported_ray = json.loads(r.stdout)
    assert answers == [[starts, not starts] for _, _, starts in CASES]
    assert imported_ray is False


def test_a_process_that_joined_ray_starts_no_other(ray_local):
    from flywheel.base.rayinit import starts_local_ray

    assert not starts_local_ray(None) and not starts_local_ray("local")
