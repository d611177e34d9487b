"""`microseg policy add|list|get|update|delete|apply|load|export|promote|confirm`: the agent's rules
through its API.

In: the command line (see `add_policy_parser`): rule fields as flags and/or a rule or policy
file (streamer/cli/documents.py). Out: one request (two for `policy update`: GET, then PUT of
the rule with the changes overlaid) to /api/v1/policies..., its answer printed as a rule
table, the rule's fields, a readable diff (streamer/cli/output.py) or with `-o json` unchanged;
`policy export` prints the whole document (with the address groups) as `policy apply` takes it.
Writes take `--confirm SECONDS` and `--force` (streamer/cli/rollout.py); `policy confirm G`
keeps a pending change.
Exit status: 0 done, 1 the API refused or the agent could not be reached, 2 bad arguments.

The client checks only what it must to build a request (argument types, file syntax); rule
validation is the agent's, so its messages are the ones shown. The hit counters a GET returns
are never sent back.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

import yaml

from streamer.cli import argtypes
from streamer.cli.connection import Api, common_parser, expect_dict, run_command
from streamer.cli.documents import read_policy_file, read_rule_file
from streamer.cli.errors import UsageError
from streamer.cli.output import (
    RULE_FIELDS,
    cell,
    format_table,
    is_diff,
    key_values,
    list_of_dicts,
    print_json,
    render_diff,
    rules_table,
)
from streamer.cli.rollout import add_write_flags, cmd_confirm, write
from streamer.vocabulary import Action, Direction, Mode, Protocol

__all__ = [
    "APPLY_TIMEOUT",
    "add_policy_parser",
    "cmd_policy_add",
    "cmd_policy_apply",
    "cmd_policy_confirm",
    "cmd_policy_delete",
    "cmd_policy_export",
    "cmd_policy_get",
    "cmd_policy_list",
    "cmd_policy_load",
    "cmd_policy_promote",
    "cmd_policy_update",
]

# A whole-set replace of ~100k rules is validated, compiled and written to disk before the
# agent answers; that takes seconds, not milliseconds.
APPLY_TIMEOUT: Final = 120.0


# --------------------------------------------------------------------------- commands


def _rule_from_flags(args: argparse.Namespace, with_id: bool) -> dict[str, Any]:
    """The RULE fields given as flags (only those given); `rule_id` only when `with_id` (for
    update it is the positional, not a change)."""
    fields = RULE_FIELDS if with_id else RULE_FIELDS[1:]
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def _show_change(
    args: argparse.Namespace, result: Any, done: str, new_default: str | None = None
) -> None:
    """Print a write's answer: JSON as is, a diff readably, a rule as one row, else `done`."""
    if args.output == "json":
        print_json(result)
    elif is_diff(result):
        print(render_diff(result, new_default))
    elif isinstance(result, dict) and "rule_id" in result:
        print(done)
        print(rules_table([result]))
    else:
        print(done)


async def _policy_list(api: Api, args: argparse.Namespace) -> int:
    data = expect_dict(await api.call("GET", "/policies"), api, "GET /policies")
    if args.output == "json":
        print_json(data)
        return 0
    rules = list_of_dicts(data.get("policies"))
    if rules:
        print(rules_table(rules))
    _print_rollout(data)
    count = data.get("count", len(rules))
    groups = data.get("groups")
    # Only when there are groups: `group list` has them in full.
    in_groups = ""
    if isinstance(groups, dict) and groups:
        in_groups = f", {len(groups)} group{'' if len(groups) == 1 else 's'}"
    print(
        f"{count} rule{'' if count == 1 else 's'}{in_groups}, default action "
        f"{cell(data.get('default_action'))}, generation {cell(data.get('generation'))}"
    )
    return 0


