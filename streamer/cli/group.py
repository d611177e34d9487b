"""`microseg group list|get|set|add|remove|delete`: the agent's address groups through its API
(docs/contract.md §5).

In: the command line (see `add_group_parser`): a group name and members as arguments and/or
`--file` (streamer/cli/documents.py `read_members`). Out: one request to /api/v1/groups...,
its answer printed as a table, the group's members one a line, a sentence saying what changed
(and what did not: members already in a group, or not in it) or with `-o json` unchanged.
Exit status: 0 done, 1 the API refused or the agent could not be reached, 2 bad arguments.

The client checks only the group name (it goes into the URL) and the file's syntax; member
validation is the agent's, so its messages are the ones shown. Writes take `--confirm SECONDS`
and `--force` (streamer/cli/rollout.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streamer.cli import argtypes
from streamer.cli.connection import Api, common_parser, expect_dict, run_command
from streamer.cli.documents import read_members
from streamer.cli.errors import UsageError
from streamer.cli.output import cell, format_table, key_values, list_of_dicts, print_json
from streamer.cli.policy import APPLY_TIMEOUT
from streamer.cli.rollout import add_write_flags, write

__all__ = [
    "add_group_parser",
    "cmd_group_add",
    "cmd_group_delete",
    "cmd_group_get",
    "cmd_group_list",
    "cmd_group_remove",
    "cmd_group_set",
]


def _members(args: argparse.Namespace, what: str, allow_none: bool = False) -> list[Any]:
    members: list[Any] = list(args.members)
    if args.file is not None:
        members += read_members(args.file)
    if not members and not allow_none:
        raise UsageError(f"group {what}: give members as arguments or --file")
    return members


def _rules_text(rules: Any) -> str:
    if not isinstance(rules, list) or not rules:
        return "no rule uses it"
    return "used by rule" + ("s " if len(rules) > 1 else " ") + ", ".join(map(str, rules))


def _some(members: list[Any], limit: int = 10) -> str:
    items = [str(m) for m in members]
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _count(n: int) -> str:
    return f"{n} member" if n == 1 else f"{n} members"


def _show_change(args: argparse.Namespace, result: Any) -> None:
    """A group write's answer: JSON as is, else what changed (and what did not) in lines."""
    if args.output == "json":
        print_json(result)
        return
    if not isinstance(result, dict):
        print("done")
        return
    name = cell(result.get("name"))
    dry = bool(result.get("dry_run"))
    lines = []
    if dry:
        gen = cell(result.get("generation"))
        lines.append(f"dry run against generation {gen}: nothing was applied")
    added = _list_of(result.get("members_added"))
    removed = _list_of(result.get("members_removed"))
    unchanged = _list_of(result.get("members_unchanged"))
    if result.get("deleted"):
        verb = "would be deleted" if dry else "deleted"
        lines.append(f"group {name} {verb} (it had {_count(len(removed))})")
    elif result.get("created"):
        verb = "would be created" if dry else "created"
        lines.append(f"group {name} {verb} with {_count(len(added))}")
    else:
        for items, done in ((added, "added"), (removed, "removed")):
            if items:
                verb = f"would be {done}" if dry else done
                lines.append(f"{_count(len(items))} {verb}: {_some(items)}")
        if unchanged:
            where = "already in" if args.group_command == "add" else "not in"
            lines.append(
                f"{_count(len(unchanged))} changed nothing ({where} group {name}): "
                + _some(unchanged)
            )
        if not (added or removed):
            lines.append(f"group {name}: no change")
    tail = f"group {name}: {cell(result.get('member_count'))} members, "
    tail += _rules_text(result.get("rules"))
    if not dry:
        tail += f"; generation {cell(result.get('generation'))}"
    lines.append(tail)
    if dry and "sessions_checked" in result:
        lines.append(
            f"{cell(result.get('sessions_changing_verdict'))} of "
            f"{cell(result.get('sessions_checked'))} live sessions would change verdict"
        )
    print("\n".join(lines))


