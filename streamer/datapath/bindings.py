"""ctypes bindings to libbpf: the calls bcc does not offer, and the structs they fill.

In: file descriptors of maps, programs and links, and raw bytes. Out: libbpf's functions with
their argument types declared (`libbpf()`, loaded once), BPF_PROG_TEST_RUN (`test_run`), and
the fields we read of struct bpf_link_info and struct bpf_prog_info. Errors are DatapathError
with the errno's text; nothing here knows the classifier's maps.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct

from streamer.datapath.config import DatapathError


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
    lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
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
