"""The HTTP floor under the serve latency target: what a request costs before any model runs.

    python benchmarks/bench_serve_floor.py [--runs 3] [--requests 300] [--quick]

One no-op endpoint (``GET /health`` returning ``{"ok": true}``, FastAPI, as in serve/api.py),
reached over loopback with a keep-alive ``requests.Session``, one request at a time, three ways,
each in its own fresh process, runs interleaved:

* **uvicorn**: the FastAPI app in plain uvicorn, no Ray: the baseline, the web framework's own cost;
* **serve-proxy**: the same endpoint as a Ray Serve deployment behind Ray Serve's HTTP proxy
  (what ``flywheel serve`` runs: client -> proxy actor -> replica actor);
* **serve-direct**: Ray Serve with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (an experimental flag in
  Ray 2.60): the replica listens for HTTP itself and the proxy hop is gone.

The serve target is p50 overhead <= 5 ms over in-process inference; this shows how much of that
budget each way of reaching a Ray Serve replica spends on a request that does nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

MODES = ("uvicorn", "serve-proxy", "serve-direct")


def _app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    return app


def _measure(url: str, n: int) -> list[float]:
    import requests

    s = requests.Session()
    deadline = time.monotonic() + 120
    while True:  # the server may still be binding
        try:
            if s.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/health never answered")
        time.sleep(0.2)
    for _ in range(20):  # warm-up
        s.get(f"{url}/health", timeout=5)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = s.get(f"{url}/health", timeout=5)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200
    return out


def child(mode: str, n: int) -> None:
    """Run one mode in this (fresh) process; print one line: ``RESULT p50_ms p99_ms``."""
    from flywheel.base.broker import free_port

    port = free_port()
    if mode == "uvicorn":
        import threading

        import uvicorn

        server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        lat = _measure(f"http://127.0.0.1:{port}", n)
        server.should_exit = True
    else:
        if mode == "serve-direct":   # what serve.ingress=direct sets before flywheel starts Ray
            from serve.handle import DIRECT_INGRESS_ENV

            os.environ.update(DIRECT_INGRESS_ENV)
        import ray
        from ray import serve

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        app = _app()

        @serve.deployment
        @serve.ingress(app)
        class Floor:
            pass

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Floor.bind(), name="floor", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        if mode == "serve-direct":  # the replica's own port, found as serve.ingress=direct finds it
            from serve.handle import direct_ingress_url

            url = direct_ingress_url("floor", "", "127.0.0.1")
        lat = _measure(url, n)
        serve.shutdown()
        ray.shutdown()
    lat.sort()
    print(f"RESULT {statistics.median(lat) * 1e3:.3f} {lat[int(0.99 * (len(lat) - 1))] * 1e3:.3f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per mode (default 3)")
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per run (default 300)")
    ap.add_argument("--quick", action="store_true", help="1 run x 100 requests (smoke-check the benchmark)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.requests = 1, 100
    if args.child:
        child(args.child, args.requests)
        return 0
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for run in range(args.runs):
        for mode in MODES:  # interleaved: machine noise hits every mode alike
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--requests", str(args.requests)],
                                  capture_output=True, text=True, env=env, timeout=600)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(f"{mode} run {run + 1} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            p50, p99 = map(float, line.split()[1:])
            results[mode].append((p50, p99))
            print(f"run {run + 1}/{args.runs} {mode:13s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)
    base = statistics.median(p for p, _ in results["uvicorn"])
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}; "
          f"median of {args.runs} runs x {args.requests} sequential GET /health")
    print("| way in | p50 | p99 | p50 over plain uvicorn |\n|---|---|---|---|")
    for mode in MODES:
        p50 = statistics.median(p for p, _ in results[mode])
        p99 = statistics.median(q for _, q in results[mode])
        print(f"| {mode} | {p50:.2f} ms | {p99:.2f} ms | {p50 - base:+.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
