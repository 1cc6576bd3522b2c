"""A real Prometheus server on loopback with a generated config, for tests and the pipeline.

`PrometheusServer(targets=...)` writes a config that scrapes every job's targets (file-based
service discovery, so `update_targets` follows replicas that come and go; each target gets the
label `node`), or `PrometheusServer(sd_url=...)` one that discovers them over HTTP (the testbed
supervisor's `/sd`, whose groups carry namespace, pod and service labels as Kubernetes service
discovery would), every `scrape_interval_s`. It starts the distribution's binary on a free
loopback port with its own data folder and waits until it is ready.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from collectors.errors import SourceError

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/bin/prometheus"


def find_prometheus(binary: str | None = None) -> str | None:
    """The Prometheus binary to use (`binary`, /usr/bin/prometheus, or on PATH), or None."""
    for candidate in (binary, DEFAULT_BINARY, shutil.which("prometheus")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """A Prometheus process on loopback scraping `targets` (job -> ["host:port", ...]) or the
    targets discovered at `sd_url`.

    Use as a context manager. `kill()` ends it abruptly (as a crash would); `start()` again
    restarts it on the same port and data folder.
    """

    def __init__(
        self,
        targets: dict[str, list[str]] | None = None,
        sd_url: str | None = None,
        scrape_interval_s: float = 1.0,
        node: str = "testbed-node",
        binary: str | None = None,
        workdir: str | Path | None = None,
        port: int | None = None,
        ready_timeout_s: float = 30.0,
    ):
        found = find_prometheus(binary)
        if found is None:
            raise SourceError("prometheus binary not found (install the 'prometheus' package)")
        self.binary = found
        self.scrape_interval_s = scrape_interval_s
        self.node = node
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kw-prometheus-"))
        self.process: subprocess.Popen | None = None
        if (targets is None) == (sd_url is None):
            raise SourceError("PrometheusServer: give exactly one of targets and sd_url")
        self.sd_url = sd_url
        self.jobs = sorted(targets or {})
        if targets is not None:
            self.update_targets(targets)
        self._write_config()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        interval = f"{round(self.scrape_interval_s * 1000)}ms"
        jobs = [
            {
                "job_name": job,
                "honor_labels": True,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "file_sd_configs": [
                    {"files": [str(self.workdir / f"targets-{job}.json")], "refresh_interval": "1s"}
                ],
            }
            for job in self.jobs
        ]
        if self.sd_url:
            jobs = [
                {
                    "job_name": "sd",
                    "honor_labels": True,
                    "http_sd_configs": [{"url": self.sd_url, "refresh_interval": "1s"}],
                }
            ]
        config = {"global": {"scrape_interval": interval, "scrape_timeout": interval}}
        config["scrape_configs"] = jobs
        # JSON is YAML: no YAML writer needed.
        (self.workdir / "prometheus.yml").write_text(json.dumps(config, indent=1))

    def update_targets(self, targets: dict[str, list[str]]) -> None:
        """Rewrite the target files (Prometheus picks them up within a second)."""
        for job in self.jobs:
            groups = [{"targets": list(targets.get(job, [])), "labels": {"node": self.node}}]
            path = self.workdir / f"targets-{job}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(groups))
            tmp.replace(path)

    def start(self) -> PrometheusServer:
        """Start the process and wait until `/-/ready` answers."""
        log_file = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 (kept by Popen)
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        self._wait_ready()
        log.info("prometheus ready at %s", self.url)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SourceError(f"prometheus exited with {self.process.returncode}: {self.log()}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise SourceError(f"prometheus not ready within {self.ready_timeout_s} s: {self.log()}")

    def log(self) -> str:
        """The tail of the server's log."""
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self) -> None:
        """End the process with SIGKILL (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """End the process gracefully (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
