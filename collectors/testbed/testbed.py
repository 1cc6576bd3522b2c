"""`Testbed`: start, drive and stop the local testbed from Python.

    with Testbed(TestbedConfig(load=ConstantLoad(20))) as tb:
        tb.scale("catalog", 2)
        fault_id = tb.inject("latency", "payment", severity=0.5, duration_s=30)
        targets = tb.scrape_targets()

The supervisor runs as a separate process in its own session; it stops (and takes every replica
with it) when the context exits, when this process dies (its stdin closes; and through
PR_SET_PDEATHSIG, so the thread that starts the testbed must outlive it), or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import requests

from collectors.errors import ConfigError, FaultError, SourceError
from collectors.testbed.config import TestbedConfig
from collectors.testbed.load import LoadCurve, curve_from_spec

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0
_HTTP_TIMEOUT_S = 10.0


class Testbed:
    """A running testbed: supervisor, replicas and load generator on 127.0.0.1."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, config: TestbedConfig | None = None, wait_ready: bool = True) -> None:
        self.config = config or TestbedConfig()
        self._wait_ready = wait_ready
        self._proc: subprocess.Popen | None = None
        self._doc: dict[str, Any] = {}
        self._http = requests.Session()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> Testbed:
        """Start the supervisor (and through it the replicas and load generator)."""
        fd, config_path = tempfile.mkstemp(prefix="kubeworld-testbed-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.config.to_dict(), f)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "collectors.testbed.supervisor", "--config", config_path,
                 "--watch-stdin", "--parent", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
            self._doc = json.loads(self._read_first_line())
        except BaseException:
            self.stop()
            raise
        finally:
            os.unlink(config_path)
        log.info("testbed supervisor pid %d, API %s", self._proc.pid, self.api_url)
        if self._wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def _read_first_line(self) -> str:
        ready, _, _ = select.select([self._proc.stdout], [], [], _START_TIMEOUT_S)
        line = self._proc.stdout.readline() if ready else b""
        self._proc.stdout.close()
        if not line:
            raise SourceError(
                f"testbed supervisor did not start within {_START_TIMEOUT_S:.0f}s "
                f"(exit code {self._proc.poll()})"
            )
        return line.decode()

    def stop(self) -> None:
        """Stop the supervisor, every replica and the load generator; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("testbed supervisor %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()  # its replicas follow through PR_SET_PDEATHSIG
            proc.wait()
        self._http.close()

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every service has as many ready replicas as it desires."""
        timeout_s = self.config.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            replicas = self.replicas()
            if all(r["ready"] == r["desired"] for r in replicas.values()):
                return
            if time.monotonic() > deadline:
                raise SourceError(f"testbed replicas not ready after {timeout_s:.0f}s: {replicas}")
            time.sleep(0.2)

    # ---- description ------------------------------------------------------------------------

    @property
    def supervisor_pid(self) -> int:
        return self._doc["pid"]

    @property
    def services(self) -> list[str]:
        """Service names, entry first."""
        return list(self._doc["services"])

    @property
    def entry_service(self) -> str:
        return self._doc["entry"]

    @property
    def call_graph(self) -> list[tuple[str, str]]:
        return [tuple(edge) for edge in self._doc["call_graph"]]

    @property
    def api_url(self) -> str:
        """Base URL of the supervisor's HTTP API."""
        return self._doc["sd_url"].rsplit("/", 1)[0]

    @property
    def sd_url(self) -> str:
        """URL of the Prometheus http_sd_configs target list."""
        return self._doc["sd_url"]

    @property
    def loadgen_url(self) -> str:
        return self._doc["loadgen_url"]

    @property
    def node_name(self) -> str:
        return self._doc["node"]

    @property
    def namespace(self) -> str:
        return self._doc["namespace"]

    def scrape_targets(self) -> dict[str, list[str]]:
        """Prometheus job name -> "host:port" targets, each serving /metrics."""
        return self._get("/services")["scrape_targets"]

    def sd_targets(self) -> list[dict]:
        """The same targets with their labels, in the http_sd_configs format."""
        return self._get("/sd")

    def pods(self) -> list[dict]:
        """Every pod: name, service, pid, port, ready, restarts, deleted."""
        return self._get("/pods")

    # ---- control ----------------------------------------------------------------------------

    def replicas(self) -> dict[str, dict[str, int]]:
        """service -> {"desired": int, "ready": int}."""
        return self._get("/replicas")

    def scale(self, service: str, replicas: int) -> dict[str, dict[str, int]]:
        """Set the desired replicas of `service`; raises ConfigError when out of bounds."""
        return self._send("POST", "/scale", {"service": service, "replicas": int(replicas)},
                          ConfigError)  # fmt: skip

    def inject(self, fault_type: str, target: str, severity: float, duration_s: float) -> str:
        """Inject a fault that ends by itself after `duration_s`; returns its id."""
        body = {"type": fault_type, "target": target, "severity": severity,
                "duration_s": duration_s}  # fmt: skip
        return self._send("POST", "/faults", body, FaultError)["id"]

    def rollback(self, fault_id: str) -> None:
        """End a fault early; raises FaultError when it is not active (e.g. already over)."""
        self._send("DELETE", f"/faults/{fault_id}", None, FaultError)

    def active_faults(self) -> list[dict]:
        """Faults in effect now: id, type, target, severity, duration_s, started_at, deadline."""
        return self._get("/faults")

    def fault_history(self) -> list[dict]:
        """Every fault of this testbed, ended ones with `ended_at` (Unix seconds)."""
        return self._get("/faults?all=1")

    def set_load(self, curve: LoadCurve | dict | None) -> None:
        """Replace the load generator's curve (it starts at t = 0 now); None stops the load."""
        spec = None if curve is None else curve_from_spec(curve).to_dict()
        self._send("POST", "/load", {"curve": spec}, ConfigError)

    @property
    def load(self) -> LoadCurve | None:
        """The load generator's current curve (None when idle)."""
        spec = self._get("/load")["curve"]
        return None if spec is None else curve_from_spec(spec)

    def offered_rps(self) -> float:
        """The load curve's rate now, requests per second."""
        return self._get("/load")["rate_rps"]

    # ---- HTTP -------------------------------------------------------------------------------

    def _get(self, path: str) -> Any:
        return self._send("GET", path, None, SourceError)

    def _send(self, method: str, path: str, body: Any, error: type[Exception]) -> Any:
        if self._proc is None:
            raise SourceError(f"testbed is not running ({method} {path})")
        try:
            resp = self._http.request(
                method, self.api_url + path, json=body, timeout=_HTTP_TIMEOUT_S
            )
        except requests.RequestException as exc:
            raise SourceError(f"testbed API {method} {path} failed: {exc}") from exc
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text
            raise error(f"testbed API {method} {path}: {message}")
        return resp.json()
