"""One replica of one testbed service: an HTTP server on 127.0.0.1 with a bounded worker pool.

Run by the supervisor as `python -m collectors.testbed.replica --config C --service S --pod P
--net N --parent PID`. It prints `PORT <port>` on stdout once it listens, then serves:

- `GET /`: one request of the service. It waits for one of `workers` slots (or answers 503 when
  `queue_limit` requests are already waiting), burns `cpu_per_request_s` of CPU, waits a gamma
  distributed service time, then calls every service in `calls` concurrently, holding its slot
  until they answer. A failed call makes the answer 502 (504 on a timeout).
- `GET /metrics`: `http_requests_total{service,code}` and `http_request_duration_seconds`.
- `POST /control`: endpoints of the called services and the faults to apply (from the supervisor).
- `GET /state`: the faults applied now, leaked bytes, whether a stress thread runs (for tests).

Network bytes of the application's traffic are counted here (per-process counters do not exist
on loopback) and published to the supervisor through a 16-byte memory-mapped file.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import mmap
import os
import random
import struct
import time

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from collectors.testbed._proc import (
    die_with_parent,
    loopback_socket,
    setup_child_logging,
    stop_on_signals,
)
from collectors.testbed.config import ServiceSpec, TestbedConfig
from collectors.testbed.fault_effects import Fault, ReplicaFaults

# Histogram buckets of request latency, seconds: fine from 1 ms to 10 s.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1,
    0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0,
    5.0, 7.5, 10.0,
)  # fmt: skip
_DRAIN_S = 1.0  # seconds a stopping replica waits for its requests in flight
_GAMMA_SHAPE = 4.0  # service time coefficient of variation 0.5
_NET = struct.Struct("<QQ")  # rx bytes, tx bytes


class NetCounters:
    """Bytes received and sent by the replica's application traffic, shared through mmap."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _NET.size)
        self.rx = 0
        self.tx = 0

    def add(self, rx: int, tx: int) -> None:
        self.rx += rx
        self.tx += tx
        _NET.pack_into(self._map, 0, self.rx, self.tx)


def read_net_counters(path: str) -> tuple[int, int]:
    """(rx, tx) bytes from a replica's counter file; (0, 0) before it wrote any."""
    with open(path, "rb") as f:
        data = f.read(_NET.size)
    return _NET.unpack(data) if len(data) == _NET.size else (0, 0)


def request_bytes(request: web.BaseRequest) -> int:
    """Approximate bytes of a request on the wire: request line, headers and body."""
    head = sum(len(k) + len(v) + 4 for k, v in request.headers.items())
    return len(request.path_qs) + 16 + head + (request.content_length or 0)


