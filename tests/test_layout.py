"""The kernel-Python contract (streamer/datapath/layout.py) against bpf/classifier.h itself.

The header's `#define MS_*` values and `enum ms_counter` (explicit and implicit values) are
parsed from its text; struct sizes and field offsets, and the TC actions, come from gcc
compiling the header. Every mismatch is reported by name. No root, no kernel: a C compiler.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from streamer.datapath import layout
from streamer.datapath.layout import (
    C_DIR_VERDICT,
    C_MAX,
    COUNTER_NAMES,
    DIRECTION_NAMES,
    EVENT,
    EVENT_KIND_NAMES,
    EVENT_META,
    EVENT_META_FAMILY,
    EVENT_ROW,
    STRUCTS,
    TCP_STATE_NAMES,
    VERDICT_NAMES,
    CStruct,
    dir_verdict_counter,
)

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "bpf" / "classifier.h"


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _eval(expr: str, known: dict[str, int]) -> int:
    """A C integer constant expression of literals, names already defined, + - * << >> |."""
    expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expr.strip())

    def ev(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            ops = {
                ast.Add: int.__add__,
                ast.Sub: int.__sub__,
                ast.Mult: int.__mul__,
                ast.LShift: int.__lshift__,
                ast.RShift: int.__rshift__,
                ast.BitOr: int.__or__,
            }
            op = ops.get(type(node.op))
            if op is not None:
                return op(ev(node.left), ev(node.right))
        raise ValueError(f"cannot evaluate {expr!r} (at {ast.dump(node)})")

    return ev(ast.parse(expr, mode="eval").body)


def header_defines(text: str) -> dict[str, int]:
    """`#define MS_NAME value` of the header, evaluated."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^\s*#define\s+(MS_\w+)[ \t]+([^\n]+)$", _strip_comments(text), re.M):
        out[m[1]] = _eval(m[2], out)
    return out


def header_enum(text: str, name: str) -> dict[str, int]:
    """The members of `enum name`, with C's implicit values (previous + 1, from 0)."""
    m = re.search(rf"enum\s+{name}\s*\{{(.*?)\}}\s*;", _strip_comments(text), re.S)
    assert m, f"no enum {name} in {HEADER}"
    out: dict[str, int] = {}
    value = -1
    for item in (i.strip() for i in m[1].split(",")):
        if not item:
            continue
        member, _, expr = (p.strip() for p in item.partition("="))
        value = _eval(expr, out) if expr else value + 1
        out[member] = value
    return out


def header_structs(text: str) -> list[str]:
    return re.findall(r"^struct\s+(ms_\w+)\s*\{", _strip_comments(text), re.M)


def _mismatches(c_side: dict[str, int], prefix: str) -> list[str]:
    out = []
    for name, value in c_side.items():
        if not hasattr(layout, name):
            out.append(f"{name}: bpf/classifier.h has {value}, layout.py does not define it")
        elif getattr(layout, name) != value:
            out.append(f"{name}: layout.py has {getattr(layout, name)}, bpf/classifier.h {value}")
    for name in dir(layout):
        if re.fullmatch(rf"{prefix}[A-Z0-9_]+", name) and name not in c_side:
            out.append(f"{name}: in layout.py ({getattr(layout, name)}), not in bpf/classifier.h")
    return out


def test_defines_match_the_header() -> None:
    bad = _mismatches(header_defines(HEADER.read_text()), "MS_")
    assert not bad, "layout.py and bpf/classifier.h disagree:\n" + "\n".join(bad)


def test_counter_indexes_match_enum_ms_counter() -> None:
    bad = _mismatches(header_enum(HEADER.read_text(), "ms_counter"), "C_")
    assert not bad, "layout.py and enum ms_counter disagree:\n" + "\n".join(bad)


def test_every_counter_has_one_name() -> None:
    """Each named counter of the enum is reported under one name, and none of them lies in
    the block of packets by direction and verdict."""
    enum = header_enum(HEADER.read_text(), "ms_counter")
    named = {v: k for k, v in enum.items() if k not in ("C_DIR_VERDICT", "C_MAX")}
    by_index: dict[int, str] = {}
    for n, i in COUNTER_NAMES.items():
        assert i not in by_index, f"counter {i}: two names in COUNTER_NAMES, {by_index[i]}, {n}"
        by_index[i] = n
    missing = [f"{named[i]} ({i})" for i in sorted(set(named) - set(by_index))]
    assert not missing, f"counters without a name in COUNTER_NAMES: {missing}"
    unknown = [f"{by_index[i]} ({i})" for i in sorted(set(by_index) - set(named))]
    assert not unknown, f"COUNTER_NAMES entries that are no enum ms_counter member: {unknown}"
    block = {dir_verdict_counter(d, v) for d in DIRECTION_NAMES for v in VERDICT_NAMES}
    assert min(block) == C_DIR_VERDICT and max(block) < C_MAX
    assert not block & set(by_index), "a named counter inside the direction/verdict block"


