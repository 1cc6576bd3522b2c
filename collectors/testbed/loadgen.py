"""The open-loop load generator of the testbed, run by the supervisor as its own process.

Requests arrive as a Poisson process whose rate follows the current load curve, and each is
sent on schedule whatever the latency of the ones before (open loop), round-robin over the
ready replicas of the entry service. It serves on 127.0.0.1:

- `GET /metrics`: `loadgen_requests_total{code}` (HTTP status, or `timeout`, `error` for a
  failed connection, `dropped` beyond `load_max_in_flight`), `loadgen_offered_rps` and the
  latency histogram `loadgen_request_duration_seconds` as the client sees it.
- `GET /load`, `POST /load {"curve": spec | null}`: the curve; a new curve starts at t = 0.
- `POST /control {"endpoints": {entry: [urls]}}`: the entry's ready replicas (from the supervisor).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from collectors.errors import KubeworldError
from collectors.testbed._proc import (
    die_with_parent,
    loopback_socket,
    setup_child_logging,
    stop_on_signals,
)
from collectors.testbed.config import TestbedConfig
from collectors.testbed.load import LoadCurve, curve_from_spec
from collectors.testbed.replica import LATENCY_BUCKETS_S

_IDLE_POLL_S = 0.1
_MAX_CATCH_UP_S = 1.0


class LoadGenerator:
    """Sends requests to the entry service at the rate of a load curve."""

    def __init__(self, cfg: TestbedConfig) -> None:
        self.cfg = cfg
        self.curve: LoadCurve | None = None if cfg.load is None else curve_from_spec(cfg.load)
        self.curve_t0 = time.time()
        self.urls: list[str] = []
        self._rr = itertools.count()
        self._seq = 0  # newest control state applied; older ones arriving late are ignored
        self.in_flight = 0
        self.started = False  # whether the entry service has been ready once
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "loadgen_requests_total", "Requests sent, by outcome.", ["code"], registry=self.registry
        )
        self.offered = Gauge(
            "loadgen_offered_rps", "Request rate of the load curve now.", registry=self.registry
        )
        self.latency = Histogram(
            "loadgen_request_duration_seconds",
            "Time from sending a request to its answer, as the client sees it.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def rate_now(self) -> float:
        if self.curve is None or not self.started:
            return 0.0
        return self.curve.rate_at(time.time() - self.curve_t0)

    async def run(self) -> None:
        """Schedule arrivals for ever (cancel the task to stop)."""
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.load_timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
            skip_auto_headers=["User-Agent"],
        )
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        try:
            while True:
                rate = self.rate_now()
                self.offered.set(rate)
                if rate <= 0:
                    await asyncio.sleep(_IDLE_POLL_S)
                    next_t = loop.time()
                    continue
                next_t = max(next_t + random.expovariate(rate), loop.time() - _MAX_CATCH_UP_S)
                delay = next_t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._fire()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self.session.close()

    def _fire(self) -> None:
        if self.in_flight >= self.cfg.load_max_in_flight:
            self.requests.labels("dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        if not self.urls:  # no ready replica: what an ingress without backends answers
            self.requests.labels("503").inc()
            return
        url = self.urls[next(self._rr) % len(self.urls)]
        self.in_flight += 1
        t0 = time.perf_counter()
        try:
            async with self.session.get(url) as resp:
                await resp.read()
                code = str(resp.status)
            self.latency.observe(time.perf_counter() - t0)
        except TimeoutError:
            code = "timeout"
        except aiohttp.ClientError:
            code = "error"
        finally:
            self.in_flight -= 1
        self.requests.labels(code).inc()

    def curve_state(self) -> dict:
        return {
            "curve": None if self.curve is None else self.curve.to_dict(),
            "t_s": time.time() - self.curve_t0,
            "rate_rps": self.rate_now(),
        }

    async def get_load(self, request: web.Request) -> web.Response:
        return web.json_response(self.curve_state())

    async def post_load(self, request: web.Request) -> web.Response:
        spec = (await request.json()).get("curve")
        try:
            self.curve = None if spec is None else curve_from_spec(spec)
        except KubeworldError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.curve_t0 = time.time()
        return web.json_response(self.curve_state())

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("seq", 0) < self._seq:
            return web.json_response({"ok": False, "stale": True})
        self._seq = body.get("seq", 0)
        urls = list(body.get("endpoints", {}).get(self.cfg.services[0].name, []))
        if urls and not self.started:
            self.started = True  # the first curve starts when the entry is first ready
            self.curve_t0 = time.time()
        self.urls = urls
        return web.json_response({"ok": True})

    async def metrics(self, request: web.Request) -> web.Response:
        self.offered.set(self.rate_now())
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


async def serve(cfg: TestbedConfig) -> None:
    """Run the generator and its HTTP server until SIGTERM or SIGINT."""
    gen = LoadGenerator(cfg)
    app = web.Application()
    app.router.add_get("/metrics", gen.metrics)
    app.router.add_get("/load", gen.get_load)
    app.router.add_post("/load", gen.post_load)
    app.router.add_post("/control", gen.control)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = loopback_socket()
    await web.SockSite(runner, sock).start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)

    stop = asyncio.Event()
    stop_on_signals(asyncio.get_running_loop(), stop)
    sender = asyncio.get_running_loop().create_task(gen.run())
    await stop.wait()
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file of the TestbedConfig")
    parser.add_argument("--parent", type=int, required=True, help="pid of the supervisor")
    args, _ = parser.parse_known_args()
    die_with_parent(args.parent)
    setup_child_logging("loadgen")
    disable_created_metrics()
    with open(args.config) as f:
        cfg = TestbedConfig.from_dict(json.load(f))
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
