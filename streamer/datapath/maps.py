"""Raw access to the loaded classifier's maps, by name: bytes in, bytes out.

In: map names (as bpf/classifier.c declares them) and packed keys and values (packed with
streamer.datapath.layout). Out: single and batched lookups, writes, deletes and walks through
libbpf on the maps' fds; per-CPU entries and the RCU barrier through bcc's table objects.
Write failures raise DatapathError; deletes report the keys they could not remove (KeysLeft)
and count a key already gone as removed. Until the loader fills it a Maps holds no map.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

from streamer.datapath.bindings import libbpf
from streamer.datapath.config import DatapathError

_BATCH = 65536  # entries per batched write or delete (one syscall each)
_WALK_BATCH = 4096


def array_key(index: int) -> bytes:
    """The key of an array map's entry (a u32)."""
    return struct.pack("<I", index)


class KeysLeft(DatapathError):
    """A delete left keys in a map; `keys` are those the map still holds."""

    def __init__(self, name: str, keys: list[bytes], err: int) -> None:
        super().__init__(f"deleting {len(keys)} entries of map {name} failed: {os.strerror(err)}")
        self.keys = keys


class Maps:
    """The maps of one loaded classifier: `bpf` is bcc's BPF object, `fds` the maps' fds."""

    def __init__(self) -> None:
        self.bpf: Any = None
        self.fds: dict[str, int] = {}

    def write(self, name: str, key: bytes, value: bytes) -> None:
        if libbpf().bpf_map_update_elem(self.fds[name], key, value, 0) != 0:
            err = ct.get_errno()
            raise DatapathError(f"writing map {name} failed: {os.strerror(err)}")

    def lookup(self, name: str, key: bytes, vsize: int) -> bytes | None:
        buf = ct.create_string_buffer(vsize)
        if libbpf().bpf_map_lookup_elem(self.fds[name], key, buf) != 0:
            return None
        return buf.raw

    def delete(self, name: str, key: bytes) -> bool:
        """Whether the entry was there and is now gone."""
        return bool(libbpf().bpf_map_delete_elem(self.fds[name], key) == 0)

    def keys(self, name: str, ksize: int) -> Iterator[bytes]:
        lib = libbpf()
        fd = self.fds[name]
        prev: bytes | None = None
        nxt = ct.create_string_buffer(ksize)
        while lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
            prev = nxt.raw
            yield prev

    def update_batch(self, name: str, keys: list[bytes], values: list[bytes]) -> None:
        if not keys:
            return
        lib = libbpf()
        fd = self.fds[name]
        step = _BATCH
        for i in range(0, len(keys), step):
            kb = b"".join(keys[i : i + step])
            vb = b"".join(values[i : i + step])
            count = ct.c_uint32(len(keys[i : i + step]))
            if lib.bpf_map_update_batch(fd, kb, vb, ct.byref(count), None) != 0:
                err = ct.get_errno()
                raise DatapathError(
                    f"writing {len(keys)} entries to map {name} failed after {i + count.value}:"
                    f" {os.strerror(err)}"
                )

    def delete_batch(self, name: str, keys: list[bytes]) -> None:
        """Delete every key (one already gone counts as deleted); KeysLeft names those that
        stayed, after all were tried."""
        lib = libbpf()
        fd = self.fds[name]
        left: list[bytes] = []
        err = 0
        for i in range(0, len(keys), _BATCH):
            chunk = keys[i : i + _BATCH]
            count = ct.c_uint32(len(chunk))
            if lib.bpf_map_delete_batch(fd, b"".join(chunk), ct.byref(count), None) != 0:
                # Some keys were already gone: fall back to one by one, ignoring misses.
                for k in chunk:
                    if lib.bpf_map_delete_elem(fd, k) != 0:
                        e = ct.get_errno()
                        if e != errno.ENOENT:
                            left.append(k)
                            err = err or e
        if left:
            raise KeysLeft(name, left, err)

    def walk(self, name: str, ksize: int, vsize: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry, in batches of 4,096 (one syscall each); entries may
        come and go meanwhile."""
        lib = libbpf()
        fd = self.fds[name]
        step = _WALK_BATCH
        keys = ct.create_string_buffer(ksize * step)
        vals = ct.create_string_buffer(vsize * step)
        token_in = ct.create_string_buffer(64)
        token_out = ct.create_string_buffer(64)
        first = True
        while True:
            count = ct.c_uint32(step)
            rc = lib.bpf_map_lookup_batch(
                fd, None if first else token_in, token_out, keys, vals, ct.byref(count), None
            )
            err = ct.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                if first and err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
                    for k in self.keys(name, ksize):  # kernels without batch ops
                        v = self.lookup(name, k, vsize)
                        if v is not None:
                            yield k, v
                    return
                raise DatapathError(f"walking a map failed: {os.strerror(err)}")
            kb, vb = keys.raw, vals.raw
            for i in range(count.value):
                yield kb[i * ksize : (i + 1) * ksize], vb[i * vsize : (i + 1) * vsize]
            if rc != 0:  # ENOENT: that was the last batch
                return
            ct.memmove(token_in, token_out, 64)
            first = False

    def percpu(self, name: str, index: int) -> list[bytes]:
        """One per-CPU array entry, as raw bytes per possible CPU."""
        return [bytes(v) for v in self.bpf[name][ct.c_uint32(index)]]

    def barrier(self) -> None:
        """Return once no BPF program still runs with a view from before this call."""
        self.bpf["barrier"][ct.c_int(0)] = ct.c_int(self.bpf["barrier_inner"].get_fd())
