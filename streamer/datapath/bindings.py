"""ctypes bindings to libbpf (libbpf.so.1, 1.1 or later): the calls we make, and their structs.

In: file descriptors of maps, programs and links, map and program definitions, and raw bytes.
Out: libbpf's functions with their argument types declared (`libbpf()`, loaded once); map
creation (`map_create`), program loading with the verifier's log on failure (`prog_load`), a
map's definition from the kernel (`map_info`), BPF_PROG_TEST_RUN (`test_run`), and the fields
we read of struct bpf_link_info and struct bpf_prog_info. Errors are DatapathError with the
errno's text; nothing here knows the classifier's maps.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from dataclasses import dataclass

from streamer.datapath.config import DatapathError

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_OBJ_NAME_LEN = 16
# The verifier's log of a program it refused: the kernel keeps its end when it overflows.
_LOG_SIZE = 1 << 20
_LOG_TAIL_LINES = 40


class _TestRunOpts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class _MapCreateOpts(ct.Structure):
    """struct bpf_map_create_opts (libbpf 1.1; later versions only add fields at its end)."""

    _fields_ = [
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("map_extra", ct.c_uint64),
        ("numa_node", ct.c_uint32),
        ("map_ifindex", ct.c_uint32),
    ]


class _ProgLoadOpts(ct.Structure):
    """struct bpf_prog_load_opts (libbpf 1.1; later versions only add fields at its end)."""

    _fields_ = [
        ("sz", ct.c_size_t),
        ("attempts", ct.c_int),
        ("expected_attach_type", ct.c_int),
        ("prog_btf_fd", ct.c_uint32),
        ("prog_flags", ct.c_uint32),
        ("prog_ifindex", ct.c_uint32),
        ("kern_version", ct.c_uint32),
        ("attach_btf_id", ct.c_uint32),
        ("attach_prog_fd", ct.c_uint32),
        ("attach_btf_obj_fd", ct.c_uint32),
        ("fd_array", ct.c_void_p),
        ("func_info", ct.c_void_p),
        ("func_info_cnt", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32),
        ("line_info", ct.c_void_p),
        ("line_info_cnt", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32),
        ("log_level", ct.c_uint32),
        ("log_size", ct.c_uint32),
        ("log_buf", ct.c_void_p),
    ]


class _MapInfo(ct.Structure):
    """The head of struct bpf_map_info (linux/bpf.h): the kernel fills what fits."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * BPF_OBJ_NAME_LEN),
    ]


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RingBufferSample = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


def _libbpf() -> ct.CDLL:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(_TestRunOpts)]
    lib.bpf_map_update_batch.argtypes = [
        ct.c_int,
        ct.c_void_p,
        ct.c_void_p,
        ct.POINTER(ct.c_uint32),
        ct.c_void_p,
    ]
    lib.bpf_map_delete_batch.argtypes = [
        ct.c_int,
        ct.c_void_p,
        ct.POINTER(ct.c_uint32),
        ct.c_void_p,
    ]
    lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_lookup_batch.argtypes = [
        ct.c_int,
        ct.c_void_p,
        ct.c_void_p,
        ct.c_void_p,
        ct.c_void_p,
        ct.POINTER(ct.c_uint32),
        ct.c_void_p,
    ]
    lib.ring_buffer__new.argtypes = [ct.c_int, RingBufferSample, ct.c_void_p, ct.c_void_p]
    lib.ring_buffer__new.restype = ct.c_void_p
    lib.ring_buffer__consume.argtypes = [ct.c_void_p]
    lib.ring_buffer__free.argtypes = [ct.c_void_p]
    lib.ring_buffer__free.restype = None
    lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
    lib.bpf_map_create.argtypes = [
        ct.c_int,
        ct.c_char_p,
        ct.c_uint32,
        ct.c_uint32,
        ct.c_uint32,
        ct.POINTER(_MapCreateOpts),
    ]
    lib.bpf_prog_load.argtypes = [
        ct.c_int,
        ct.c_char_p,
        ct.c_char_p,
        ct.c_void_p,
        ct.c_size_t,
        ct.POINTER(_ProgLoadOpts),
    ]
    lib.libbpf_num_possible_cpus.argtypes = []
    lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    lib.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
    lib.bpf_link_detach.argtypes = [ct.c_int]
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_prog_query.argtypes = [
        ct.c_int,
        ct.c_int,
        ct.c_uint32,
        ct.POINTER(ct.c_uint32),
        ct.POINTER(ct.c_uint32),
        ct.POINTER(ct.c_uint32),
    ]
    return lib


