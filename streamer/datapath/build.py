"""Compiling the classifier with bcc, in a process of its own: the only import of bcc.

In (command line): the cache directory, the artifact's key and the size defines (-D flags),
as streamer.datapath.loader passes them:

    python -m streamer.datapath.build --cache-dir DIR --key KEY -- -DMS_MAX_SHAPES=512 ...

Out: the artifact (streamer.datapath.artifact) written into the cache directory, its path and
the compile time as one JSON line on stdout; exit status 1 and the reason on stderr if bcc
fails. bcc compiles bpf/classifier.c as the loader always did, and from its module we take
each program's instructions (`dump_func`: map references are ld_imm64 instructions holding
bcc's map fds, which we turn into relocations by name), each map's definition as the kernel
reports it, which maps are pinned and where (relative to the pin directory), and the inner map
of each map of maps (named in the source: BPF_ARRAY_OF_MAPS(name, "inner", n)).

Nothing of this process outlives it. bcc creates the BPF_TABLE_PINNED maps and pins them: the
pin directory is a bpffs mounted in a mount namespace of this process alone, so the pins go
with the process however it ends (where no mount namespace can be made, a directory under
/sys/fs/bpf that we remove). The maps die with bcc's fds when the process exits; no program is
loaded or attached.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streamer.datapath import artifact
from streamer.datapath.artifact import (
    BPF_DIR,
    BPF_LD_IMM64,
    BPF_PSEUDO_MAP_FD,
    FIXED_CFLAGS,
    INSN_SIZE,
    SOURCE,
    Artifact,
    MapDef,
    Program,
)
from streamer.datapath.bindings import libbpf, map_info
from streamer.datapath.config import DatapathError
from streamer.datapath.loader import PROGRAMS, ensure_bpffs, remove_tree

_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
# What a new bpffs holds from the start (the kernel's bpf_preload iterators): no pin of bcc's.
_PRELOADED = {"maps.debug", "progs.debug"}
# bcc's map-of-maps declarations name their inner map: the macro, or the table type it makes.
_OF_MAPS = re.compile(
    r'BPF_(?:ARRAY|HASH)_OF_MAPS\s*\(\s*(\w+)\s*,\s*"(\w+)"'
    r'|BPF_TABLE\s*\(\s*"(?:array|hash)_of_maps\$(\w+)"\s*,[^,]*,[^,]*,\s*(\w+)'
)


@contextlib.contextmanager
def _private_bpffs() -> Iterator[Path]:
    """A pin directory no one else sees and nothing outlives."""
    libc = ct.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_ulong, ct.c_void_p]
    tmp = Path(tempfile.mkdtemp(prefix=f"microseg-build-{os.getpid()}-"))
    try:
        if (
            libc.unshare(_CLONE_NEWNS) == 0
            and libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
            and libc.mount(b"bpf", str(tmp).encode(), b"bpf", 0, None) == 0
        ):
            try:
                yield tmp
            finally:
                libc.umount2(str(tmp).encode(), _MNT_DETACH)
            return
        ensure_bpffs()
        # bpffs refuses names with a dot (reserved by the kernel): no hidden-file name here.
        shared = Path("/sys/fs/bpf") / f"microseg-build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        shared.mkdir()
        try:
            yield shared
        finally:
            remove_tree(shared)
    finally:
        tmp.rmdir()


def _inner_maps(source: str) -> dict[str, str]:
    """map of maps -> its inner map, as the source declares them."""
    out: dict[str, str] = {}
    for m in _OF_MAPS.finditer(source):
        if m[1]:
            out[m[1]] = m[2]
        else:
            out[m[4]] = m[3]
    return out


def _relocations(name: str, code: bytes, by_fd: dict[int, str]) -> tuple[bytes, list[list[Any]]]:
    """The instructions with map fds zeroed, and (index, map name) of each reference."""
    out = bytearray(code)
    relocs: list[list[Any]] = []
    i, n = 0, len(code) // INSN_SIZE
    while i < n:
        op, regs = code[i * INSN_SIZE], code[i * INSN_SIZE + 1]
        if op != BPF_LD_IMM64:
            i += 1
            continue
        src = regs >> 4
        if src == BPF_PSEUDO_MAP_FD:
            fd = int.from_bytes(code[i * INSN_SIZE + 4 : i * INSN_SIZE + 8], "little", signed=True)
            if fd not in by_fd:
                raise DatapathError(f"program {name}: instruction {i} references fd {fd}, no map")
            relocs.append([i, by_fd[fd]])
            out[i * INSN_SIZE + 4 : i * INSN_SIZE + 8] = bytes(4)
        elif src != 0:
            raise DatapathError(f"program {name}: instruction {i} is an ld_imm64 of kind {src}")
        i += 2
    return bytes(out), relocs


def _table_fds(bpf: Any) -> dict[str, int]:
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ct.c_size_t
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
    lib.bpf_table_fd_id.restype = ct.c_int
    lib.bpf_table_fd_id.argtypes = [ct.c_void_p, ct.c_size_t]
    out: dict[str, int] = {}
    for i in range(lib.bpf_num_tables(bpf.module)):
        out[lib.bpf_table_name(bpf.module, i).decode()] = int(lib.bpf_table_fd_id(bpf.module, i))
    return out


def build(key: str, defines: list[str]) -> Artifact:
    """Compile with bcc and describe what it made (see the module's docstring)."""
    from bcc import BPF
    from bcc.libbcc import lib

    source = (BPF_DIR / SOURCE).read_text(encoding="utf-8")
    inner = _inner_maps(source)
    with _private_bpffs() as pin:
        cflags = [f"-I{BPF_DIR}", f'-DMS_PIN="{pin}"', *defines, *FIXED_CFLAGS]
        try:
            bpf = BPF(src_file=str(BPF_DIR / SOURCE), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception
            raise DatapathError(f"compiling the classifier failed: {e}") from e
        tables = _table_fds(bpf)
        infos = {name: map_info(fd) for name, fd in tables.items()}
        by_id = {info.id: name for name, info in infos.items()}
        pins: dict[str, str] = {}
        for p in sorted(pin.rglob("*")):
            if p.is_dir() or p.relative_to(pin).as_posix() in _PRELOADED:
                continue
            fd = libbpf().bpf_obj_get(str(p).encode())
            if fd < 0:
                raise DatapathError(f"opening bcc's pin {p} failed: {os.strerror(ct.get_errno())}")
            try:
                owner = by_id.get(map_info(fd).id)
            finally:
                os.close(fd)
            if owner is None:
                raise DatapathError(f"bcc pinned {p}, which is none of its maps")
            pins[owner] = str(p.relative_to(pin))
        for outer, name in inner.items():
            if outer not in tables or name not in tables:
                raise DatapathError(f"map of maps {outer}: no map {outer} or {name}")
        maps = [
            MapDef(
                name=name,
                type=infos[name].type,
                key_size=infos[name].key_size,
                value_size=infos[name].value_size,
                max_entries=infos[name].max_entries,
                flags=infos[name].flags,
                pin=pins.get(name),
                inner=inner.get(name),
            )
            for name in tables
        ]
        maps.sort(key=lambda m: m.inner is not None)  # inner maps exist before their outers
        by_fd = {fd: name for name, fd in tables.items()}
        programs = []
        for name in PROGRAMS:
            try:
                code = bpf.dump_func(name)
            except Exception as e:  # bcc raises bare Exception
                raise DatapathError(f"the classifier has no program {name}: {e}") from e
            insns, relocs = _relocations(name, code, by_fd)
            programs.append(Program(name, insns, tuple((int(i), str(n)) for i, n in relocs)))
        license_ = lib.bpf_module_license(bpf.module).decode()
        bpf.cleanup()
    return Artifact(
        key=key,
        license=license_,
        maps=tuple(maps),
        programs=tuple(programs),
        built_with={"bcc": artifact.bcc_version(), "kernel": os.uname().release},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamer.datapath.build", description=__doc__)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("defines", nargs="*", help="-DMS_*=N: the classifier's sizes")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        built = build(args.key, args.defines)
        path = artifact.artifact_path(args.cache_dir, args.key)
        artifact.write(path, built)
        artifact.prune(args.cache_dir)
    except (DatapathError, OSError) as e:
        print(f"building the classifier failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(path), "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
