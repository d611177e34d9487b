"""The API clients of the `microseg` command: `policy ...`, `session list`, `stats`.

In: command-line arguments (see `add_client_parsers`), the API token (from `--token`, the
MICROSEG_TOKEN environment variable or `<state-dir>/api-token`) and policy/rule files (JSON or
YAML). Out: one request (two for `policy update`) to the agent's admin API (SPEC §3), its answer
printed as aligned tables for people or, with `-o json`, the API's JSON unchanged (indented).
Exit status: 0 done, 1 the API refused or the agent could not be reached (a one-line reason on
stderr, never a stack trace), 2 bad arguments.

The client checks only what it must to build a request (argument types, file syntax); rule
validation is the agent's, so its messages are the ones shown.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml
from yarl import URL

__all__ = [
    "API_PREFIX",
    "APPLY_TIMEOUT",
    "DEFAULT_API",
    "DEFAULT_STATE_DIR",
    "RULE_FIELDS",
    "TIMEOUT",
    "TOKEN_ENV",
    "ApiError",
    "ClientError",
    "Endpoint",
    "add_client_parsers",
    "cmd_policy_add",
    "cmd_policy_apply",
    "cmd_policy_delete",
    "cmd_policy_get",
    "cmd_policy_list",
    "cmd_policy_load",
    "cmd_policy_update",
    "cmd_session_list",
    "cmd_stats",
    "format_table",
    "parse_api_address",
    "render_diff",
]

DEFAULT_API: Final = "127.0.0.1:8080"
DEFAULT_PORT: Final = 8080
DEFAULT_STATE_DIR: Final = Path("/var/lib/microseg")
TOKEN_FILE: Final = "api-token"
TOKEN_ENV: Final = "MICROSEG_TOKEN"
API_PREFIX: Final = "/api/v1"
TIMEOUT: Final = 10.0
# A whole-set replace of ~100k rules is validated, compiled and written to disk before the
# agent answers; that takes seconds, not milliseconds.
APPLY_TIMEOUT: Final = 120.0
MAX_RULE_ID: Final = 2**32 - 1
MAX_TOKEN_BYTES: Final = 4096

RULE_FIELDS: Final = (
    "rule_id",
    "name",
    "src_ip",
    "dst_ip",
    "src_port",
    "dst_port",
    "protocol",
    "action",
    "priority",
    "direction",
)
PROTOCOLS: Final = ("tcp", "udp", "icmp", "icmpv6", "any")
ACTIONS: Final = ("allow", "deny", "log")
DIRECTIONS: Final = ("ingress", "egress", "any")
VERDICTS: Final = ("allow", "deny", "log")


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A failure to report in one line on stderr; `exit_status` is what the command returns."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status

    def __str__(self) -> str:
        return self.message


class UsageError(ClientError):
    """Arguments that make no request possible (exit status 2, like argparse)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


class ApiError(ClientError):
    """The API answered with an error status: `status`, its `code` and its `api_message`."""

    def __init__(self, status: int, code: str | None, api_message: str) -> None:
        self.status = status
        self.code = code
        self.api_message = api_message
        where = f"HTTP {status} {code}" if code else f"HTTP {status}"
        super().__init__(f"{api_message} ({where})")


# --------------------------------------------------------------------------- endpoint


@dataclass(frozen=True)
class Endpoint:
    """Where the API is: `base_url` (no /api/v1), `unix_path` for a Unix socket, `display` as
    the user wrote it (for messages)."""

    base_url: URL
    unix_path: str | None
    display: str


