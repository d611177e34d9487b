"""A real Prometheus server (Debian's `prometheus`) for tests: scraping given targets every
second and evaluating given rules every second, on a free loopback port, its config and TSDB in
a directory of its own.

Import as `from support.prometheus import PrometheusServer, quick_rules`. Use it as a context
manager: the exit (also on failure) stops the server (SIGTERM, then SIGKILL) and removes its
directory. Every wait is bounded; a failed wait's AssertionError carries the server's log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from support.agentproc import free_port
from support.netutil import wait_until

__all__ = ["PrometheusServer", "quick_rules"]


def quick_rules(rules_file: Path, out: Path, for_: str = "1s") -> Path:
    """`rules_file` with every `for:` shortened to `for_` (the expressions as they are), written
    to `out`: the same alerts, firing within seconds of their condition."""
    doc = yaml.safe_load(rules_file.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = for_
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class PrometheusServer:
    """`prometheus` scraping `targets` (host:port, path /metrics) as job `job`, with `rules`."""

    def __init__(
        self,
        targets: Sequence[str],
        rules: Path,
        job: str = "microseg",
        binary: str = "prometheus",
        start_timeout: float = 30.0,
    ) -> None:
        self.targets = list(targets)
        self.rules = rules
        self.job = job
        self.binary = binary
        self.start_timeout = start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="microseg-prom-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "scrape_timeout": "1s",
            },
            "rule_files": [str(self.rules)],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self) -> PrometheusServer:
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_until(self._ready, timeout=self.start_timeout, interval=0.2):
            raise AssertionError(f"prometheus not ready within {self.start_timeout}s:\n{self.log}")
        return self

    @property
    def log(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str) -> Any:
        """GET /api/v1/<path>: its `data` (AssertionError unless the status is success)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=5) as r:
            body = json.load(r)
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, expr: str) -> Any:
        """An instant query's `data` (AssertionError, with the server's error, when it does not
        parse or evaluate)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{expr}: {e.read().decode(errors='replace')}") from None
        assert body.get("status") == "success", (expr, body)
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing now."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == name and a["state"] == "firing"
        ]

    def wait_firing(self, name: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The firing alerts named `name`, once there is one (AssertionError after `timeout`)."""
        seen: list[dict[str, Any]] = []

        def fired() -> bool:
            seen[:] = self.firing(name)
            return bool(seen)

        assert wait_until(fired, timeout=timeout, interval=0.25), (
            f"{name} did not fire within {timeout}s; alerts: {self.alerts()}\n{self.log}"
        )
        return seen

    def wait_targets_up(self, timeout: float = 30.0) -> None:
        """Until every target's last scrape succeeded."""
        seen: list[Mapping[str, Any]] = []

        def up() -> bool:
            seen[:] = self.api("targets")["activeTargets"]
            return len(seen) == len(self.targets) and all(t["health"] == "up" for t in seen)

        assert wait_until(up, timeout=timeout, interval=0.25), (
            f"targets not up within {timeout}s: {seen}\n{self.log}"
        )

    def wait_evaluations(self, count: int, timeout: float = 30.0) -> None:
        """Until the rules have been evaluated `count` times from now (distinct
        lastEvaluation times of their group)."""
        seen: set[str] = set()

        def evaluated() -> bool:
            groups = self.api("rules")["groups"]
            seen.add(",".join(g["lastEvaluation"] for g in groups))
            return len(seen) > count

        assert wait_until(evaluated, timeout=timeout, interval=0.2), (
            f"fewer than {count} rule evaluations within {timeout}s\n{self.log}"
        )

    def rule_names(self) -> set[str]:
        """The alerting rules the server loaded."""
        return {
            r["name"]
            for g in self.api("rules")["groups"]
            for r in g["rules"]
            if r.get("type") == "alerting"
        }

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()