def _print_rollout(listing: dict[str, Any]) -> None:
    """The agent's failsafe entries and policy mode (contract §6), as GET /policies has them
    (an agent from before them has neither: nothing is printed)."""
    entries = listing.get("failsafe")
    if isinstance(entries, list) and entries:
        print(f"failsafe (passes before any rule): {', '.join(map(cell, entries))}")
    elif isinstance(entries, list):
        print("failsafe: none (--failsafe none)")
    if listing.get("policy_mode") == "staged":
        print("policy mode: staged (--policy-mode staged: nothing is dropped)")


# What `policy export` keeps of GET /policies: the document `policy apply` takes.
_DOCUMENT_KEYS: Final = ("default_action", "groups", "policies")


async def _policy_export(api: Api, args: argparse.Namespace) -> int:
    data = expect_dict(await api.call("GET", "/policies"), api, "GET /policies")
    document = {k: data[k] for k in _DOCUMENT_KEYS if k in data}
    if args.format == "yaml":
        print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
    else:
        print_json(document)
    return 0


async def _policy_get(api: Api, args: argparse.Namespace) -> int:
    path = f"/policies/{args.rule_id}"
    data = expect_dict(await api.call("GET", path), api, f"GET {path}")
    if args.output == "json":
        print_json(data)
    else:
        shown = dict(data)
        if "last_hit" in shown and shown["last_hit"] in (None, 0):
            shown["last_hit"] = "never"
        print(key_values(shown, (*RULE_FIELDS, "packets", "bytes", "last_hit")))
    return 0


async def _policy_add(api: Api, args: argparse.Namespace) -> int:
    rule = read_rule_file(args.file) if args.file is not None else {}
    rule.update(_rule_from_flags(args, with_id=True))
    if args.file is None:
        missing = [
            f"--{f.replace('_', '-')}" for f in ("rule_id", "protocol", "action") if f not in rule
        ]
        if missing:
            raise UsageError(f"policy add: missing {', '.join(missing)} (or give --file)")
    result = await write(api, args, "POST", "/policies", rule)
    _show_change(args, result, f"added rule {rule.get('rule_id', '')}".rstrip())
    return 0


async def _policy_update(api: Api, args: argparse.Namespace) -> int:
    changes = read_rule_file(args.file) if args.file is not None else {}
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
    current = expect_dict(await api.call("GET", path), api, f"GET {path}")
    # Only RULE fields go back: the hit counters (packets, bytes, last_hit) are read-only and
    # the API rejects unknown fields.
    rule: dict[str, Any] = {f: current[f] for f in RULE_FIELDS if f in current}
    # A new address for an end replaces its group, and a new group its address.
    for end in ("src", "dst"):
        if f"{end}_ip" in changes and f"{end}_group" not in changes:
            rule.pop(f"{end}_group", None)
        if f"{end}_group" in changes and f"{end}_ip" not in changes:
            rule[f"{end}_ip"] = "any"
    rule.update(changes)
    rule["rule_id"] = args.rule_id
    result = await write(api, args, "PUT", path, rule)
    _show_change(args, result, f"updated rule {args.rule_id}")
    return 0


async def _policy_delete(api: Api, args: argparse.Namespace) -> int:
    result = await write(api, args, "DELETE", f"/policies/{args.rule_id}")
    _show_change(args, result, f"deleted rule {args.rule_id}")
    return 0


async def _policy_apply(api: Api, args: argparse.Namespace) -> int:
    document = read_policy_file(args.file)
    result = await write(api, args, "PUT", "/policies", document)
    default = document.get("default_action")
    _show_change(
        args, result, f"applied {args.file}", default if isinstance(default, str) else None
    )
    return 0


