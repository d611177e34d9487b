"""The classifier's build artifact: what bcc compiled, kept so that loading needs no compiler.

In: the classifier's sizes (from a DatapathConfig), the source in streamer/datapath/bpf/, and
what the build (streamer.datapath.build) found in bcc's module. Out: `cache_key` (a hash of
everything the compiled code depends on: the source and header bytes, the size defines, the
kernel release, bcc's version and this format's version), the artifact's path in the cache,
and the artifact itself (`Artifact`: each program's instructions with the map references to
patch, each map's definition, the license), written atomically and read back with every field
checked. A file that is unreadable, truncated, altered or of another key or format is an
ArtifactError (the loader then builds it again). Dropped: bcc's BTF (maps and programs are
loaded without it) and the map fds the instructions held (zeroed; relocations say where).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer.datapath.config import DatapathConfig, DatapathError

FORMAT_VERSION = 1
# The classifier's C source, package data (in a checkout a link to the repository's bpf/).
# A real directory: bcc takes it as -I, which an installed package's files on disk give.
BPF_DIR = Path(str(importlib.resources.files("streamer.datapath") / "bpf"))
SOURCE = "classifier.c"
# Flags of every build besides the sizes and the include path (MS_PIN is the build's own).
FIXED_CFLAGS = ("-Wno-unused-function",)
# Artifacts kept in a cache directory: the newest by use; older ones are removed by builds.
KEEP = 16

INSN_SIZE = 8
BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
BPF_PSEUDO_MAP_FD = 1  # an ld_imm64 whose immediate is a map's fd


class ArtifactError(DatapathError):
    """An artifact file that cannot be used (the message says why); build it again."""


def size_defines(config: DatapathConfig) -> list[str]:
    """The -D flags of the classifier's sizes: all the config changes in the compiled code."""
    return [
        f"-DMS_MAX_SHAPES={config.max_shapes}",
        f"-DMS_SESSIONS={config.session_entries}",
        f"-DMS_RULE_ENTRIES={config.rule_entries}",
        f"-DMS_RULE_SLOTS={config.rule_slots}",
        f"-DMS_RINGBUF_PAGES={config.ringbuf_pages}",
        f"-DMS_FRAGS={config.frag_entries}",
    ]


def bcc_version() -> str:
    """bcc's version, read from its package metadata (importing bcc costs 60 MiB)."""
    try:
        return importlib.metadata.version("bcc")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(defines: list[str], bpf_dir: Path = BPF_DIR) -> str:
    """The hash naming an artifact: equal keys compile to equal code."""
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(struct.pack("<I", len(label)) + label.encode())
        h.update(struct.pack("<Q", len(data)) + data)

    part("format", str(FORMAT_VERSION).encode())
    for f in sorted(bpf_dir.iterdir()):
        if f.suffix in (".c", ".h"):
            part(f"source:{f.name}", f.read_bytes())
    part("cflags", "\0".join([*defines, *FIXED_CFLAGS]).encode())
    part("kernel", os.uname().release.encode())
    part("bcc", bcc_version().encode())
    return h.hexdigest()[:40]


def artifact_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"classifier-{key}.json"


@dataclass(frozen=True)
class MapDef:
    """One map as bcc created it. `pin`: its path relative to the pin directory, if pinned;
    `inner`: the map whose definition a map-of-maps' entries have."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pin: str | None = None
    inner: str | None = None


@dataclass(frozen=True)
class Program:
    """One program's instructions (map fds zeroed) and where they reference maps:
    (instruction index of an ld_imm64, map name)."""

    name: str
    insns: bytes
    relocs: tuple[tuple[int, str], ...]

    def patched(self, fds: dict[str, int]) -> bytes:
        """The instructions with the maps' fds in their references."""
        code = bytearray(self.insns)
        for index, name in self.relocs:
            struct.pack_into("<i", code, index * INSN_SIZE + 4, fds[name])
        return bytes(code)


@dataclass(frozen=True)
class Artifact:
    key: str
    license: str
    maps: tuple[MapDef, ...]  # in creation order: an inner map before the map of maps
    programs: tuple[Program, ...]
    built_with: dict[str, str]  # bcc, kernel: for a reader, not checked

    def program(self, name: str) -> Program:
        for p in self.programs:
            if p.name == name:
                return p
        raise ArtifactError(f"the artifact has no program {name}")


def _payload(a: Artifact) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "key": a.key,
        "license": a.license,
        "built_with": a.built_with,
        "maps": [
            {
                "name": m.name,
                "type": m.type,
                "key_size": m.key_size,
                "value_size": m.value_size,
                "max_entries": m.max_entries,
                "flags": m.flags,
                "pin": m.pin,
                "inner": m.inner,
            }
            for m in a.maps
        ],
        "programs": [
            {
                "name": p.name,
                "insns": base64.b64encode(p.insns).decode(),
                "relocs": [list(r) for r in p.relocs],
            }
            for p in a.programs
        ],
    }


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write(path: Path, artifact: Artifact) -> None:
    """Write atomically (a temporary file renamed over `path`): readers see all or nothing."""
    payload = _payload(artifact)
    text = json.dumps({"digest": _digest(payload), "artifact": payload}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # no secret in it, and a reader need not be root
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prune(cache_dir: Path, keep: int = KEEP) -> None:
    """Remove all but the `keep` most recently used artifacts (a load touches its own)."""
    files = sorted(
        cache_dir.glob("classifier-*.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in files[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _int(d: dict[str, Any], field: str) -> int:
    v = d[field]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{field}: not a count")
    return v


def _opt_str(d: dict[str, Any], field: str) -> str | None:
    v = d[field]
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{field}: not a string")
    return v


def read(path: Path, key: str) -> Artifact:
    """The artifact at `path`, checked whole; ArtifactError says what is wrong with it."""
    try:
        doc = json.loads(path.read_bytes())
        payload = doc["artifact"]
        if doc["digest"] != _digest(payload):
            raise ValueError("its digest does not match its content")
        if payload["format"] != FORMAT_VERSION:
            raise ValueError(f"format {payload['format']}, expected {FORMAT_VERSION}")
        if payload["key"] != key:
            raise ValueError("it was built for another key")
        maps = tuple(
            MapDef(
                name=str(m["name"]),
                type=_int(m, "type"),
                key_size=_int(m, "key_size"),
                value_size=_int(m, "value_size"),
                max_entries=_int(m, "max_entries"),
                flags=_int(m, "flags"),
                pin=_opt_str(m, "pin"),
                inner=_opt_str(m, "inner"),
            )
            for m in payload["maps"]
        )
        for m in maps:
            if m.pin is not None and (Path(m.pin).is_absolute() or ".." in Path(m.pin).parts):
                raise ValueError(f"map {m.name}: pin {m.pin!r} is outside the pin directory")
        names = {m.name for m in maps}
        programs = []
        for p in payload["programs"]:
            insns = base64.b64decode(p["insns"], validate=True)
            if not insns or len(insns) % INSN_SIZE:
                raise ValueError(f"program {p['name']}: not whole instructions")
            relocs = tuple((int(i), str(n)) for i, n in p["relocs"])
            for i, n in relocs:
                if n not in names or not 0 <= i < len(insns) // INSN_SIZE - 1:
                    raise ValueError(f"program {p['name']}: a bad relocation ({i}, {n})")
            programs.append(Program(str(p["name"]), insns, relocs))
        return Artifact(
            key=key,
            license=str(payload["license"]),
            maps=maps,
            programs=tuple(programs),
            built_with={str(k): str(v) for k, v in payload["built_with"].items()},
        )
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"the classifier build {path} is unusable: {e}") from e
