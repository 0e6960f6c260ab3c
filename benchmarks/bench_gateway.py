"""Benchmark the plant gateway against the protocol library's bare client, in the same run.

    python benchmarks/bench_gateway.py            # 5 rounds of each protocol (~2 minutes on 2 cores)
    python benchmarks/bench_gateway.py --quick    # 2 short rounds

1. Sparkplug B: the simulator's own byte stream (births, then a DDATA per telemetry message of
   the ``tiny`` plant) is published at QoS 0 (as Sparkplug data is) to a real Mosquitto as fast as
   paho can.  Two
   subscribers read it in the same run: the gateway (decode, seq checks, aliases, mapping,
   contract validation, publishing contract telemetry, which a third client receives) and a bare
   paho client that only parses each payload with protobuf.  Rate = DDATA messages / seconds from
   the first publish until the last message is through (the gateway: its last telemetry received).
2. OPC UA: the simulator's OPC UA server (asyncua) runs the plant at max speed; the gateway and a
   bare asyncua subscription (same nodes, same StatusValueTimestamp filter, a handler that keeps
   the values) read it in the same run.  Rate = samples / seconds from the first tick until the
   reader has every value (the gateway: its last telemetry received).  Server, gateway and bare
   client share this process.

Ratio = gateway rate / bare client rate, median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.base import contract  # noqa: E402
from flywheel.base import sparkplug as sp  # noqa: E402
from flywheel.base.broker import EmbeddedBroker  # noqa: E402
from flywheel.base.mqtt import connect, make_client  # noqa: E402

from factory_sim import Plant, load_scenario  # noqa: E402
from factory_sim.opcua_server import OpcUaPlantServer  # noqa: E402
from factory_sim.plant_tags import gateway_mapping  # noqa: E402
from factory_sim.sparkplug_edge import SparkplugPlant  # noqa: E402
from gateway import GatewayService, parse_mapping  # noqa: E402


class _Counter:
    def __init__(self):
        self.n = 0
        self.done = threading.Event()
        self.target = None
        self.t_end = None

    def hit(self, k: int = 1) -> None:
        self.n += k
        if self.target is not None and self.n >= self.target and not self.done.is_set():
            self.t_end = time.perf_counter()
            self.done.set()


def _telemetry_counter(url: str, root: str) -> tuple[object, _Counter]:
    ctr = _Counter()
    c = make_client(url, prefix="bench-gw-inbox", max_inflight=65535)
    c.on_message = lambda cl, u, m: ctr.hit()
    connect(c, url)
    c.subscribe(f"{root}/+/+/telemetry", 1)
    return c, ctr


class _Recorder:
    """Stands in for an edge node's MQTT client: keeps what the simulator would publish."""

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=0):
        self.sent.append((topic, payload))


def sparkplug_stream(plant_s: float, group: str) -> tuple[Plant, list[tuple[str, bytes]], int]:
    plant = Plant(load_scenario("tiny"), seed=0)
    link = SparkplugPlant(plant, "mqtt://127.0.0.1:1", group=group)
    rec = _Recorder()
    for e in link.edges.values():
        e.client, e.online = rec, True
        e.births()
    n = 0
    for _ in range(int(plant_s / plant.tick_s)):
        for msg in plant.step():
            if type(msg) is contract.Telemetry:
                link.edges[msg.line].data(msg)
                n += 1
    return plant, rec.sent, n


def sparkplug_round(url: str, plant_s: float, r: int) -> tuple[float, float]:
    group, root = f"bench{r}", f"benchsp{r}"
    plant, stream, n = sparkplug_stream(plant_s, group)
    mapping = gateway_mapping(plant, "sparkplug", group=group, topic_root=root)
    inbox, got = _telemetry_counter(url, root)
    svc = GatewayService(parse_mapping(mapping), url, component=f"bench-{group}").start()
    bare = _Counter()

    def on_bare(c, u, m):
        sp.decode(m.payload)
        if "/DDATA/" in m.topic:
            bare.hit()

    b = make_client(url, prefix="bench-gw-bare", max_inflight=65535)
    b.on_message = on_bare
    connect(b, url)
    b.subscribe(f"{sp.NAMESPACE}/{group}/#", 1)
    pub = make_client(url, prefix="bench-gw-pub", max_inflight=65535)
    connect(pub, url)
    time.sleep(0.5)
    bare.target = sum(1 for t, _ in stream if "/DDATA/" in t)
    got.target = n
    t0 = time.perf_counter()
    infos = [pub.publish(t, p, qos=0) for t, p in stream]     # QoS 0, as Sparkplug publishes data
    for i in infos:
        i.wait_for_publish(60)
    bare.done.wait(60)
    got.done.wait(60)
    if not (bare.done.is_set() and got.done.is_set()):
        print(f"  sparkplug round {r}: not everything arrived (bare {bare.n}/{bare.target}, gateway {got.n}/{got.target})")
    rates = (got.target / (got.t_end - t0) if got.t_end else float("nan"),
             bare.target / (bare.t_end - t0) if bare.t_end else float("nan"))
    svc.stop()
    for c in (inbox, b, pub):
        c.disconnect()
        c.loop_stop()
    return rates


