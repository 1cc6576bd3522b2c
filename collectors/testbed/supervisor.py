"""The testbed's control plane: replicas, readiness, restarts, faults, metrics and its HTTP API.

Run by `Testbed` as `python -m collectors.testbed.supervisor --config C [--watch-stdin]`. It
prints one JSON line with its endpoints once it listens, keeps the desired replica count per
service, and exits (taking every replica and the load generator with it) on SIGTERM, SIGINT or,
with `--watch-stdin`, when its stdin closes (its owner died). Replicas die with it through
PR_SET_PDEATHSIG even when it is SIGKILLed.

HTTP API on 127.0.0.1 (JSON): `GET /replicas`, `POST /scale {"service","replicas"}`,
`POST /faults {"type","target","severity","duration_s"} -> {"id"}`, `DELETE /faults/<id>`,
`GET /faults` (active; `?all=1` adds ended ones with `ended_at`), `GET /services`, `GET /pods`,
`GET /load`, `POST /load {"curve"}`, `GET /sd` (Prometheus http_sd_configs targets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp
import psutil
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
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
from collectors.testbed.config import (
    JOB_APP,
    JOB_CADVISOR,
    JOB_KUBE_STATE,
    JOB_LOADGEN,
    JOB_NODE,
    NAMESPACE,
    NODE_NAME,
    TestbedConfig,
)
from collectors.testbed.exporters import (
    CadvisorCollector,
    KubeStateCollector,
    NodeCollector,
    PodView,
)
from collectors.testbed.faults import Fault, pods_to_kill, validate_fault

log = logging.getLogger("collectors.testbed.supervisor")

_RECONCILE_S = 0.5
_RESYNC_S = 5.0
_TERM_GRACE_S = 2.0
_PUSH_TIMEOUT_S = 2.0
_PORT_TIMEOUT_S = 30.0
_HOST = "127.0.0.1"


@dataclass(eq=False)
class Pod:
    """One replica: a process that is restarted in place (same name) when it dies."""

    name: str
    service: str
    net_path: str
    proc: asyncio.subprocess.Process | None = None
    port: int | None = None
    ready: bool = False
    deleted: bool = False
    restarts: int = 0
    hold_until: float = 0.0  # Unix time before which a restart is held off (pod_kill)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}/"

    def view(self) -> PodView:
        pid = self.proc.pid if self.running else None
        return PodView(self.name, self.service, pid, self.ready, self.restarts, self.net_path)


def _suffix(n: int) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=n))


class Supervisor:
    """Keeps the replicas, faults and load generator of one testbed."""

    def __init__(self, cfg: TestbedConfig, config_path: str, workdir: str) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.workdir = workdir
        self.services = cfg.service_names
        self.entry = self.services[0]
        self.desired = {s: cfg.replicas_at_start(s) for s in self.services}
        self.pods: dict[str, list[Pod]] = {s: [] for s in self.services}
        self._template = {s: _suffix(9) for s in self.services}  # like a ReplicaSet hash
        self.faults: dict[str, Fault] = {}
        self.history: list[dict] = []
        self._fault_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.stopping = False
        self.loadgen: asyncio.subprocess.Process | None = None
        self.loadgen_port: int | None = None
        self.ports: dict[str, int] = {}
        self.session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []

    # ---- pods -------------------------------------------------------------------------------

    def _new_pod(self, service: str) -> Pod:
        name = f"{service}-{self._template[service]}-{_suffix(5)}"
        pod = Pod(name, service, os.path.join(self.workdir, f"{name}.net"))
        pod.task = asyncio.get_running_loop().create_task(self._pod_life(pod))
        self.pods[service].append(pod)
        return pod

    async def _spawn(self, pod: Pod) -> bool:
        """Start the pod's process and learn its port; False if it did not come up."""
        with open(pod.net_path, "wb") as f:
            f.write(bytes(16))
        pod.port = None
        pod.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collectors.testbed.replica",
            "--config",
            self.config_path,
            "--service",
            pod.service,
            "--pod",
            pod.name,
            "--net",
            pod.net_path,
            "--parent",
            str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            line = await asyncio.wait_for(pod.proc.stdout.readline(), _PORT_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line.startswith(b"PORT "):
            log.warning("pod %s did not start (output %r)", pod.name, line)
            return False
        pod.port = int(line.split()[1])
        return True

    async def _pod_life(self, pod: Pod) -> None:
        """Start, watch and restart one pod until it is deleted or the supervisor stops."""
        try:
            while not (pod.deleted or self.stopping):
                t0 = time.monotonic()
                if await self._spawn(pod):
                    await asyncio.sleep(max(0.0, self.cfg.startup_delay_s - time.monotonic() + t0))
                    if pod.running and not (pod.deleted or self.stopping):
                        await self._push_to(pod, self._state_of(pod.service))
                        pod.ready = True
                        await self._endpoints_changed(pod.service)
                await pod.proc.wait()
                pod.ready = False
                if pod.deleted or self.stopping:
                    break
                log.info("pod %s exited with %s", pod.name, pod.proc.returncode)
                await self._endpoints_changed(pod.service)
                pod.restarts += 1
                restart_at = time.time() + self.cfg.restart_backoff_s
                while time.time() < max(restart_at, pod.hold_until) and not pod.deleted:
                    await asyncio.sleep(0.1)
        finally:
            if pod in self.pods[pod.service]:
                self.pods[pod.service].remove(pod)

    async def _delete_pod(self, pod: Pod) -> None:
        """Take the pod out of its endpoints, then stop its process (SIGTERM, then SIGKILL)."""
        pod.deleted = True
        was_ready, pod.ready = pod.ready, False
        if was_ready:
            await self._endpoints_changed(pod.service)
        await self._stop_process(pod.proc)

    async def _stop_process(self, proc: asyncio.subprocess.Process | None) -> None:
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _TERM_GRACE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def reconcile(self) -> None:
        """Create or delete pods until each service has its desired number."""
        for service in self.services:
            live = [p for p in self.pods[service] if not p.deleted]
            for _ in range(self.desired[service] - len(live)):
                self._new_pod(service)
            extra = len(live) - self.desired[service]
            if extra > 0:
                # not-ready pods first, then the newest
                order = sorted(live, key=lambda p: (p.ready, live.index(p)))
                for pod in order[:extra]:
                    asyncio.get_running_loop().create_task(self._delete_pod(pod))

    async def _reconcile_loop(self) -> None:
        last_resync = time.monotonic()
        while True:
            await self.reconcile()
            self._expire_faults()
            if time.monotonic() - last_resync > _RESYNC_S:
                last_resync = time.monotonic()
                await asyncio.gather(*(self._push_service(s) for s in self.services))
                await self._push_loadgen()
            await asyncio.sleep(_RECONCILE_S)

    # ---- state pushed to replicas -----------------------------------------------------------

    def ready_urls(self, service: str) -> list[str]:
        return [p.url for p in self.pods[service] if p.ready]

    def _state_of(self, service: str) -> dict:
        now = time.time()
        calls = self.cfg.spec(service).calls
        return {
            "seq": next(self._seq),
            "endpoints": {c: self.ready_urls(c) for c in calls},
            "faults": [
                f.to_dict() for f in self.faults.values() if f.target == service and f.active(now)
            ],
        }

    async def _push_to(self, pod: Pod, state: dict) -> None:
        if pod.port is None or not pod.running:
            return
        try:
            async with self.session.post(pod.url + "control", json=state) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("push to %s failed: %s", pod.name, exc)

    async def _push_service(self, service: str) -> None:
        state = self._state_of(service)
        await asyncio.gather(*(self._push_to(p, state) for p in self.pods[service] if p.port))

    async def _push_loadgen(self) -> None:
        if self.loadgen_port is None:
            return
        state = {"seq": next(self._seq), "endpoints": {self.entry: self.ready_urls(self.entry)}}
        try:
            url = f"http://{_HOST}:{self.loadgen_port}/control"
            async with self.session.post(url, json=state) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("push to loadgen failed: %s", exc)

    async def _endpoints_changed(self, service: str) -> None:
        callers = [s.name for s in self.cfg.services if service in s.calls]
        pushes = [self._push_service(c) for c in callers]
        if service == self.entry:
            pushes.append(self._push_loadgen())
        await asyncio.gather(*pushes)

    # ---- faults -----------------------------------------------------------------------------

    async def inject(self, fault_type: str, target: str, severity: float, duration_s: float):
        validate_fault(fault_type, target, severity, duration_s, self.services)
        now = time.time()
        fault = Fault(
            id=f"f{next(self._fault_ids)}-{_suffix(4)}",
            type=fault_type,
            target=target,
            severity=float(severity),
            duration_s=float(duration_s),
            started_at=now,
            deadline=now + float(duration_s),
        )
        self.faults[fault.id] = fault
        if fault_type == "pod_kill":
            self._kill_pods(fault)
        else:
            await self._push_service(target)
        log.info("fault %s %s on %s severity %.2f for %.1fs", fault.id, fault_type, target,
                 severity, duration_s)  # fmt: skip
        return fault

    def _kill_pods(self, fault: Fault) -> None:
        running = [p for p in self.pods[fault.target] if p.running and not p.deleted]
        running.sort(key=lambda p: not p.ready)
        for pod in running[: pods_to_kill(fault.severity, len(running))]:
            pod.hold_until = fault.deadline
            pod.proc.send_signal(signal.SIGKILL)

    async def rollback(self, fault_id: str) -> bool:
        fault = self.faults.pop(fault_id, None)
        if fault is None:
            return False
        self._end_fault(fault, time.time())
        if fault.type == "pod_kill":
            for pod in self.pods[fault.target]:
                pod.hold_until = 0.0
        else:
            await self._push_service(fault.target)
        return True

    def _end_fault(self, fault: Fault, ended_at: float) -> None:
        self.history.append({**fault.to_dict(), "ended_at": ended_at})

    def _expire_faults(self) -> None:
        now = time.time()
        for fault in [f for f in self.faults.values() if not f.active(now)]:
            del self.faults[fault.id]
            self._end_fault(fault, fault.deadline)
            if fault.type != "pod_kill":
                asyncio.get_running_loop().create_task(self._push_service(fault.target))

    # ---- metrics and discovery --------------------------------------------------------------

    def pod_views(self) -> list[PodView]:
        return [p.view() for s in self.services for p in self.pods[s] if not p.deleted]

    def scrape_targets(self) -> dict[str, list[str]]:
        pods = [p for s in self.services for p in self.pods[s] if p.running and p.port]
        return {
            JOB_APP: [f"{_HOST}:{p.port}" for p in pods],
            JOB_CADVISOR: [f"{_HOST}:{self.ports[JOB_CADVISOR]}"],
            JOB_KUBE_STATE: [f"{_HOST}:{self.ports[JOB_KUBE_STATE]}"],
            JOB_NODE: [f"{_HOST}:{self.ports[JOB_NODE]}"],
            JOB_LOADGEN: [f"{_HOST}:{self.loadgen_port}"] if self.loadgen_port else [],
        }

    def sd_targets(self) -> list[dict]:
        """Targets in the Prometheus http_sd_configs format, one group per target."""
        groups = []
        for service in self.services:
            for p in self.pods[service]:
                if p.running and p.port:
                    labels = {
                        "job": JOB_APP,
                        "namespace": NAMESPACE,
                        "pod": p.name,
                        "container": service,
                        "service": service,
                        "deployment": service,
                    }
                    groups.append({"targets": [f"{_HOST}:{p.port}"], "labels": labels})
        for job in (JOB_CADVISOR, JOB_KUBE_STATE, JOB_NODE, JOB_LOADGEN):
            for target in self.scrape_targets()[job]:
                groups.append({"targets": [target], "labels": {"job": job}})
        return groups

    def services_doc(self) -> dict:
        return {
            "services": self.services,
            "entry": self.entry,
            "call_graph": [list(e) for e in self.cfg.call_graph],
            "scrape_targets": self.scrape_targets(),
            "namespace": NAMESPACE,
            "node": NODE_NAME,
            "sd_url": f"http://{_HOST}:{self.ports['api']}/sd",
            "loadgen_url": f"http://{_HOST}:{self.loadgen_port}",
        }

    def replicas_doc(self) -> dict:
        return {
            s: {"desired": self.desired[s], "ready": sum(p.ready for p in self.pods[s])}
            for s in self.services
        }

    def pods_doc(self) -> list[dict]:
        return [
            {
                "name": p.name,
                "service": p.service,
                "pid": p.proc.pid if p.running else None,
                "port": p.port,
                "ready": p.ready,
                "restarts": p.restarts,
                "deleted": p.deleted,
            }
            for s in self.services
            for p in self.pods[s]
        ]

    # ---- start and stop ---------------------------------------------------------------------

    async def start_loadgen(self) -> None:
        self.loadgen = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collectors.testbed.loadgen",
            "--config",
            self.config_path,
            "--parent",
            str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        line = await asyncio.wait_for(self.loadgen.stdout.readline(), _PORT_TIMEOUT_S)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"load generator did not start (output {line!r})")
        self.loadgen_port = int(line.split()[1])

    async def serve_app(self, name: str, app: web.Application) -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        sock = loopback_socket()
        await web.SockSite(runner, sock).start()
        self._runners.append(runner)
        self.ports[name] = sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop every pod and the load generator; nothing of the testbed survives this."""
        self.stopping = True
        procs = [p.proc for s in self.services for p in self.pods[s]] + [self.loadgen]
        await asyncio.gather(*(self._stop_process(p) for p in procs))
        for s in self.services:
            for p in self.pods[s]:
                if p.task is not None:
                    p.task.cancel()
        for runner in self._runners:
            await runner.cleanup()
        if self.session is not None:
            await self.session.close()


def _metrics_app(collector) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def _api_app(sup: Supervisor) -> web.Application:
    def error(exc: Exception, status: int = 400) -> web.Response:
        return web.json_response({"error": str(exc)}, status=status)

    async def get_replicas(request: web.Request) -> web.Response:
        return web.json_response(sup.replicas_doc())

    async def post_scale(request: web.Request) -> web.Response:
        body = await request.json()
        service, n = body.get("service"), body.get("replicas")
        if service not in sup.services:
            return error(f"scale: unknown service {service!r}; services are {sup.services}")
        if not (isinstance(n, int) and sup.cfg.min_replicas <= n <= sup.cfg.max_replicas):
            bounds = f"[{sup.cfg.min_replicas}, {sup.cfg.max_replicas}]"
            return error(f"scale: replicas {n!r} of {service} outside {bounds}")
        sup.desired[service] = n
        await sup.reconcile()
        return web.json_response(sup.replicas_doc())

    async def post_fault(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            fault = await sup.inject(
                body.get("type"), body.get("target"), body.get("severity"), body.get("duration_s")
            )
        except KubeworldError as exc:
            return error(exc)
        return web.json_response({"id": fault.id, **fault.to_dict()})

    async def delete_fault(request: web.Request) -> web.Response:
        fault_id = request.match_info["fault_id"]
        if not await sup.rollback(fault_id):
            return error(f"no active fault {fault_id!r}", status=404)
        return web.json_response({"id": fault_id, "rolled_back": True})

    async def get_faults(request: web.Request) -> web.Response:
        sup._expire_faults()
        active = [f.to_dict() for f in sup.faults.values()]
        if request.query.get("all"):
            return web.json_response(sup.history + active)
        return web.json_response(active)

    async def get_services(request: web.Request) -> web.Response:
        return web.json_response(sup.services_doc())

    async def get_pods(request: web.Request) -> web.Response:
        return web.json_response(sup.pods_doc())

    async def get_sd(request: web.Request) -> web.Response:
        return web.json_response(sup.sd_targets())

    async def load(request: web.Request) -> web.Response:
        url = f"http://{_HOST}:{sup.loadgen_port}/load"
        data = await request.read() if request.method == "POST" else None
        async with sup.session.request(
            request.method, url, data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            return web.Response(
                status=resp.status, body=await resp.read(), content_type="application/json"
            )

    app = web.Application()
    app.router.add_get("/replicas", get_replicas)
    app.router.add_post("/scale", post_scale)
    app.router.add_post("/faults", post_fault)
    app.router.add_delete("/faults/{fault_id}", delete_fault)
    app.router.add_get("/faults", get_faults)
    app.router.add_get("/services", get_services)
    app.router.add_get("/pods", get_pods)
    app.router.add_get("/sd", get_sd)
    app.router.add_get("/load", load)
    app.router.add_post("/load", load)
    return app


async def _watch_stdin(stop: asyncio.Event) -> None:
    """Set `stop` when stdin closes: the process that started the supervisor is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    stop.set()