_LIB: ct.CDLL | None = None


def libbpf() -> ct.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _libbpf()
    return _LIB


@dataclass(frozen=True)
class MapInfo:
    """A map as the kernel has it (struct bpf_map_info)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    """The definition of the map behind fd; DatapathError when fd is no map."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise DatapathError(f"fd {fd}: {e.strerror}") from e
    if target != "anon_inode:bpf-map":
        raise DatapathError(f"fd {fd} is not a BPF map ({target})")
    info = _MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if libbpf().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise DatapathError(f"reading map info failed: {os.strerror(err)}")
    return MapInfo(
        info.type,
        info.id,
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        info.name.decode(errors="replace"),
    )


def map_create(
    name: str,
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    inner_map_fd: int = 0,
) -> int:
    """A new map's fd (its name cut to what the kernel keeps)."""
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), map_flags=flags, inner_map_fd=inner_map_fd)
    fd = int(
        libbpf().bpf_map_create(
            map_type,
            name.encode()[: BPF_OBJ_NAME_LEN - 1],
            key_size,
            value_size,
            max_entries,
            ct.byref(opts),
        )
    )
    if fd < 0:
        err = ct.get_errno()
        raise DatapathError(f"creating map {name} failed: {os.strerror(err)}")
    return fd


def prog_load(name: str, prog_type: int, insns: bytes, license: str) -> int:
    """A loaded program's fd. When the verifier refuses it (libbpf then retries with its log
    on), the DatapathError ends with the log's last lines, which say why."""
    log_buf = ct.create_string_buffer(_LOG_SIZE)
    opts = _ProgLoadOpts(
        sz=ct.sizeof(_ProgLoadOpts),
        log_level=0,
        log_size=_LOG_SIZE,
        log_buf=ct.cast(log_buf, ct.c_void_p),
    )
    code = ct.create_string_buffer(insns, len(insns))
    fd = int(
        libbpf().bpf_prog_load(
            prog_type,
            name.encode()[: BPF_OBJ_NAME_LEN - 1],
            license.encode(),
            ct.cast(code, ct.c_void_p),
            len(insns) // 8,
            ct.byref(opts),
        )
    )
    if fd < 0:
        err = ct.get_errno()
        lines = log_buf.value.decode(errors="replace").rstrip("\n").splitlines()
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        where = f":\n{tail}" if tail else ""
        raise DatapathError(f"loading program {name} failed: {os.strerror(err)}{where}")
    return fd


def possible_cpus() -> int:
    """CPUs a per-CPU map holds a value for (libbpf_num_possible_cpus)."""
    n = int(libbpf().libbpf_num_possible_cpus())
    if n <= 0:
        raise DatapathError(f"counting the possible CPUs failed: {os.strerror(-n)}")
    return n


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: (the program's return code, mean ns per run)."""
    buf = ct.create_string_buffer(frame, len(frame))
    out = ct.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(
        sz=ct.sizeof(_TestRunOpts),
        data_in=ct.cast(buf, ct.c_void_p),
        data_out=ct.cast(out, ct.c_void_p),
        data_size_in=len(frame),
        data_size_out=len(out),
        repeat=max(1, repeat),
    )
    if libbpf().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)) != 0:
        err = ct.get_errno()
        raise DatapathError(f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return int(ct.c_int32(opts.retval).value), int(opts.duration)


def link_ifindex(fd: int) -> int:
    """The interface of a tcx link (struct bpf_link_info: tcx.ifindex at byte 16); 0 when the
    link is defunct or not a tcx link."""
    info = ct.create_string_buffer(64)
    size = ct.c_uint32(len(info))
    if libbpf().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
        return 0
    return int(struct.unpack_from("<I", info.raw, 16)[0])


def prog_name(prog_id: int) -> str:
    """The name of a loaded program by id (struct bpf_prog_info: name at byte 64); "" when it
    is gone or unreadable."""
    lib = libbpf()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = ct.create_string_buffer(256)
        size = ct.c_uint32(len(info))
        if lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
            return ""
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)
