"""Helpers the test files share (tests/ is on sys.path under pytest, so this package imports
as `support`): nothing here is a test, and nothing here needs root until it is called.

- `netutil`: commands, echo servers and probes inside a network namespace; the lab's
  addresses (`host`, `peer`) and the probes the agent tests send from the peer.
- `packets`: a frame builder (no scapy).
- `refmodel`: rules, policies and packets for the tests of the reference model.
- `bpf`: a classifier loaded for BPF_PROG_TEST_RUN, its ring-buffer records, its verdicts.
- `events`: the flow-event schema check and records for the pipeline tests.
- `classifier`: rule documents, packets and counters for the classifier tests.
- `tables`: the classifier's lookup over compiled tables, in Python.
- `diffkit`: the kernel classifier against the stateful reference model, frame by frame.
- `agentproc`: `microseg run` as a real subprocess; policy files and rule documents for it.
- `agentapi`: HTTP to a running agent's admin API (TCP or Unix socket).
- `cli`: the `microseg` command as a subprocess against a running agent.
- `stubapi`: a stub admin API for the client tests (no agent, no root).
- `apiapp`: the admin API served in-process over the session's classifier.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's top directory (scripts/, bpf/, docs/, streamer/)."""