async def _policy_promote(api: Api, args: argparse.Namespace) -> int:
    ids = list(dict.fromkeys(args.rule_ids))
    if len(ids) == 1:
        path, body = f"/policies/{ids[0]}/promote", None
    else:
        path, body = "/policies/promote", {"rule_ids": ids}
    result = expect_dict(await write(api, args, "POST", path, body), api, f"POST {path}")
    if args.output == "json":
        print_json(result)
        return 0
    if args.dry_run:
        print(f"would promote {len(ids)} rule{'' if len(ids) == 1 else 's'} (dry run)")
    else:
        print(f"promoted, generation {cell(result.get('generation'))}")
    print("what they decided while staged:")
    rows = [
        [cell(p.get(k)) for k in ("rule_id", "staged_flows", "staged_packets", "staged_bytes")]
        for p in list_of_dicts(result.get("promoted"))
    ]
    print(format_table(("ID", "FLOWS", "PACKETS", "BYTES"), rows, right=(0, 1, 2, 3)))
    if args.dry_run and is_diff(result):
        print(render_diff(result))
    return 0


async def _policy_load(api: Api, args: argparse.Namespace) -> int:
    result = await write(api, args, "POST", "/policies/reload")
    if args.output == "json":
        print_json(result)
    elif is_diff(result):
        print("reloaded the agent's policy file")
        print(render_diff(result))
    elif isinstance(result, dict) and result:
        print("reloaded the agent's policy file")
        print(key_values(result))
    else:
        print("reloaded the agent's policy file")
    return 0


def cmd_policy_confirm(args: argparse.Namespace) -> int:
    """`policy confirm GENERATION`: keep a change made with --confirm (or confirm_within)."""
    return run_command(args, cmd_confirm)


def cmd_policy_export(args: argparse.Namespace) -> int:
    """`policy export`: the whole document (default action, groups, rules) for `policy apply`."""
    return run_command(args, _policy_export, APPLY_TIMEOUT)


def cmd_policy_list(args: argparse.Namespace) -> int:
    """`policy list`: every rule, the default action and the generation."""
    return run_command(args, _policy_list)


def cmd_policy_get(args: argparse.Namespace) -> int:
    """`policy get RULE_ID`: one rule with its hit counters."""
    return run_command(args, _policy_get)


def cmd_policy_add(args: argparse.Namespace) -> int:
    """`policy add`: POST one rule built from --file and/or the field flags (flags win)."""
    return run_command(args, _policy_add)


def cmd_policy_update(args: argparse.Namespace) -> int:
    """`policy update RULE_ID`: GET the rule, overlay the given fields, PUT it back."""
    return run_command(args, _policy_update)


def cmd_policy_delete(args: argparse.Namespace) -> int:
    """`policy delete RULE_ID`."""
    return run_command(args, _policy_delete)


def cmd_policy_apply(args: argparse.Namespace) -> int:
    """`policy apply FILE`: replace the whole set with the file's (PUT /policies)."""
    return run_command(args, _policy_apply, APPLY_TIMEOUT)


def cmd_policy_promote(args: argparse.Namespace) -> int:
    """`policy promote RULE_ID...`: staged rules enforced, in one generation."""
    return run_command(args, _policy_promote)


def cmd_policy_load(args: argparse.Namespace) -> int:
    """`policy load`: the agent re-reads its own policy file; `--file F` = `policy apply F`."""
    if args.file is not None:
        args.dry_run = False
        return run_command(args, _policy_apply, APPLY_TIMEOUT)
    return run_command(args, _policy_load, APPLY_TIMEOUT)


# --------------------------------------------------------------------------- parser

_generation = argtypes.bounded_int(1, None, "a policy generation (an int >= 1)", digits=True)


