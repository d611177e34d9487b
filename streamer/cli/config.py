"""`microseg run --config FILE`: a TOML file of `run`'s flags, as defaults under the command line.

In: the path of a TOML file with flat keys named as `run`'s flags without `--`
(`policy-file = "/etc/microseg/policy.json"`, `iface = ["eth0"]`, `keep-on-exit = true`) and
the `run` subparser whose actions say what each key takes. Out: a RunConfig whose `apply()`
makes the validated values the parser's defaults (a required flag the file gives is no longer
required) and whose `fill()` puts the file's lists into the parsed namespace where the command
line gave none. A flag on the command line replaces its key; for a repeatable flag the command
line's list replaces the file's (they are never merged). Relative paths are taken relative to
the file's directory (a service's working directory is /).

Nothing is dropped: an unknown key, a table, or a value of the wrong type is a ConfigError
naming the file, the key and what it expects, raised before anything attaches. Values go through
the same argparse types (streamer/cli/argtypes.py) and choices the flags use.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "RunConfig", "config_path_in", "load_run_config"]

# Keys that are flags of `run` but make no sense in the file.
_NOT_KEYS = {"help", "config"}


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and, if any, the key."""


def _kind(value: object) -> str:
    """How a TOML value reads in an error message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


@dataclass
class RunConfig:
    """The validated keys of one config file: dest -> value, as argparse would have parsed it."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    lists: dict[str, list[Any]] = field(default_factory=dict)  # repeatable flags' values

    def apply(self, run_parser: argparse.ArgumentParser) -> None:
        """Make the file's values `run_parser`'s defaults. Repeatable flags the file gives get
        a None default (filled by `fill` unless the command line appends its own list), and
        what the file gives is not required on the command line any more."""
        run_parser.set_defaults(**self.values, **dict.fromkeys(self.lists))
        for action in run_parser._actions:
            if action.dest in self.values or action.dest in self.lists:
                action.required = False

    def fill(self, args: argparse.Namespace) -> None:
        """The file's lists where the command line gave none of that flag."""
        for dest, items in self.lists.items():
            if getattr(args, dest, None) is None:
                setattr(args, dest, list(items))


def _convert(path: Path, key: str, action: argparse.Action, raw: object) -> Any:
    """One scalar value of `key` as the flag's type and choices make it; ConfigError if not."""
    where = f"{path}: key {key!r}"
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ConfigError(f"{where}: expected {_expects(action)}, got {_kind(raw)}")
    if not isinstance(raw, str) and action.type in (None, str, Path):
        raise ConfigError(f"{where}: expected {_expects(action)}, got {_kind(raw)}")
    text = str(raw)
    value: Any = text
    if action.type is Path:
        p = Path(text).expanduser()
        value = p if p.is_absolute() else path.parent / p
    elif callable(action.type):
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{where}: {text!r} is not one of {choices}")
    return value


def _expects(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "true or false"
    if isinstance(action, argparse._AppendAction):
        return f"a list, each item {_expects_one(action)} (a repeatable flag)"
    return _expects_one(action)


def _expects_one(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(repr(c) for c in action.choices)
    if action.type in (None, str):
        return "a string"
    if action.type is Path:
        return "a path (a string)"
    flag = next(o for o in action.option_strings if o.startswith("--"))
    metavar = action.metavar if isinstance(action.metavar, str) else None
    return f"what {flag} takes" + (f" ({metavar})" if metavar else "")


def _keys(run_parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """key (the long flag without --) -> its action, for every flag of `run`."""
    keys: dict[str, argparse.Action] = {}
    for action in run_parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt[2:] not in _NOT_KEYS:
                keys[opt[2:]] = action
    return keys


def load_run_config(path: Path, run_parser: argparse.ArgumentParser) -> RunConfig:
    """Read and validate `path` against `run_parser`'s flags; ConfigError on any problem."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    keys = _keys(run_parser)
    config = RunConfig(path)
    for key, raw in doc.items():
        action = keys.get(key)
        if action is None:
            hint = difflib.get_close_matches(key, keys, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{path}: unknown key {key!r}{also}; the keys are `microseg run`'s flags without --"
            )
        where = f"{path}: key {key!r}"
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if not isinstance(raw, bool):
                raise ConfigError(f"{where}: expected true or false, got {_kind(raw)}")
            # store_false flags store False when given: the key says whether it is given.
            config.values[action.dest] = raw == isinstance(action, argparse._StoreTrueAction)
        elif isinstance(action, argparse._AppendAction):
            if not isinstance(raw, list):
                raise ConfigError(f"{where}: expected {_expects(action)}, got {_kind(raw)}")
            config.lists[action.dest] = [_convert(path, key, action, item) for item in raw]
        else:
            config.values[action.dest] = _convert(path, key, action, raw)
    return config


def config_path_in(argv: Sequence[str]) -> Path | None:
    """The FILE of `run --config FILE` (or `--config=FILE`) in a `microseg` command line, or
    None when the command is not `run` or names no config. Only the global flags (-v) may come
    before `run`; a `--config` after `--` is an argument, not the flag."""
    i = 0
    while i < len(argv) and argv[i] in ("-v", "--verbose"):
        i += 1
    if i >= len(argv) or argv[i] != "run":
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    rest = list(argv[i + 1 :])
    if "--" in rest:
        rest = rest[: rest.index("--")]
    known, _ = pre.parse_known_args(rest)
    config: Path | None = known.config
    return config