def test_name_tables_cover_the_header_codes() -> None:
    defines = header_defines(HEADER.read_text())

    def codes(prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: v for k, v in defines.items() if k.startswith(prefix)}

    assert {v: k for k, v in codes("MS_DIR_").items()} == {
        c: n.upper() for c, n in DIRECTION_NAMES.items()
    }
    assert {v: k for k, v in codes("MS_EV_").items()} == {
        c: n.upper() for c, n in EVENT_KIND_NAMES.items()
    }
    assert {v: k for k, v in codes("MS_TCP_").items()} == TCP_STATE_NAMES
    flow_verdicts = {k: v for k, v in defines.items() if k in ("MS_ALLOW", "MS_DENY", "MS_LOG")}
    assert {v: k[3:].lower() for k, v in flow_verdicts.items()} == VERDICT_NAMES


# ---- sizes and offsets, from gcc ------------------------------------------------------------


def _c_program(structs: tuple[CStruct, ...]) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/types.h>",
        "#include <linux/pkt_cls.h>",
        '#include "classifier.h"',
        "int main(void) {",
        '    printf("D TC_ACT_OK %d\\n", TC_ACT_OK);',
        '    printf("D TC_ACT_SHOT %d\\n", TC_ACT_SHOT);',
    ]
    for s in structs:
        t = f"struct {s.c_name}"
        lines.append(f'    printf("S {s.c_name} %zu\\n", sizeof({t}));')
        for name, _ in s.fields:
            lines.append(
                f'    printf("F {s.c_name} {name} %zu %zu\\n", offsetof({t}, {name}),'
                f" sizeof((({t} *)0)->{name}));"
            )
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def from_gcc(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """The compiled program's lines, split: D name value / S struct size / F struct field
    offset size."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to check layout.py against bpf/classifier.h"
    tmp = tmp_path_factory.mktemp("layout")
    src, exe = tmp / "layout.c", tmp / "layout"
    src.write_text(_c_program(STRUCTS))
    built = subprocess.run(
        [gcc, "-Wall", "-Werror", f"-I{HEADER.parent}", str(src), "-o", str(exe)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # A field layout.py names that the header lacks (or a struct) fails here, named by gcc.
    assert built.returncode == 0, f"layout.py names what bpf/classifier.h lacks:\n{built.stderr}"
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10)
    return [line.split() for line in out.stdout.splitlines()]


def test_every_header_struct_is_in_the_layout() -> None:
    missing = set(header_structs(HEADER.read_text())) - {s.c_name for s in STRUCTS}
    assert not missing, f"structs of bpf/classifier.h without a layout.py CStruct: {missing}"


def test_struct_sizes_and_offsets_match_gcc(from_gcc: list[list[str]]) -> None:
    by_name = {s.c_name: s for s in STRUCTS}
    bad = []
    for row in from_gcc:
        if row[0] == "S":
            s = by_name[row[1]]
            if s.size != int(row[2]):
                bad.append(f"struct {s.c_name}: layout.py {s.size} bytes, gcc {row[2]}")
        elif row[0] == "F":
            s, field = by_name[row[1]], row[2]
            py = (s.offset(field), s.field_size(field))
            c = (int(row[3]), int(row[4]))
            if py != c:
                bad.append(
                    f"{s.c_name}.{field}: layout.py at {py[0]} ({py[1]} bytes), gcc at {c[0]}"
                    f" ({c[1]} bytes)"
                )
    assert not bad, "layout.py and bpf/classifier.h (gcc) disagree:\n" + "\n".join(bad)


def test_tc_actions_match_linux_pkt_cls(from_gcc: list[list[str]]) -> None:
    c = {row[1]: int(row[2]) for row in from_gcc if row[0] == "D"}
    assert c == {"TC_ACT_OK": layout.TC_ACT_OK, "TC_ACT_SHOT": layout.TC_ACT_SHOT}


def test_event_views_read_the_event() -> None:
    """The pipeline's grouped reading of ms_event covers the same bytes field for field."""
    assert EVENT_ROW.size == EVENT.size
    row = EVENT_ROW.unpack(bytes(range(EVENT.size)))
    meta, tail = row[3], row[8]
    assert meta[0] == EVENT.offset("ifindex") and len(meta) == EVENT_META.size
    assert meta[EVENT_META_FAMILY] == EVENT.offset("family")
    assert tail[0] == EVENT.offset("tcp_flags") and tail[-1] == EVENT.size - 1
    raw = bytes(range(EVENT.size))
    fields = EVENT.as_dict(raw)
    assert EVENT_META.unpack(meta) == tuple(
        fields[f] for f in ("ifindex", "rule_id", "gen", "family", "proto", "direction", "verdict")
    )
    assert (row[0], row[1], row[2], row[6], row[7]) == tuple(
        fields[f] for f in ("ts", "packets", "bytes", "sport", "dport")
    )
    assert (row[4], row[5]) == (fields["src"], fields["dst"])