class _BareHandler:
    def __init__(self, ctr: _Counter):
        self.ctr = ctr
        self.values = []

    def datachange_notification(self, node, val, data):
        dv = data.monitored_item.Value
        if dv.StatusCode.is_good():
            self.values.append((node.nodeid, dv.SourceTimestamp, val))
            self.ctr.hit()


def opcua_round(url: str, plant_s: float, r: int, port: int) -> tuple[float, float]:
    from asyncua import Client, ua

    root = f"benchopc{r}"
    srv = OpcUaPlantServer(Plant(load_scenario("tiny"), seed=r), port)
    srv.start()
    mapping = gateway_mapping(srv.plant, "opcua", endpoint=srv.endpoint, topic_root=root)
    inbox, got = _telemetry_counter(url, root)
    svc = GatewayService(parse_mapping(mapping), url, component=f"bench-opc{r}").start()
    while not svc.gateway.connected:
        time.sleep(0.05)
    bare = _Counter()
    nodes = [rd["node"] for m in mapping["machines"] for rd in m["readings"].values()] + \
            [m["seq"]["node"] for m in mapping["machines"]]
    ready, stop = threading.Event(), threading.Event()

    def bare_client():
        async def go():
            async with Client(srv.endpoint, timeout=10, watchdog_intervall=10) as c:
                sub = await c.create_subscription(100, _BareHandler(bare))
                flt = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
                await sub._subscribe([c.get_node(i) for i in nodes], ua.AttributeIds.Value, mfilter=flt, queuesize=0)
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
        asyncio.run(go())

    th = threading.Thread(target=bare_client, daemon=True)
    th.start()
    ready.wait(60)
    time.sleep(0.5)
    ref: list = []
    Plant(load_scenario("tiny"), seed=r).run(plant_s, sink=ref.append)
    tel = [m for m in ref if type(m) is contract.Telemetry]
    got.target = len(tel)
    bare.target = sum(len(m.readings) + 1 for m in tel)
    t0 = time.perf_counter()
    srv.run(plant_s)
    bare.done.wait(60)
    got.done.wait(60)
    if not (bare.done.is_set() and got.done.is_set()):
        print(f"  sparkplug round {r}: not everything arrived (bare {bare.n}/{bare.target}, gateway {got.n}/{got.target})")
    rates = (got.target / (got.t_end - t0) if got.t_end else float("nan"),
             len(tel) / (bare.t_end - t0) if bare.t_end else float("nan"))
    stop.set()
    th.join(10)
    svc.stop()
    srv.close()
    inbox.disconnect()
    inbox.loop_stop()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--port", type=int, default=48840, help="first OPC UA port (one per round)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rounds = args.rounds or (2 if args.quick else 5)
    sp_plant_s = (6 if args.quick else 48) * 3600.0
    opc_plant_s = (2 if args.quick else 12) * 3600.0
    broker = EmbeddedBroker(prefer="mosquitto")
    broker.start()
    out = {"sparkplug": [], "opcua": []}
    try:
        for r in range(rounds):
            out["sparkplug"].append(sparkplug_round(broker.url, sp_plant_s, r))
            out["opcua"].append(opcua_round(broker.url, opc_plant_s, r, args.port + r))
            print(f"round {r}: sparkplug gateway/bare {out['sparkplug'][-1][0]:,.0f}/{out['sparkplug'][-1][1]:,.0f} "
                  f"msg/s; opcua {out['opcua'][-1][0]:,.0f}/{out['opcua'][-1][1]:,.0f} samples/s", flush=True)
    finally:
        broker.close()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}, {date.today()}")
    for proto, rows in out.items():
        gw = statistics.median(g for g, _ in rows)
        bare = statistics.median(b for _, b in rows)
        ratio = statistics.median(g / b for g, b in rows)
        unit = "DDATA msg/s" if proto == "sparkplug" else "samples/s"
        print(f"{proto}: gateway median {gw:,.0f} {unit}, bare client median {bare:,.0f}, ratio median {ratio:.2f} "
              f"(rounds: {', '.join(f'{g / b:.2f}' for g, b in rows)})")


if __name__ == "__main__":
    main()