def _list_of(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


async def _group_list(api: Api, args: argparse.Namespace) -> int:
    data = expect_dict(await api.call("GET", "/groups"), api, "GET /groups")
    if args.output == "json":
        print_json(data)
        return 0
    groups = list_of_dicts(data.get("groups"))
    if groups:
        rows = [
            [
                cell(g.get("name")),
                cell(g.get("member_count")),
                ",".join(map(str, g.get("rules") or [])) or "-",
            ]
            for g in groups
        ]
        print(format_table(("NAME", "MEMBERS", "RULES"), rows, right=(1,)))
    count = data.get("count", len(groups))
    print(f"{count} group{'' if count == 1 else 's'}")
    return 0


async def _group_get(api: Api, args: argparse.Namespace) -> int:
    path = f"/groups/{args.name}"
    data = expect_dict(await api.call("GET", path), api, f"GET {path}")
    if args.output == "json":
        print_json(data)
        return 0
    shown = {k: v for k, v in data.items() if k != "members"}
    shown["rules"] = ",".join(map(str, data.get("rules") or [])) or "-"
    print(key_values(shown, ("name", "member_count", "rules")))
    members = data.get("members")
    if isinstance(members, list) and members:
        print("members:")
        print("\n".join(f"  {m}" for m in members))
    return 0


async def _group_set(api: Api, args: argparse.Namespace) -> int:
    body = {"members": _members(args, "set", allow_none=True)}
    result = await write(api, args, "PUT", f"/groups/{args.name}", body)
    _show_change(args, result)
    return 0


async def _group_add(api: Api, args: argparse.Namespace) -> int:
    body = {"members": _members(args, "add")}
    path = f"/groups/{args.name}/members"
    result = await write(api, args, "POST", path, body)
    _show_change(args, result)
    return 0


async def _group_remove(api: Api, args: argparse.Namespace) -> int:
    body = {"members": _members(args, "remove")}
    path = f"/groups/{args.name}/members"
    result = await write(api, args, "DELETE", path, body)
    _show_change(args, result)
    return 0


async def _group_delete(api: Api, args: argparse.Namespace) -> int:
    result = await write(api, args, "DELETE", f"/groups/{args.name}")
    _show_change(args, result)
    return 0


def cmd_group_list(args: argparse.Namespace) -> int:
    """`group list`: every group, its member count and the rules using it."""
    return run_command(args, _group_list)


def cmd_group_get(args: argparse.Namespace) -> int:
    """`group get NAME`: one group's members and the rules using it."""
    return run_command(args, _group_get)


def cmd_group_set(args: argparse.Namespace) -> int:
    """`group set NAME [MEMBER ...] [--file F]`: create the group or replace its members."""
    return run_command(args, _group_set, APPLY_TIMEOUT)


def cmd_group_add(args: argparse.Namespace) -> int:
    """`group add NAME MEMBER ... [--file F]`."""
    return run_command(args, _group_add, APPLY_TIMEOUT)


def cmd_group_remove(args: argparse.Namespace) -> int:
    """`group remove NAME MEMBER ... [--file F]`."""
    return run_command(args, _group_remove, APPLY_TIMEOUT)


def cmd_group_delete(args: argparse.Namespace) -> int:
    """`group delete NAME`: refused while a rule uses the group."""
    return run_command(args, _group_delete)


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", type=argtypes.group_name, metavar="NAME", help="the group's name")


def _member_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("members", nargs="*", metavar="MEMBER", help="address or CIDR")
    p.add_argument(
        "--file",
        type=Path,
        metavar="FILE",
        help="more members: one a line (# comments), or a JSON/YAML list or "
        '{"members": [...]}; - = stdin',
    )


def _dry_run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would change (and how many live sessions) without applying",
    )
    add_write_flags(p)


def add_group_parser(subparsers: Any) -> None:
    """Register `group list|get|set|add|remove|delete` on the `microseg` subparsers. Each leaf
    sets `func` to its `cmd_*` handler, which returns the exit status."""
    common = common_parser()
    group: argparse.ArgumentParser = subparsers.add_parser(
        "group",
        help="manage the agent's address groups through its API",
        description="Manage the running agent's address groups (rules name them in "
        "src_group/dst_group) through its admin API.",
    )
    gsub = group.add_subparsers(dest="group_command", metavar="{list,get,set,add,remove,delete}")
    gsub.required = True

    p = gsub.add_parser("list", parents=[common], help="list the groups")
    p.set_defaults(func=cmd_group_list)

    p = gsub.add_parser("get", parents=[common], help="one group's members")
    _name(p)
    p.set_defaults(func=cmd_group_get)

    p = gsub.add_parser(
        "set",
        parents=[common],
        help="create a group or replace its members",
        description="Create the group, or replace all its members, with the members given "
        "(none: an empty group, which matches nothing).",
    )
    _name(p)
    _member_args(p)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_group_set)

    p = gsub.add_parser(
        "add",
        parents=[common],
        help="add members to a group",
        description="Add members; those already in the group change nothing.",
    )
    _name(p)
    _member_args(p)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_group_add)

    p = gsub.add_parser(
        "remove",
        parents=[common],
        help="remove members from a group",
        description="Remove members; those not in the group change nothing.",
    )
    _name(p)
    _member_args(p)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_group_remove)

    p = gsub.add_parser(
        "delete",
        parents=[common],
        help="delete a group",
        description="Delete a group; refused while a rule uses it.",
    )
    _name(p)
    _dry_run_flag(p)
    p.set_defaults(func=cmd_group_delete)
