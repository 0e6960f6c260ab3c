"""Ray Serve app vs in-process inference of the same model; hot swap under load.

    python benchmarks/bench_serve.py            # full: 5 runs per measurement
    python benchmarks/bench_serve.py --quick    # ~1-2 min smoke run: 3 short runs
    python benchmarks/bench_serve.py --ingress direct   # serve.ingress=direct: the replica's own port

Baseline, measured in the same run on the same machine: the same adapter on the same
base model in this process (serve.adapters.AdapterPool, the code each replica runs),
same batch sizes, same torch thread count.  The loopback load generator runs in this
process too (threads with keep-alive HTTP connections).

* latency: one window per request, one request at a time -> p50/p99; overhead = Serve
  p50 - in-process p50 (target <= 5 ms).  The two are paired: each Serve request is
  followed by one in-process forward of the same window, so both see the same machine
  (a shared VM's speed drifts by 20-30% over minutes, more than the overhead measured);
  the median of the per-pair differences is printed too.  Also GET /health: the floor any
  request pays for the HTTP hop into the replica on this machine.
* throughput: windows/s with B windows per request (2 concurrent clients keep the
  pipeline full) and with 16 clients sending one window each (dynamic batching), vs the
  in-process forward of the same batch size (target >= 0.8x).
* hot swap under load: 4 clients send requests while the champion alias moves and the
  app is refreshed; swap duration (refresh call, and until the first answer from the new
  version) and failed requests (target 0).

Medians of the runs; measurements interleave Serve and in-process so machine noise hits both.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

TORCH_THREADS = 1

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")



def make_adapter(out_dir: Path, seed: int) -> Path:
    """A fresh LoRA adapter (untrained: serving cost does not depend on the weights' values)."""
    import torch

    from finetune.model import LoraSettings, add_lora, load_base, write_adapter_meta

    torch.manual_seed(seed)
    model, _ = load_base("minilm")
    model = add_lora(model, LoraSettings(rank=8))
    model.save_pretrained(out_dir)
    write_adapter_meta(out_dir, base_model="minilm")
    return out_dir


def register(uri: str, work: Path, adapter_dir: Path, alias: str = "champion") -> str:
    from finetune import registry
    from flywheel.base import tracking
    from finetune.pyfunc import save_pyfunc

    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "bench-serve", uri)
    run_id = client.create_run(exp).info.run_id
    d = Path(tempfile.mkdtemp(dir=work)) / "model"
    save_pyfunc(adapter_dir, d)
    client.log_artifacts(run_id, str(d), "model")
    client.set_terminated(run_id)
    v = registry.register_version(uri, "fault-detector", run_id, "model", {}).version
    registry.set_alias(uri, "fault-detector", alias, v)
    return v


def window_texts(n: int) -> list[str]:
    from flywheel.base.features import render

    out = []
    for i in range(n):
        rows = [{"vibration_mm_s": 2.0 + 0.01 * ((i * 7 + j) % 50), "bearing_temp_k": 330.0 + (i % 9),
                 "discharge_pressure_bar": 6.0 - 0.02 * (i % 11), "motor_current_a": 20.0 + 0.1 * j}
                for j in range(10)]
        out.append(render("pump", rows))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ----------------------------------------------------------------------------- measurements
def latency_paired(url: str, pool, name: str, text: str, n: int) -> tuple[list[float], list[float], list[float]]:
    """Serve request, in-process forward, GET /health, in turn, ``n`` times: three latency lists."""
    from serve.client import ServeClient

    c = ServeClient(url)
    body = [{"text": text}]
    for _ in range(5):
        c.predict(body)
        pool.predict([text], [name])
    serve_s, inproc_s, health_s = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        c.predict(body)
        t1 = time.perf_counter()
        pool.predict([text], [name])
        t2 = time.perf_counter()
        c.health()
        t3 = time.perf_counter()
        serve_s.append(t1 - t0)
        inproc_s.append(t2 - t1)
        health_s.append(t3 - t2)
    return serve_s, inproc_s, health_s


def latency_serve(url: str, text: str, n: int) -> list[float]:
    from serve.client import ServeClient

    c = ServeClient(url)
    c.predict([{"text": text}])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.predict([{"text": text}])
        out.append(time.perf_counter() - t0)
    return out


