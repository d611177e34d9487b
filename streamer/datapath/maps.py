"""Raw access to the loaded classifier's maps, by name: bytes in, bytes out.

In: map names (as bpf/classifier.c declares them) and packed keys and values (packed with
streamer.datapath.layout). Out: single and batched lookups, writes, deletes and walks, per-CPU
entries (one value per possible CPU), waiting for a retired bank's judges (`quiesce`, or the
RCU barrier), and the ring buffer's records by callback
(`Ring`), all through libbpf on the maps' fds. Write failures raise DatapathError; deletes report
the keys they could not remove (KeysLeft) and count a key already gone as removed. Until the
loader fills it a Maps holds no map; `close` closes its fds (pins stay).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
import struct
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from streamer.datapath.bindings import RingBufferSample, libbpf, possible_cpus
from streamer.datapath.config import DatapathError
from streamer.datapath.layout import JUDGING

if TYPE_CHECKING:
    from streamer.datapath.artifact import MapDef

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


class Ring:
    """A ring buffer map's records, each handed to a callback (libbpf's ring_buffer)."""

    def __init__(self, fd: int, callback: Callable[[bytes], bool | None]) -> None:
        def _sample(_ctx: Any, data: Any, size: int) -> int:
            more = callback(ct.string_at(data, size))
            return -1 if more is False else 0

        self._sample = RingBufferSample(_sample)  # referenced as long as libbpf may call it
        self._rb = libbpf().ring_buffer__new(fd, self._sample, None, None)
        if not self._rb:
            err = ct.get_errno()
            raise DatapathError(f"opening the ring buffer failed: {os.strerror(err)}")

    def epoll_fd(self) -> int:
        return int(libbpf().ring_buffer__epoll_fd(self._rb))

    def consume(self) -> None:
        """Hand every record in the ring to the callback, until one returns False."""
        if self._rb:
            libbpf().ring_buffer__consume(self._rb)

    def close(self) -> None:
        if self._rb:
            libbpf().ring_buffer__free(self._rb)
            self._rb = None


class Maps:
    """The maps of one loaded classifier: `fds` their fds by name, `defs` their definitions,
    `ring` the reader of `events` once one is opened."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.defs: dict[str, MapDef] = {}
        self.ring: Ring | None = None
        self._ncpu = 0

    def close(self) -> None:
        """Close every fd (the ring buffer's reader first); pinned maps stay."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.defs.clear()

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
        if not self._ncpu:
            self._ncpu = possible_cpus()
        size = self.defs[name].value_size
        stride = (size + 7) // 8 * 8  # the kernel pads each CPU's value to 8 bytes
        raw = self.lookup(name, array_key(index), stride * self._ncpu)
        if raw is None:
            err = ct.get_errno()
            raise DatapathError(f"reading map {name} entry {index} failed: {os.strerror(err)}")
        return [raw[i * stride : i * stride + size] for i in range(self._ncpu)]

    def barrier(self) -> None:
        """Return once no BPF program still runs with a view from before this call."""
        self.write("barrier", array_key(0), struct.pack("<I", self.fds["barrier_inner"]))

    def quiesce(self, bank: int, timeout: float = 1.0) -> bool:
        """Return once no judge reads `bank` (retired by a flip of `active` before this call):
        its count in `judging` is 0 on every CPU, which takes microseconds where the RCU
        barrier takes a grace period. True when it did; False (after `barrier`, which is
        always safe) when the counts could not be trusted (no full memory barrier to order
        the flip before reading them) or did not reach 0 within `timeout`."""
        if not full_memory_barrier():
            self.barrier()
            return False
        deadline = time.monotonic() + timeout
        pause = 0.00002
        while True:
            if not any(JUDGING.unpack(v)[bank] for v in self.percpu("judging", 0)):
                return True
            if time.monotonic() > deadline:
                self.barrier()
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.001)


_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(os.uname().machine)
_MEMBARRIER_PRIVATE_EXPEDITED = 8
_MEMBARRIER_REGISTER_PRIVATE_EXPEDITED = 16
_membarrier_ready: bool | None = None
_LIBC = ct.CDLL(None, use_errno=True)


def full_memory_barrier() -> bool:
    """A full memory barrier on this CPU (membarrier(2), private expedited): stores before it
    (the flip of `active`) are visible to every CPU before loads after it. False where the
    kernel does not offer one."""
    global _membarrier_ready
    if _SYS_MEMBARRIER is None or _membarrier_ready is False:
        return False
    syscall = _LIBC.syscall
    if _membarrier_ready is None:
        _membarrier_ready = (
            syscall(_SYS_MEMBARRIER, _MEMBARRIER_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0
        )
        if not _membarrier_ready:
            return False
    return bool(syscall(_SYS_MEMBARRIER, _MEMBARRIER_PRIVATE_EXPEDITED, 0, 0) == 0)
