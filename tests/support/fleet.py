"""Fleets for tests: agents following one policy topic of the session's Kafka broker, each on
its own lab end, and the `microseg fleet` command against the same topics.

`Fleet(broker, agent_factory, tmp_path, netns=None)` picks unique topic names (`netns`: where
the CLI runs, for a broker in a lab namespace); `agent(lab, host, labels,
side=...)` makes (not starts) an AgentProcess in fleet mode with a short heartbeat;
`cli(...)` runs `microseg fleet ...`; `status()` is `fleet status -o json` parsed;
`wait_converged(hosts, generation)` polls it until those hosts enforce that generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.kafkabroker import KafkaBroker, unique_topic
from streamer.lab.lab import Lab
from support.agentproc import REPO, AgentFactory, AgentProcess
from support.netutil import wait_until

# Short, so a test sees an agent lost in 3 heartbeats without waiting long.
HEARTBEAT_S = 0.5


class Fleet:
    def __init__(
        self,
        broker: KafkaBroker,
        agent_factory: AgentFactory,
        tmp_path: Path,
        netns: str | None = None,
    ) -> None:
        self.broker = broker
        self.bootstrap = broker.bootstrap
        self.netns = netns  # where `cli` runs: a namespace that reaches the broker
        self.policy_topic = unique_topic("fleet-policy")
        self.agents_topic = unique_topic("fleet-agents")
        self.flows_topic = unique_topic("fleet-flows")
        self._factory = agent_factory
        self.tmp_path = tmp_path
        self._docs = 0

    def topic_args(self) -> list[str]:
        return [
            "--fleet",
            self.bootstrap,
            "--fleet-topic",
            self.policy_topic,
            "--fleet-agents-topic",
            self.agents_topic,
        ]

    def agent(
        self,
        lab: Lab,
        host: str,
        labels: Mapping[str, str] | None = None,
        *,
        side: str = "host",
        extra: Sequence[str] = (),
        **kwargs: Any,
    ) -> AgentProcess:
        args = [
            *self.topic_args(),
            "--host-name",
            host,
            "--fleet-heartbeat",
            str(HEARTBEAT_S),
            "--kafka-topic",
            self.flows_topic,
        ]
        for k, v in (labels or {}).items():
            args += ["--host-label", f"{k}={v}"]
        return self._factory(lab, None, side=side, extra_args=[*args, *extra], **kwargs)

    def cli(
        self, *args: str, timeout: float = 90.0, netns: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`microseg fleet ARGS` with this fleet's brokers and topics (in `netns` if given)."""
        argv = [sys.executable, "-m", "streamer", "fleet", *args, *self.topic_args()]
        netns = netns or self.netns
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=dict(os.environ),
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def flows(self, *filters: str) -> list[dict[str, Any]]:
        """Every record on the flows topic that `fleet observe --last 10000 FILTERS` prints."""
        argv = [sys.executable, "-m", "streamer", "fleet", "observe", "--fleet", self.bootstrap]
        argv += ["--flows-topic", self.flows_topic, "--last", "10000", "-o", "json", *filters]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False
        )
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def write(self, doc: Mapping[str, Any]) -> Path:
        self._docs += 1
        path = self.tmp_path / f"fleet-policy-{self._docs}.json"
        path.write_text(json.dumps(doc))
        return path

    def apply(self, doc: Mapping[str, Any], *args: str) -> int:
        """`fleet apply` of `doc`; the generation published (asserts success)."""
        proc = self.cli("apply", str(self.write(doc)), "-o", "json", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        first, _ = json.JSONDecoder().raw_decode(proc.stdout)
        return int(first["generation"])

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "-o", "json", "--heartbeat", str(HEARTBEAT_S))
        assert proc.returncode in (0, 1), proc.stderr
        return dict(json.loads(proc.stdout))

    def agents(self) -> dict[str, dict[str, Any]]:
        return {a["host"]: a for a in self.status()["agents"]}

    def wait_converged(self, hosts: Sequence[str], generation: int, timeout: float = 30.0) -> None:
        """Until every host in `hosts` reports `generation` as enforcing."""
        seen: dict[str, Any] = {}

        def done() -> bool:
            seen.update(self.agents())
            return all(
                (a := seen.get(h)) is not None
                and a["generation"] == generation
                and a["state"] == "enforcing"
                for h in hosts
            )

        assert wait_until(done, timeout=timeout, interval=0.2), (
            f"not all of {list(hosts)} enforce generation {generation}: {seen}"
        )
