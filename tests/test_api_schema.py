"""schemathesis against the served OpenAPI document: the admin API on a real TCP port
(127.0.0.1, random port), with a real PolicyStore and the real classifier, token supplied.

For every operation, generated requests (valid and invalid) must never get a 5xx, and every
response must conform to the document: a documented status code, content type, headers and
body schema. Bounded: at most 50 examples per operation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from streamer.api.context import ApiContext
from streamer.api.openapi import build_openapi
from streamer.api.serve import start_api
from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.policy.model import PolicySet
from streamer.policy.store import PolicyStore

TOKEN = "schema-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class ServedApi:
    """The API served by start_api on 127.0.0.1:<random> from an event loop in a thread."""

    def __init__(self, dp: Datapath, state_dir: Path) -> None:
        self.dp = dp
        self.state_dir = state_dir
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="api-under-test", daemon=True)

    def __enter__(self) -> ServedApi:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the API did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported by __enter__
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        dp = self.dp

        def applier(policy: PolicySet, generation: int | None) -> int:
            return dp.apply(compile_policy(policy, dp.config.max_shapes), generation)

        store = PolicyStore(self.state_dir, applier)
        store.restore(PolicySet(), 0)
        ctx = ApiContext(
            store=store,
            datapath=dp,
            interfaces=["lo"],
            version="0.0.0-test",
            started_monotonic=time.monotonic(),
            token=TOKEN,
            bind_hosts=set(),
            registry=CollectorRegistry(),
        )
        runner = await start_api(ctx, ["127.0.0.1:0"])
        try:
            self.port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()


@pytest.fixture(scope="module")
def served(datapath: Datapath, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApi]:
    datapath.clear_sessions()
    with ServedApi(datapath, tmp_path_factory.mktemp("schema-state")) as api:
        yield api


@pytest.fixture(scope="module")
def api_schema(served: ServedApi) -> Any:
    url = f"http://127.0.0.1:{served.port}/api/v1/openapi.json"
    return schemathesis.openapi.from_url(url, headers=AUTH, timeout=10)


def _operations() -> list[Any]:
    """(method, path, mode) for every documented operation; negative data only where there
    is a parameter or body to break."""
    out: list[Any] = []
    for path, item in build_openapi("x")["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            has_input = bool(op.get("parameters") or op.get("requestBody") or "parameters" in item)
            modes = ["positive", "negative"] if has_input else ["positive"]
            for mode in modes:
                out.append(
                    pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode}")
                )
    return out


# Valid and invalid data together make about 50 examples per operation.
EXAMPLES = {"positive": 30, "negative": 20}


@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_api_conforms_to_its_document(api_schema: Any, method: str, path: str, mode: str) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=30)
        statuses.append(response.status_code)

    statuses: list[int] = []
    run()
    print(f"{method} {path} {mode}: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    assert statuses, "no request was made"