def load(url: str, texts: list[str], per_request: int, clients: int, duration_s: float,
         on_version=None, until: threading.Event | None = None) -> dict:
    """Closed-loop load: ``clients`` threads, each sending ``per_request`` windows per request,
    for ``duration_s`` (or, with ``until``, until that event is set)."""
    from serve.client import ServeClient

    stop = threading.Event()
    done = [0] * clients
    lat: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []

    def worker(i: int) -> None:
        c = ServeClient(url)
        body = [{"text": texts[(i * per_request + k) % len(texts)]} for k in range(per_request)]
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                out = c.predict(body)
            except Exception as exc:  # noqa: BLE001 - counted: the benchmark reports failures
                failures.append(repr(exc))
                continue
            lat[i].append(time.perf_counter() - t0)
            done[i] += per_request
            if on_version is not None:
                on_version(out["model_version"], time.perf_counter())

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if until is not None:
        until.wait()
    else:
        time.sleep(duration_s)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = [x for xs in lat for x in xs]
    return {"windows_per_s": sum(done) / wall, "failures": failures, "p50": pct(all_lat, 0.5) if all_lat else 0,
            "p99": pct(all_lat, 0.99) if all_lat else 0}


def inproc_rate(pool, name: str, texts: list[str], batch: int, duration_s: float) -> float:
    n = 0
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < duration_s:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        pool.predict(chunk, [name] * batch)
        n += batch
        i += batch
    return n / (time.perf_counter() - t0)