def parse_api_address(value: str) -> Endpoint:
    """`--api` value -> Endpoint. Accepts `host:port`, `[v6]:port`, `host` (port 8080),
    `http(s)://host[:port][/prefix]` and `unix:/path`. Raises argparse.ArgumentTypeError."""
    text = value.strip()
    if not text:
        raise argparse.ArgumentTypeError(
            "empty address: use HOST:PORT, http://HOST:PORT or unix:/PATH"
        )
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):  # unix:///run/x.sock
            path = path[2:]
        if not path.startswith("/"):
            raise argparse.ArgumentTypeError(
                f"{value!r}: a Unix socket needs an absolute path, e.g. unix:/run/microseg.sock"
            )
        # Host "localhost" is what the agent accepts on its socket (DNS-rebinding check).
        return Endpoint(URL("http://localhost"), path, text)
    if "://" in text:
        try:
            url = URL(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not a URL: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise argparse.ArgumentTypeError(
                f"{value!r}: only http:// and https:// URLs with a host are supported"
            )
        if url.query_string or url.fragment:
            raise argparse.ArgumentTypeError(f"{value!r}: no query or fragment, please")
        path = url.path.rstrip("/")
        if path.endswith(API_PREFIX):
            path = path[: -len(API_PREFIX)]
        try:
            port = url.port
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: the port is not 1..65535") from None
        base = URL.build(scheme=url.scheme, host=url.host, port=port, path=path)
        return Endpoint(base, None, text)
    host, port = _split_host_port(text, value)
    return Endpoint(URL.build(scheme="http", host=host, port=port), None, text)


def _split_host_port(text: str, original: str) -> tuple[str, int]:
    hint = "use HOST:PORT, [IPv6]:PORT, http://HOST:PORT or unix:/PATH"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"{original!r} is not an address: {hint}")
        port_text = rest[1:] if rest else ""
    else:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise argparse.ArgumentTypeError(f"{original!r} is not an address: {hint}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{original!r}: the port must be 1..65535")
    return host, int(port_text)


# --------------------------------------------------------------------------- token


@dataclass(frozen=True)
class _Token:
    value: str | None
    missing_file: Path | None  # set when no token was found: named in a 401 hint


def _resolve_token(args: argparse.Namespace) -> _Token:
    """--token, else MICROSEG_TOKEN, else <state-dir>/api-token. A missing file is not an
    error (the agent may run with --no-auth); an unreadable one is."""
    given = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if given is not None:
        return _Token(_check_token(given, "--token" if args.token is not None else TOKEN_ENV), None)
    path = Path(args.state_dir) / TOKEN_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        return _Token(None, path)
    except PermissionError:
        raise ClientError(
            f"cannot read the API token file {path}: permission denied; run as root "
            f"(or a user that can read it), or pass --token / set {TOKEN_ENV}"
        ) from None
    except OSError as e:
        raise ClientError(
            f"cannot read the API token file {path}: {e.strerror or e}; "
            f"pass --token / set {TOKEN_ENV}, or --state-dir"
        ) from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ClientError(f"the API token file {path} is too large to be a token")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ClientError(f"the API token file {path} does not hold a token (not ASCII)") from None
    return _Token(_check_token(text, str(path)), None)


def _check_token(text: str, source: str) -> str:
    token = text.strip()
    if not token:
        raise ClientError(f"the API token from {source} is empty")
    # Header injection and garbage guard: a token is one printable word.
    if any(not (33 <= ord(c) <= 126) for c in token):
        raise ClientError(f"the API token from {source} is not a token (one printable word)")
    return token


# --------------------------------------------------------------------------- HTTP


class Api:
    """One aiohttp session to the admin API. Use as `async with Api(...) as api`."""

    def __init__(self, endpoint: Endpoint, token: _Token, timeout: float) -> None:
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        connector: aiohttp.BaseConnector | None = None
        if self.endpoint.unix_path is not None:
            connector = aiohttp.UnixConnector(path=self.endpoint.unix_path)
        headers = {"Accept": "application/json"}
        if self.token.value is not None:
            headers["Authorization"] = f"Bearer {self.token.value}"
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            # Proxies would break the loopback-only, Host-checked API; ignore *_PROXY.
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        """Send one request to /api/v1{path}; return the decoded JSON (None for no body).

        Raises ApiError for an error status, ClientError when the agent cannot be reached,
        times out or answers something that is not JSON.
        """
        assert self._session is not None, "use `async with Api(...)`"
        url = self.endpoint.base_url.with_path(
            self.endpoint.base_url.path.rstrip("/") + API_PREFIX + path
        )
        if params:
            url = url.with_query(dict(params))
        data: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            data = _dump_body(body)
            headers["Content-Type"] = "application/json"
        where = self.endpoint.display
        try:
            async with self._session.request(method, url, data=data, headers=headers) as resp:
                raw = await resp.read()
                status, reason = resp.status, resp.reason or ""
        except aiohttp.ClientConnectorError as e:
            raise ClientError(_unreachable(where, e.os_error, self.endpoint)) from None
        except TimeoutError:
            raise ClientError(
                f"the agent at {where} did not answer within {self.timeout:g} s"
            ) from None
        except aiohttp.ServerDisconnectedError:
            raise ClientError(
                f"the agent at {where} closed the connection without an answer"
            ) from None
        except aiohttp.ClientError as e:
            raise ClientError(f"talking to the agent at {where} failed: {e}") from None
        decoded = _decode(raw)
        if status >= 400:
            raise _api_error(status, reason, raw, decoded, self.token)
        if decoded is _NOT_JSON:
            raise ClientError(
                f"the agent at {where} answered HTTP {status} with something that is not JSON;"
                " is --api pointing at a microseg agent?"
            )
        return decoded