async def run(cfg: TestbedConfig, config_path: str, workdir: str, watch_stdin: bool) -> None:
    """Run the supervisor until SIGTERM, SIGINT or (with `watch_stdin`) stdin closes."""
    sup = Supervisor(cfg, config_path, workdir)
    sup.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_PUSH_TIMEOUT_S))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)
    tasks = []
    try:
        await sup.serve_app("api", _api_app(sup))
        await sup.serve_app(JOB_CADVISOR, _metrics_app(CadvisorCollector(sup.pod_views)))
        await sup.serve_app(JOB_KUBE_STATE, _metrics_app(KubeStateCollector(
            lambda: dict(sup.desired), sup.pod_views)))  # fmt: skip
        await sup.serve_app(JOB_NODE, _metrics_app(NodeCollector()))
        await sup.start_loadgen()
        tasks.append(loop.create_task(sup._reconcile_loop()))
        if watch_stdin:
            tasks.append(loop.create_task(_watch_stdin(stop)))
        print(json.dumps({"pid": os.getpid(), **sup.services_doc()}), flush=True)
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await sup.stop()


def _kill_leftovers() -> None:
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file of the TestbedConfig")
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    parser.add_argument("--parent", type=int, default=None, help="die with this parent pid")
    args = parser.parse_args()
    if args.parent is not None:
        die_with_parent(args.parent, signal.SIGTERM)
    setup_child_logging("supervisor")
    disable_created_metrics()
    with open(args.config) as f:
        cfg = TestbedConfig.from_dict(json.load(f))
    workdir = tempfile.mkdtemp(prefix="kubeworld-testbed-")
    config_path = os.path.join(workdir, "config.json")
    with open(config_path, "w") as f:
        json.dump(cfg.to_dict(), f)
    try:
        asyncio.run(run(cfg, config_path, workdir, args.watch_stdin))
    finally:
        _kill_leftovers()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