def burn_cpu(cpu_s: float) -> None:
    """Spin on this thread for `cpu_s` seconds of its own CPU time."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


class Replica:
    """The request handling and state of one replica."""

    def __init__(self, cfg: TestbedConfig, spec: ServiceSpec, net: NetCounters) -> None:
        self.cfg = cfg
        self.spec = spec
        self.net = net
        self.slots = asyncio.Semaphore(spec.workers)
        self.waiting = 0
        self.endpoints: dict[str, list[str]] = {callee: [] for callee in spec.calls}
        self._rr = {callee: itertools.count() for callee in spec.calls}  # round robin
        self.in_flight = 0
        self._seq = 0  # newest control state applied; older ones arriving late are ignored
        self.faults = ReplicaFaults(cfg.memory_leak_rate_bytes_per_s, cfg.memory_leak_max_bytes)
        self.session: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "http_requests_total",
            "Requests served, by status code.",
            ["service", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from receiving a request to answering it.",
            ["service"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        for code in ("200", "500", "502", "503", "504"):
            self.requests.labels(spec.name, code)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.call_timeout_s)
        self.session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=0),
            skip_auto_headers=["User-Agent"],
        )

    async def handle(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        self.in_flight += 1
        try:
            code = await self._serve()
        finally:
            self.in_flight -= 1
        delay = self.faults.severity("network_delay") * self.cfg.network_delay_max_s
        if delay > 0:
            await asyncio.sleep(delay)
        response = web.Response(status=code, text="ok" if code == 200 else "error")
        self.net.add(request_bytes(request), 120 + len(response.text))
        self.requests.labels(self.spec.name, str(code)).inc()
        self.latency.labels(self.spec.name).observe(time.perf_counter() - t0)
        return response

    async def _serve(self) -> int:
        if self.waiting >= self.spec.queue_limit:
            return 503
        if random.random() < self.faults.severity("error"):
            return 500
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            burn_cpu(self.spec.cpu_per_request_s)
            mean_s = self.spec.service_time_s
            wait_s = random.gammavariate(_GAMMA_SHAPE, mean_s / _GAMMA_SHAPE) if mean_s > 0 else 0
            wait_s += self.faults.severity("latency") * self.cfg.latency_fault_max_s
            await asyncio.sleep(wait_s)
            codes = await asyncio.gather(*(self._call(c) for c in self.spec.calls))
        finally:
            self.slots.release()
        failed = [c for c in codes if c != 200]
        return 200 if not failed else (504 if 504 in failed else 502)

    async def _call(self, callee: str) -> int:
        delay = self.faults.severity("network_delay") * self.cfg.network_delay_max_s
        if delay > 0:
            await asyncio.sleep(delay)
        for _ in range(2):  # one retry on another replica when a connection fails
            urls = self.endpoints.get(callee) or []
            if not urls:
                return 503
            url = urls[next(self._rr[callee]) % len(urls)]
            try:
                async with self.session.get(url) as resp:
                    body = await resp.read()
                    self.net.add(120 + len(body), 80 + len(url))
                    return resp.status
            except TimeoutError:
                return 504
            except aiohttp.ClientError:
                continue
        return 502

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("seq", 0) < self._seq:
            return web.json_response({"ok": False, "stale": True})
        self._seq = body.get("seq", 0)
        if "endpoints" in body:
            self.endpoints = {c: list(body["endpoints"].get(c, [])) for c in self.spec.calls}
        if "faults" in body:
            self.faults.set([Fault(**f) for f in body["faults"]])
        return web.json_response({"ok": True})

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "service": self.spec.name,
                "faults": [f.to_dict() for f in self.faults.active()],
                "leaked_bytes": self.faults.leaked_bytes,
                "stress_running": self.faults.stress_running,
                "endpoints": self.endpoints,
                "waiting": self.waiting,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


async def serve(cfg: TestbedConfig, service: str, net_path: str) -> None:
    """Serve one replica of `service` until SIGTERM or SIGINT."""
    replica = Replica(cfg, cfg.spec(service), NetCounters(net_path))
    await replica.start()
    app = web.Application()
    app.router.add_get("/", replica.handle)
    app.router.add_get("/metrics", replica.metrics)
    app.router.add_post("/control", replica.control)
    app.router.add_get("/state", replica.state)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = loopback_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)

    stop = asyncio.Event()
    stop_on_signals(asyncio.get_running_loop(), stop)
    await stop.wait()
    # Like a pod on SIGTERM: stop accepting, let the requests in flight finish (briefly), exit.
    await site.stop()
    deadline = time.monotonic() + _DRAIN_S
    while replica.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file of the TestbedConfig")
    parser.add_argument("--service", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--net", required=True, help="file of the network byte counters")
    parser.add_argument("--parent", type=int, required=True, help="pid of the supervisor")
    args = parser.parse_args()
    die_with_parent(args.parent)
    setup_child_logging(args.pod)
    disable_created_metrics()
    with open(args.config) as f:
        cfg = TestbedConfig.from_dict(json.load(f))
    asyncio.run(serve(cfg, args.service, args.net))
    os._exit(0)  # without tearing down connections that are still open


if __name__ == "__main__":
    main()