_NOT_JSON: Final[Any] = object()


def _dump_body(body: Any) -> bytes:
    try:
        # default=str: YAML turns `name: 2024-01-01` into a date; the user meant the text.
        return json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    except ValueError as e:  # e.g. circular YAML anchors
        raise ClientError(f"cannot send this as JSON: {e}") from None


def _decode(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _api_error(status: int, reason: str, raw: bytes, decoded: Any, token: _Token) -> ApiError:
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        code = decoded.get("error")
        err = ApiError(status, code if isinstance(code, str) else None, decoded["message"])
    else:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        first = text[0][:200] if text else ""
        err = ApiError(status, None, first or reason or "error")
    if status == 401 and token.missing_file is not None:
        err.message += (
            f"\nmicroseg: no token was sent: {token.missing_file} does not exist; pass "
            f"--state-dir (the agent's), --token, or set {TOKEN_ENV}"
        )
    return err


def _unreachable(where: str, error: OSError, endpoint: Endpoint) -> str:
    if isinstance(error, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(error, FileNotFoundError) and endpoint.unix_path:
        why = "no such socket"
    elif isinstance(error, PermissionError) and endpoint.unix_path:
        why = "permission denied on the socket; run as root or as a member of its group"
    else:
        why = error.strerror or str(error) or type(error).__name__
    return f"the agent is not reachable at {where} ({why}); is `microseg run` running?"


def _run(
    args: argparse.Namespace,
    action: Callable[[Api, argparse.Namespace], Awaitable[int]],
    timeout: float | None = None,
) -> int:
    """Resolve the token, open a session, run `action` (with `timeout`, default TIMEOUT, for
    the whole of each request); errors -> stderr and exit status."""
    limit = TIMEOUT if timeout is None else timeout
    try:
        token = _resolve_token(args)

        async def main() -> int:
            async with Api(args.api, token, limit) as api:
                return await action(api, args)

        return asyncio.run(main())
    except ClientError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        # The request may or may not have reached the agent; say so rather than guess.
        print(
            "microseg: interrupted (a write may still have been applied; check with "
            "`microseg policy list`)",
            file=sys.stderr,
        )
        return 130


def run_client(args: argparse.Namespace, action: Callable[[Api], Awaitable[int]],
               timeout: float) -> int:
    """For commands that only read and may run until Ctrl-C (`flows observe`, `monitor`):
    `action` with an open Api (`timeout` bounds each request); errors -> stderr and exit
    status; Ctrl-C -> 0."""
    try:
        token = _resolve_token(args)

        async def main() -> int:
            async with Api(args.api, token, timeout) as api:
                return await action(api)

        return asyncio.run(main())
    except ClientError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- output


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """Aligned columns separated by two spaces; column indexes in `right` are right-aligned.
    No trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _print_json(data: Any) -> None:
    if data is not None:
        print(json.dumps(data, indent=2, ensure_ascii=False))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _port(value: Any) -> str:
    return "any" if value in (0, "0", None) else str(value)


def _rule_row(rule: Mapping[str, Any]) -> list[str]:
    return [
        _cell(rule.get("rule_id")),
        _cell(rule.get("name")) if rule.get("name") else "-",
        _cell(rule.get("src_ip", "any")),
        _port(rule.get("src_port")),
        _cell(rule.get("dst_ip", "any")),
        _port(rule.get("dst_port")),
        _cell(rule.get("protocol")),
        _cell(rule.get("action")),
        _cell(rule.get("priority")),
        _cell(rule.get("direction", "any")),
    ]


RULE_HEADERS: Final = (
    "ID",
    "NAME",
    "SRC",
    "SPORT",
    "DST",
    "DPORT",
    "PROTO",
    "ACTION",
    "PRIO",
    "DIR",
)


def _rules_table(rules: Sequence[Mapping[str, Any]]) -> str:
    return format_table(RULE_HEADERS, [_rule_row(r) for r in rules], right=(0, 8))


def _key_values(data: Mapping[str, Any], order: Sequence[str] = ()) -> str:
    """`key  value` lines, `order` first; nested mappings flattened as a.b; rates get a %."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif (
            prefix.endswith("_rate")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            flat.append((prefix, f"{value:.2f}%"))
        else:
            flat.append((prefix, '""' if value == "" else _cell(value)))

    keys = [k for k in order if k in data] + [k for k in data if k not in order]
    for key in keys:
        walk(str(key), data[key])
    width = max((len(k) for k, _ in flat), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in flat)


def _rule_summary(rule: Mapping[str, Any]) -> str:
    name = f' "{rule["name"]}"' if rule.get("name") else ""
    src = _cell(rule.get("src_ip", "any"))
    dst = _cell(rule.get("dst_ip", "any"))
    if _port(rule.get("src_port")) != "any":
        src += f" port {rule['src_port']}"
    if _port(rule.get("dst_port")) != "any":
        dst += f" port {rule['dst_port']}"
    return (
        f"{_cell(rule.get('rule_id'))}{name}: {_cell(rule.get('action'))} "
        f"{_cell(rule.get('protocol'))} {src} -> {dst}, priority {_cell(rule.get('priority'))}, "
        f"direction {_cell(rule.get('direction', 'any'))}"
    )


def _rule_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    keys = [k for k in RULE_FIELDS if k in before or k in after]
    keys += [k for k in after if k not in keys]
    changes = [
        f"{k} {_cell(before.get(k))} -> {_cell(after.get(k))}"
        for k in keys
        if before.get(k) != after.get(k)
    ]
    name = f' "{after["name"]}"' if after.get("name") else ""
    return f"{_cell(after.get('rule_id'))}{name}: " + ("; ".join(changes) or "no field differs")


def render_diff(diff: Mapping[str, Any], new_default: str | None = None) -> str:
    """A policy change (the API's diff object) for people: a header, `+` added, `-` removed,
    `~` changed rules (with the fields that differ), the default action, and for a dry run how
    many live sessions would change verdict. `new_default` names the new default action when
    the caller knows it (the diff only says whether it changed)."""
    dry = bool(diff.get("dry_run"))
    gen = diff.get("generation")
    if dry:
        lines = [f"dry run against generation {_cell(gen)}: nothing was applied"]
    else:
        lines = [f"applied: now generation {_cell(gen)}"]
    for rule in _list_of_dicts(diff.get("added")):
        lines.append(f"+ {_rule_summary(rule)}")
    for rule in _list_of_dicts(diff.get("removed")):
        lines.append(f"- {_rule_summary(rule)}")
    for pair in _list_of_dicts(diff.get("changed")):
        before, after = pair.get("before"), pair.get("after")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            lines.append(f"~ {_rule_changes(before, after)}")
    if diff.get("default_action_changed"):
        to = f" to {new_default}" if new_default else ""
        lines.append(f"~ default action {'would change' if dry else 'changed'}{to}")
    if len(lines) == 1:
        lines.append("no changes")
    if dry and "sessions_checked" in diff:
        checked = _cell(diff.get("sessions_checked"))
        changing = _cell(diff.get("sessions_changing_verdict"))
        lines.append(f"{changing} of {checked} live sessions would change verdict")
    return "\n".join(lines)


def _list_of_dicts(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _is_diff(data: Any) -> bool:
    return isinstance(data, Mapping) and "added" in data and "removed" in data


def _expect_dict(data: Any, api: Api, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ClientError(
            f"the agent at {api.endpoint.display} answered {what} with unexpected JSON "
            f"({type(data).__name__}, expected an object)"
        )
    return data


# --------------------------------------------------------------------------- files


def _read_document(path: Path) -> Any:
    """A JSON or YAML file (`-` = stdin) -> its data. YAML when the suffix is .yaml/.yml;
    JSON when .json; otherwise JSON, falling back to YAML. Raises UsageError naming the file."""
    name = "stdin" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read it: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        as_json = False
    elif suffix == ".json":
        as_json = True
    else:  # stdin, .txt, no suffix: JSON documents start with { or [
        as_json = text.lstrip()[:1] in ("{", "[")
    if as_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{name}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"
            ) from None
        except RecursionError:
            raise UsageError(f"{name}: invalid JSON: nested too deeply") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        at = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise UsageError(f"{name}: {at}invalid YAML: {problem}") from None
    except RecursionError:
        raise UsageError(f"{name}: invalid YAML: nested too deeply") from None


def _read_rule_file(path: Path) -> dict[str, Any]:
    data = _read_document(path)
    if (isinstance(data, dict) and "policies" in data) or isinstance(data, list):
        raise UsageError(
            f"{path}: holds a policy set, not one rule; use `microseg policy apply {path}`"
        )
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: expected one rule (a JSON/YAML object), got {type(data).__name__}"
        )
    return data


def _read_policy_file(path: Path) -> dict[str, Any]:
    data = _read_document(path)
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: the top level is {type(data).__name__}: expected an object "
            '{"default_action": "allow"|"deny", "policies": [RULE, ...]}'
        )
    return data


# --------------------------------------------------------------------------- argument types


def seconds_between(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds in lo..hi (both commands' flags use it)."""

    def parse(value: str) -> float:
        try:
            n = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{value!r} must be between {lo:g} and {hi:g} seconds")
        return n

    return parse


def _rule_id(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rule id (1..{MAX_RULE_ID})") from None
    if not 1 <= n <= MAX_RULE_ID:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rule id (1..{MAX_RULE_ID})")
    return n


def _priority(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a priority (0..65535)")
    return n


def _rule_port(value: str) -> int | str:
    """An int 0..65535, or "lo-hi" (sent as the string, as SPEC §2 writes ranges)."""
    lo, sep, hi = value.partition("-")
    parts = [lo, hi] if sep else [lo]
    if not all(p.strip().isascii() and p.strip().isdigit() and int(p) <= 65535 for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: use 0..65535 or LO-HI")
    if sep:
        if int(lo) > int(hi):
            raise argparse.ArgumentTypeError(f"{value!r}: the range must be LO-HI with LO <= HI")
        return f"{int(lo)}-{int(hi)}"
    return int(lo)


def _filter_port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (1..65535)")
    return int(value)


def _limit(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a limit (a whole number >= 1)")
    return int(value)


def _api_type(value: str) -> Endpoint:
    return parse_api_address(value)


# --------------------------------------------------------------------------- commands


def _rule_from_flags(args: argparse.Namespace, with_id: bool) -> dict[str, Any]:
    """The RULE fields given as flags (only those given); `rule_id` only when `with_id` (for
    update it is the positional, not a change)."""
    fields = RULE_FIELDS if with_id else RULE_FIELDS[1:]
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def _dry_params(args: argparse.Namespace) -> dict[str, str]:
    return {"dry_run": "1"} if args.dry_run else {}


def _show_change(
    args: argparse.Namespace, result: Any, done: str, new_default: str | None = None
) -> None:
    """Print a write's answer: JSON as is, a diff readably, a rule as one row, else `done`."""
    if args.output == "json":
        _print_json(result)
    elif _is_diff(result):
        print(render_diff(result, new_default))
    elif isinstance(result, dict) and "rule_id" in result:
        print(done)
        print(_rules_table([result]))
    else:
        print(done)


async def _policy_list(api: Api, args: argparse.Namespace) -> int:
    data = _expect_dict(await api.call("GET", "/policies"), api, "GET /policies")
    if args.output == "json":
        _print_json(data)
        return 0
    rules = _list_of_dicts(data.get("policies"))
    if rules:
        print(_rules_table(rules))
    count = data.get("count", len(rules))
    print(
        f"{count} rule{'' if count == 1 else 's'}, default action "
        f"{_cell(data.get('default_action'))}, generation {_cell(data.get('generation'))}"
    )
    return 0


async def _policy_get(api: Api, args: argparse.Namespace) -> int:
    path = f"/policies/{args.rule_id}"
    data = _expect_dict(await api.call("GET", path), api, f"GET {path}")
    if args.output == "json":
        _print_json(data)
    else:
        shown = dict(data)
        if "last_hit" in shown and shown["last_hit"] in (None, 0):
            shown["last_hit"] = "never"
        print(_key_values(shown, (*RULE_FIELDS, "packets", "bytes", "last_hit")))
    return 0


async def _policy_add(api: Api, args: argparse.Namespace) -> int:
    rule = _read_rule_file(args.file) if args.file is not None else {}
    rule.update(_rule_from_flags(args, with_id=True))
    if args.file is None:
        missing = [
            f"--{f.replace('_', '-')}" for f in ("rule_id", "protocol", "action") if f not in rule
        ]
        if missing:
            raise UsageError(f"policy add: missing {', '.join(missing)} (or give --file)")
    result = await api.call("POST", "/policies", params=_dry_params(args), body=rule)
    _show_change(args, result, f"added rule {rule.get('rule_id', '')}".rstrip())
    return 0


async def _policy_update(api: Api, args: argparse.Namespace) -> int:
    changes = _read_rule_file(args.file) if args.file is not None else {}
    changes.update(_rule_from_flags(args, with_id=False))
    if not changes:
        raise UsageError(
            "policy update: nothing to change; give at least one of "
            + ", ".join(f"--{f.replace('_', '-')}" for f in RULE_FIELDS[1:])
            + " or --file"
        )
    if "rule_id" in changes and changes["rule_id"] != args.rule_id:
        raise UsageError(
            f"policy update {args.rule_id}: the file says rule_id {changes['rule_id']}; a rule "
            "keeps its id (delete it and add a new one to renumber)"
        )
    path = f"/policies/{args.rule_id}"
    current = _expect_dict(await api.call("GET", path), api, f"GET {path}")
    # Only RULE fields go back: the hit counters (packets, bytes, last_hit) are read-only and
    # the API rejects unknown fields.
    rule: dict[str, Any] = {f: current[f] for f in RULE_FIELDS if f in current}
    rule.update(changes)
    rule["rule_id"] = args.rule_id
    result = await api.call("PUT", path, params=_dry_params(args), body=rule)
    _show_change(args, result, f"updated rule {args.rule_id}")
    return 0


async def _policy_delete(api: Api, args: argparse.Namespace) -> int:
    result = await api.call("DELETE", f"/policies/{args.rule_id}", params=_dry_params(args))
    _show_change(args, result, f"deleted rule {args.rule_id}")
    return 0


async def _policy_apply(api: Api, args: argparse.Namespace) -> int:
    document = _read_policy_file(args.file)
    result = await api.call("PUT", "/policies", params=_dry_params(args), body=document)
    default = document.get("default_action")
    _show_change(
        args, result, f"applied {args.file}", default if isinstance(default, str) else None
    )
    return 0


async def _policy_load(api: Api, args: argparse.Namespace) -> int:
    result = await api.call("POST", "/policies/reload")
    if args.output == "json":
        _print_json(result)
    elif _is_diff(result):
        print("reloaded the agent's policy file")
        print(render_diff(result))
    elif isinstance(result, dict) and result:
        print("reloaded the agent's policy file")
        print(_key_values(result))
    else:
        print("reloaded the agent's policy file")
    return 0


SESSION_HEADERS: Final = (
    "PROTO",
    "SRC",
    "DST",
    "DIR",
    "VERDICT",
    "RULE",
    "PKTS_OUT",
    "BYTES_OUT",
    "PKTS_IN",
    "BYTES_IN",
)


def _endpoint_text(ip: Any, port: Any) -> str:
    addr = _cell(ip)
    if port in (None, 0):
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _session_row(s: Mapping[str, Any]) -> list[str]:
    rule = s.get("rule_id")
    return [
        _cell(s.get("protocol")),
        _endpoint_text(s.get("src_ip"), s.get("src_port")),
        _endpoint_text(s.get("dst_ip"), s.get("dst_port")),
        _cell(s.get("direction")),
        _cell(s.get("verdict")),
        "default" if rule is None else _cell(rule),
        _cell(s.get("packets_out", 0)),
        _cell(s.get("bytes_out", 0)),
        _cell(s.get("packets_in", 0)),
        _cell(s.get("bytes_in", 0)),
    ]


async def _session_list(api: Api, args: argparse.Namespace) -> int:
    params = {
        k: str(v)
        for k in ("ip", "port", "protocol", "verdict", "limit")
        if (v := getattr(args, k)) is not None
    }
    data = _expect_dict(await api.call("GET", "/sessions", params=params), api, "GET /sessions")
    if args.output == "json":
        _print_json(data)
        return 0
    sessions = _list_of_dicts(data.get("sessions"))
    if sessions:
        print(
            format_table(SESSION_HEADERS, [_session_row(s) for s in sessions], right=(6, 7, 8, 9))
        )
    count = data.get("count", len(sessions))
    line = f"{count} session{'' if count == 1 else 's'}"
    if data.get("truncated"):
        line += " (truncated: narrow the filters or raise --limit)"
    print(line)
    return 0


STATS_ORDER: Final = (
    "total_packets",
    "allowed_packets",
    "denied_packets",
    "allow_rate",
    "deny_rate",
    "new_sessions",
    "closed_sessions",
    "active_sessions",
    "policy_hits",
    "policy_misses",
    "hit_rate",
)


async def _stats(api: Api, args: argparse.Namespace) -> int:
    path = "/stats/packets" if args.packets else "/stats/policies" if args.policies else "/stats"
    data = _expect_dict(await api.call("GET", path), api, f"GET {path}")
    if args.output == "json":
        _print_json(data)
    else:
        print(_key_values(data, STATS_ORDER))
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    """`policy list`: every rule, the default action and the generation."""
    return _run(args, _policy_list)


def cmd_policy_get(args: argparse.Namespace) -> int:
    """`policy get RULE_ID`: one rule with its hit counters."""
    return _run(args, _policy_get)


def cmd_policy_add(args: argparse.Namespace) -> int:
    """`policy add`: POST one rule built from --file and/or the field flags (flags win)."""
    return _run(args, _policy_add)


def cmd_policy_update(args: argparse.Namespace) -> int:
    """`policy update RULE_ID`: GET the rule, overlay the given fields, PUT it back."""
    return _run(args, _policy_update)


def cmd_policy_delete(args: argparse.Namespace) -> int:
    """`policy delete RULE_ID`."""
    return _run(args, _policy_delete)


def cmd_policy_apply(args: argparse.Namespace) -> int:
    """`policy apply FILE`: replace the whole set with the file's (PUT /policies)."""
    return _run(args, _policy_apply, APPLY_TIMEOUT)


def cmd_policy_load(args: argparse.Namespace) -> int:
    """`policy load`: the agent re-reads its own policy file; `--file F` = `policy apply F`."""
    if args.file is not None:
        args.dry_run = False
        return _run(args, _policy_apply, APPLY_TIMEOUT)
    return _run(args, _policy_load, APPLY_TIMEOUT)


def cmd_session_list(args: argparse.Namespace) -> int:
    """`session list`: live sessions, filtered by the server."""
    return _run(args, _session_list)


def cmd_stats(args: argparse.Namespace) -> int:
    """`stats`: the agent's counters (`--packets`, `--policies`: the sub-resources)."""
    return _run(args, _stats)


# --------------------------------------------------------------------------- parsers


def add_connection_args(g: Any) -> None:
    """--api, --state-dir and --token on a parser or an argument group."""
    g.add_argument(
        "--api",
        type=_api_type,
        default=parse_api_address(DEFAULT_API),
        metavar="ADDR",
        help=f"the agent's API: HOST:PORT, http://HOST:PORT or unix:/PATH (default {DEFAULT_API})",
    )
    g.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the agent's state dir, where {TOKEN_FILE} is read (default {DEFAULT_STATE_DIR})",
    )
    g.add_argument(
        "--token",
        help=f"API token (default: ${TOKEN_ENV}, else <state-dir>/{TOKEN_FILE}); "
        "visible to other users in the process list, prefer the variable",
    )


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    add_connection_args(g)
    g.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json: the API's answer unchanged",
    )
    return p


def _rule_flags(p: argparse.ArgumentParser, with_id: bool) -> None:
    g = p.add_argument_group("rule fields (SPEC §2)")
    if with_id:
        g.add_argument("--rule-id", type=_rule_id, help=f"1..{MAX_RULE_ID}, unique")
    g.add_argument("--name", help='shown in events, UI, metrics (default "")')
    g.add_argument("--src-ip", metavar="IP|CIDR|any")
    g.add_argument("--dst-ip", metavar="IP|CIDR|any")
    g.add_argument("--src-port", type=_rule_port, metavar="PORT|LO-HI", help="0 = any")
    g.add_argument("--dst-port", type=_rule_port, metavar="PORT|LO-HI", help="0 = any")
    g.add_argument("--protocol", type=str.lower, choices=PROTOCOLS)
    g.add_argument("--action", type=str.lower, choices=ACTIONS)
    g.add_argument("--priority", type=_priority, help="0..65535, higher wins (default 100)")
    g.add_argument("--direction", type=str.lower, choices=DIRECTIONS)
    p.add_argument(
        "--file",
        type=Path,
        metavar="RULE_FILE",
        help="one rule as JSON/YAML; flags given as well override its fields",
    )


def _dry_run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would change (and how many live sessions) without applying",
    )


def add_client_parsers(subparsers: Any) -> None:
    """Register `policy add|list|get|update|delete|apply|load`, `session list` and `stats` on
    an argparse subparsers object. Each leaf sets `func` to its `cmd_*` handler, which returns
    the exit status."""
    common = _common_parser()

    policy: argparse.ArgumentParser = subparsers.add_parser(
        "policy",
        help="manage the agent's rules through its API",
        description="Manage the running agent's rules through its admin API.",
    )
    psub = policy.add_subparsers(
        dest="policy_command", metavar="{add,list,get,update,delete,apply,load}"
    )
    psub.required = True

    p = psub.add_parser("list", parents=[common], help="list the rules")
    p.set_defaults(func=cmd_policy_list)

    p = psub.add_parser("get", parents=[common], help="one rule and its hit counters")
    p.add_argument("rule_id", type=_rule_id, metavar="RULE_ID")
    p.set_defaults(func=cmd_policy_get)

    p = psub.add_parser(
        "add",
        parents=[common],
        help="add one rule",
        description="Add one rule: --rule-id, --protocol and --action are "
        "required unless --file gives them.",
    )
    _rule_flags(p, with_id=True)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_policy_add)

    p = psub.add_parser(
        "update",
        parents=[common],
        help="change fields of one rule",
        description="Change the given fields of one rule; the others keep their current values.",
    )
    p.add_argument("rule_id", type=_rule_id, metavar="RULE_ID")
    _rule_flags(p, with_id=False)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_policy_update)

    p = psub.add_parser("delete", parents=[common], help="delete one rule")
    p.add_argument("rule_id", type=_rule_id, metavar="RULE_ID")
    _dry_run_flag(p)
    p.set_defaults(func=cmd_policy_delete)

    p = psub.add_parser(
        "apply",
        parents=[common],
        help="replace the whole set from a file",
        description="Replace the agent's whole policy set (and default action) "
        "with a JSON/YAML policy file, atomically.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="policy file (JSON or YAML; - = stdin)")
    _dry_run_flag(p)
    p.set_defaults(func=cmd_policy_apply)

    p = psub.add_parser(
        "load",
        parents=[common],
        help="make the agent re-read its policy file",
        description="Make the agent apply its own --policy-file again (like "
        "SIGHUP). With --file, apply that file instead (= policy apply FILE).",
    )
    p.add_argument("--file", type=Path, help="apply this file instead")
    p.set_defaults(func=cmd_policy_load)

    session: argparse.ArgumentParser = subparsers.add_parser(
        "session",
        help="the agent's live sessions",
    )
    ssub = session.add_subparsers(dest="session_command", metavar="{list}")
    ssub.required = True
    p = ssub.add_parser("list", parents=[common], help="list live sessions")
    p.add_argument("--ip", help="either end has this address")
    p.add_argument("--port", type=_filter_port, help="either end has this port")
    p.add_argument("--protocol", type=str.lower, choices=PROTOCOLS[:-1])
    p.add_argument("--verdict", type=str.lower, choices=VERDICTS)
    p.add_argument("--limit", type=_limit, help="at most this many (the agent caps it too)")
    p.set_defaults(func=cmd_session_list)

    p = subparsers.add_parser("stats", parents=[common], help="the agent's counters")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--packets", action="store_true", help="packet counters and rates")
    which.add_argument("--policies", action="store_true", help="rule hit counters and hit rate")
    p.set_defaults(func=cmd_stats)