def _rule_flags(p: argparse.ArgumentParser, with_id: bool) -> None:
    g = p.add_argument_group("rule fields (docs/contract.md §2)")
    if with_id:
        g.add_argument(
            "--rule-id", type=argtypes.rule_id, help=f"1..{argtypes.MAX_RULE_ID}, unique"
        )
    g.add_argument("--name", help='shown in events, UI, metrics (default "")')
    g.add_argument("--src-ip", metavar="IP|CIDR|any")
    g.add_argument("--dst-ip", metavar="IP|CIDR|any")
    g.add_argument(
        "--src-group",
        type=argtypes.group_name,
        metavar="GROUP",
        help="an address group in place of --src-ip (docs/contract.md §5)",
    )
    g.add_argument(
        "--dst-group",
        type=argtypes.group_name,
        metavar="GROUP",
        help="an address group in place of --dst-ip",
    )
    g.add_argument("--src-port", type=argtypes.rule_port, metavar="PORT|LO-HI", help="0 = any")
    g.add_argument("--dst-port", type=argtypes.rule_port, metavar="PORT|LO-HI", help="0 = any")
    g.add_argument("--protocol", type=str.lower, choices=[p.value for p in Protocol])
    g.add_argument("--action", type=str.lower, choices=[a.value for a in Action])
    g.add_argument("--priority", type=argtypes.priority, help="0..65535, higher wins (default 100)")
    g.add_argument("--direction", type=str.lower, choices=[d.value for d in Direction])
    g.add_argument(
        "--mode",
        type=str.lower,
        choices=[m.value for m in Mode],
        help="staged: judged and reported, deciding nothing (default enforce; docs/contract.md §6)",
    )
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
    add_write_flags(p)


def add_policy_parser(subparsers: Any) -> None:
    """Register `policy add|list|get|update|delete|apply|load|export` on the `microseg`
    subparsers.
    Each leaf sets `func` to its `cmd_*` handler, which returns the exit status."""
    common = common_parser()

    policy: argparse.ArgumentParser = subparsers.add_parser(
        "policy",
        help="manage the agent's rules through its API",
        description="Manage the running agent's rules through its admin API.",
    )
    psub = policy.add_subparsers(
        dest="policy_command", metavar="{add,list,get,update,delete,apply,load,export,confirm}"
    )
    psub.required = True

    p = psub.add_parser("list", parents=[common], help="list the rules")
    p.set_defaults(func=cmd_policy_list)

    p = psub.add_parser(
        "export",
        parents=[common],
        help="print the whole policy document (for policy apply)",
        description="Print the applied set as a policy document (default_action, groups, "
        "policies): `microseg policy apply` takes it back unchanged.",
    )
    p.add_argument("--format", choices=("json", "yaml"), default="json")
    p.set_defaults(func=cmd_policy_export)

    p = psub.add_parser("get", parents=[common], help="one rule and its hit counters")
    p.add_argument("rule_id", type=argtypes.rule_id, metavar="RULE_ID")
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
        description="Change the given fields of one rule; the others keep their current values "
        "(except that a new --src-ip replaces a source group, a new --src-group a source "
        "address, and likewise for dst).",
    )
    p.add_argument("rule_id", type=argtypes.rule_id, metavar="RULE_ID")
    _rule_flags(p, with_id=False)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_policy_update)

    p = psub.add_parser("delete", parents=[common], help="delete one rule")
    p.add_argument("rule_id", type=argtypes.rule_id, metavar="RULE_ID")
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
        "promote",
        parents=[common],
        help="enforce staged rules",
        description="Turn staged rules into enforced ones, all in one generation; prints "
        "what each decided while staged (flows, packets, bytes).",
    )
    p.add_argument("rule_ids", type=argtypes.rule_id, nargs="+", metavar="RULE_ID")
    _dry_run_flag(p)
    p.set_defaults(func=cmd_policy_promote)

    p = psub.add_parser(
        "load",
        parents=[common],
        help="make the agent re-read its policy file",
        description="Make the agent apply its own --policy-file again (like "
        "SIGHUP). With --file, apply that file instead (= policy apply FILE).",
    )
    p.add_argument("--file", type=Path, help="apply this file instead")
    add_write_flags(p)
    p.set_defaults(func=cmd_policy_load)

    p = psub.add_parser(
        "confirm",
        parents=[common],
        help="keep a change made with --confirm",
        description="Keep the pending change of GENERATION (made with --confirm SECONDS or "
        "?confirm_within): without this the agent reverts it at its deadline.",
    )
    p.add_argument("generation", type=_generation, metavar="GENERATION")
    p.set_defaults(func=cmd_policy_confirm)
