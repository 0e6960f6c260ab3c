"""Ray Serve's proxy on a port taken between choosing it and binding it: the stack starts Serve
again on another port instead of failing the command (seen when Ray's own processes, starting
beside it, took the port the stack had just found free); a port the user set and that is taken is
refused with one line naming the fix.

Runs in its own process with its own local Ray (the session's Ray already has Serve started)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.serial]   # a local Ray and Serve of its own

SCRIPT = textwrap.dedent("""
    import socket, urllib.request
    import serve.handle as handle
    from flywheel.base.rayinit import init_ray
    from serve import ServeConfig

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real, picks = handle.free_port, []

    def first_a_taken_port(host="127.0.0.1"):
        picks.append(busy if not picks else real(host))
        return picks[-1]

    handle.free_port = first_a_taken_port
    init_ray(num_cpus=1, include_dashboard=False)
    port = handle._ensure_serve_http(ServeConfig())
    assert picks[0] == busy and port == picks[1] != busy, picks
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=30).read()
    except urllib.error.HTTPError as exc:   # the proxy answered (no app deployed yet)
        print("proxy answered", exc.code)
    print("serve on", port, "after", busy, "was taken")

    # a port the user set is never changed: taken, it is named with its fix
    from ray import serve as ray_serve
    from serve.handle import ServeError
    ray_serve.shutdown()
    try:
        handle._ensure_serve_http(ServeConfig(http_port=busy))
    except ServeError as exc:
        print("refused:", exc)
    else:
        raise AssertionError(f"serve started on the taken port {busy}")
""")


def test_serve_starts_on_another_port_when_the_chosen_one_was_taken():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}    # a Ray of its own
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2], env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "after" in r.stdout and "could not bind port" in r.stderr
    refused = next(line for line in r.stdout.splitlines() if line.startswith("refused:"))
    assert "(in use): choose another serve.http_port, or leave it unset" in refused
