"""Starting and stopping the serve app: the stack's waits against Ray Serve's own.

    python benchmarks/bench_serve_stop.py [--repeats 4]

One local Ray; one LoRA adapter on the packaged MiniLM registered in a temp MLflow; the app
``serve.app.bind_app`` builds for it.  Each round starts and stops it both ways, in turn:

* Ray Serve's own (the baseline): ``serve.run`` and ``serve.delete``, which look at the app's
  status once a second until it is RUNNING, or gone;
* the stack's (``serve.handle``): ``serve.run_many(..., wait_for_applications_running=False)``
  then ``wait_until_running``, and ``delete_app``: the same calls, looking every 50 ms.

Both return once the app is RUNNING, or gone from ``serve.status()`` (its replica stopped).
Prints the median start and stop of each and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=4, help="rounds (medians over these)")
    args = ap.parse_args()

    from ray import serve as ray_serve

    from bench_serve import make_adapter, register
    from flywheel.base.rayinit import init_ray
    from serve import ServeConfig, start_serving
    from serve.app import bind_app
    from serve.handle import delete_app, wait_until_running

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-stop-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    register(uri, work, make_adapter(work / "adapter", seed=0))
    cfg = ServeConfig(app_name="bench-stop", route_prefix="/bench-stop", poll_s=0, num_cpus_per_replica=0)
    name = cfg.app_name

    def ray_start(app):
        ray_serve.run(app, name=name, route_prefix=cfg.route_prefix)

    def stack_start(app):
        ray_serve.run_many([ray_serve.RunTarget(app, name=name, route_prefix=cfg.route_prefix)],
                           wait_for_applications_running=False)
        wait_until_running(name, time.monotonic() + 120)

    ways = {"Ray Serve's": (ray_start, lambda: ray_serve.delete(name)),
            "the stack's": (stack_start, lambda: delete_app(name))}
    starts: dict[str, list[float]] = {k: [] for k in ways}
    stops: dict[str, list[float]] = {k: [] for k in ways}
    start_serving(uri, "fault-detector", "champion", cfg).shutdown()   # Serve's controller and proxy up
    for r in range(args.repeats):
        for kind, (start, stop) in ways.items():
            app = bind_app(uri, "fault-detector", "champion", cfg)
            t0 = time.perf_counter()
            start(app)
            t1 = time.perf_counter()
            stop()
            t2 = time.perf_counter()
            assert name not in ray_serve.status().applications
            starts[kind].append(t1 - t0)
            stops[kind].append(t2 - t1)
            print(f"round {r + 1}/{args.repeats} {kind:12s} start {t1 - t0:5.2f} s, stop {t2 - t1:5.2f} s", flush=True)

    base_start, base_stop = (statistics.median(x["Ray Serve's"]) for x in (starts, stops))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; medians of {args.repeats}\n")
    print("| waits | start, s (runs) | median | vs Ray's | stop, s (runs) | median | vs Ray's |")
    print("|---|---|---|---|---|---|---|")
    for kind in ways:
        a, b = statistics.median(starts[kind]), statistics.median(stops[kind])
        print(f"| {kind} | {', '.join(f'{t:.2f}' for t in starts[kind])} | **{a:.2f}** | {a / base_start:.2f} | "
              f"{', '.join(f'{t:.2f}' for t in stops[kind])} | **{b:.2f}** | {b / base_stop:.2f} |")


if __name__ == "__main__":
    main()