def swap_under_load(h, uri: str, work: Path, adapter_dir: Path, texts: list[str], duration_s: float) -> dict:
    first_new: dict = {}
    target: dict = {}

    def on_version(v: str, t: float) -> None:
        if target.get("v") == v and "t" not in first_new:
            first_new["t"] = t

    result: dict = {}
    finished = threading.Event()

    def run_load():
        result.update(load(h.url, texts, 1, 4, 0, on_version, until=finished))

    target["v"] = register(uri, work, adapter_dir)     # the alias moves; the app has not looked yet
    th = threading.Thread(target=run_load)
    th.start()
    time.sleep(duration_s / 2)
    t0 = time.perf_counter()
    got = h.refresh()
    refresh_s = time.perf_counter() - t0
    time.sleep(duration_s / 2)
    finished.set()
    th.join()
    assert got == target["v"], f"swap did not happen: serving {got}, expected {target['v']}"
    return {"refresh_s": refresh_s, "to_first_new_s": first_new.get("t", float("nan")) - t0,
            "failures": len(result["failures"]), "p99_during": result["p99"], "windows_per_s": result["windows_per_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 short runs (about 1-2 minutes on an idle machine)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                    help="serve.ingress of both apps: proxy (Ray Serve's HTTP proxy, the default) or direct (each "
                         "replica's own HTTP port; Ray starts with RAY_SERVE_ENABLE_DIRECT_INGRESS=1)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads on both sides (default 1: on 2 shared cores more threads only contend)")
    args = ap.parse_args()
    global TORCH_THREADS
    TORCH_THREADS = args.torch_threads
    runs = args.runs or (3 if args.quick else 5)
    dur = 1.5 if args.quick else 5.0
    n_lat = 40 if args.quick else 300

    import ray
    import torch

    from serve import ServeConfig, start_serving
    from serve.adapters import AdapterPool
    from serve.handle import prepare_local_ray
    from serve.source import Resolved

    torch.set_num_threads(TORCH_THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    t_setup = time.perf_counter()
    a = make_adapter(work / "a", 0)
    b = make_adapter(work / "b", 1)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    register(uri, work, a)
    cfg = ServeConfig(app_name="bench-serve", route_prefix="/bench", poll_s=0, torch_threads=TORCH_THREADS,
                      max_batch_size=64, num_cpus_per_replica=0.5, ingress=args.ingress)
    prepare_local_ray(cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    h = start_serving(uri, "fault-detector", "champion", cfg)
    # The same app with Ray Serve's @serve.batch instead of the continuous batcher, for comparison.
    h_ray = start_serving(uri, "fault-detector", "champion",
                          ServeConfig(**{**cfg.__dict__, "app_name": "bench-serve-ray", "route_prefix": "/bench-ray",
                                         "batching": "ray"}))
    url, url_ray = h.url, h_ray.url
    print(f"ingress {args.ingress}: {url}, {url_ray}", flush=True)
    pool = AdapterPool(device="cpu", torch_threads=TORCH_THREADS)   # the baseline: the replica's own code
    pool.install("default", Resolved("fault-detector", "champion", "1", None), str(a))
    name = pool.slot("default").peft_name
    texts = window_texts(512)
    print(f"set-up (2 adapters, register, Ray, deploy) {time.perf_counter() - t_setup:.1f}s", flush=True)

    res: dict[str, list] = {}

    def add(k, v):
        res.setdefault(k, []).append(v)

    batches = (16, 64)
    for r in range(runs):
        ls, li, lh = latency_paired(url, pool, name, texts[0], n_lat)
        add("lat_health_p50", pct(lh, .5))
        add("lat_pair_diff_p50", statistics.median(x - y for x, y in zip(ls, li)))
        add("lat_serve_p50", pct(ls, .5)); add("lat_serve_p99", pct(ls, .99))
        add("lat_inproc_p50", pct(li, .5)); add("lat_inproc_p99", pct(li, .99))
        for bsz in batches:
            s = load(url, texts, bsz, 2, dur)
            add(f"thr_serve_{bsz}", s["windows_per_s"]); add("failures", len(s["failures"]))
            add(f"thr_inproc_{bsz}", inproc_rate(pool, name, texts, bsz, dur))
        before = h.status()
        s = load(url, texts, 1, 16, dur)
        after = h.status()
        add("dyn_mean_batch", (after["batched_windows"] - before["batched_windows"]) /
            max(1, after["batches"] - before["batches"]))
        add("thr_serve_dyn", s["windows_per_s"]); add("failures", len(s["failures"]))
        add("dyn_p50", s["p50"]); add("dyn_p99", s["p99"])
        before = h_ray.status()
        s = load(url_ray, texts, 1, 16, dur)
        after = h_ray.status()
        add("ray_dyn_mean_batch", (after["batched_windows"] - before["batched_windows"]) /
            max(1, after["batches"] - before["batches"]))
        add("thr_ray_dyn", s["windows_per_s"]); add("failures", len(s["failures"]))
        add("ray_lat_p50", pct(latency_serve(url_ray, texts[0], n_lat // 2), .5))
        print(f"run {r + 1}/{runs}: p50 serve {ls and pct(ls, .5) * 1e3:.1f} ms vs in-process "
              f"{pct(li, .5) * 1e3:.1f} ms; batch 64: {res['thr_serve_64'][-1]:.0f} vs "
              f"{res['thr_inproc_64'][-1]:.0f} windows/s", flush=True)
    swaps = []
    for r in range(runs):
        swaps.append(swap_under_load(h, uri, work, b if r % 2 == 0 else a, texts, dur))
        print(f"swap {r + 1}/{runs}: refresh {swaps[-1]['refresh_s']:.2f}s, failures {swaps[-1]['failures']}",
              flush=True)
    h.shutdown()
    h_ray.shutdown()

    med = {k: statistics.median(v) for k, v in res.items()}
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    load1 = os.getloadavg()[0]
    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch threads {TORCH_THREADS}, load average at end {load1:.1f}; median of {runs} runs; "
          f"ingress {args.ingress}, batch_wait_ms {cfg.batch_wait_ms:g}")
    print(f"latency, 1 window/request: Serve p50 {ms(med['lat_serve_p50'])} p99 {ms(med['lat_serve_p99'])} | "
          f"in-process p50 {ms(med['lat_inproc_p50'])} p99 {ms(med['lat_inproc_p99'])} | "
          f"overhead p50 {ms(med['lat_serve_p50'] - med['lat_inproc_p50'])} (target <= 5 ms; median of the "
          f"paired differences {ms(med['lat_pair_diff_p50'])})")
    print(f"  of which Ray Serve's own HTTP round trip (GET /health, no model, "
          f"{'direct to the replica' if args.ingress == 'direct' else 'through the proxy'}): "
          f"p50 {ms(med['lat_health_p50'])}")
    for bsz in batches:
        ratio = med[f"thr_serve_{bsz}"] / med[f"thr_inproc_{bsz}"]
        print(f"throughput, {bsz} windows/request: Serve {med[f'thr_serve_{bsz}']:.0f} windows/s | in-process "
              f"{med[f'thr_inproc_{bsz}']:.0f} windows/s | ratio {ratio:.2f} (target >= 0.8)")
    print(f"dynamic batching, 16 clients x 1 window: Serve {med['thr_serve_dyn']:.0f} windows/s "
          f"(p50 {ms(med['dyn_p50'])}, p99 {ms(med['dyn_p99'])}, mean batch {med['dyn_mean_batch']:.1f} windows) "
          f"| ratio vs in-process batch 16: "
          f"{med['thr_serve_dyn'] / med['thr_inproc_16']:.2f}")
    print(f"  same load on Ray's @serve.batch: {med['thr_ray_dyn']:.0f} windows/s (mean batch "
          f"{med['ray_dyn_mean_batch']:.1f} windows); its 1-window p50 {ms(med['ray_lat_p50'])}")
    print(f"failed requests under load: {sum(res['failures'])}")
    sm = lambda k: statistics.median(s[k] for s in swaps)  # noqa: E731
    print(f"hot swap under load (4 clients): refresh {sm('refresh_s'):.2f}s, first answer from the new version "
          f"{sm('to_first_new_s'):.2f}s after the refresh began, p99 during the run {ms(sm('p99_during'))}, "
          f"failed requests {sum(s['failures'] for s in swaps)} (target 0)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
