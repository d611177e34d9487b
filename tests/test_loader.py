"""The classifier's build and load (streamer.datapath.build, artifact, loader) in the real kernel.

A cold load compiles in a child process and writes the artifact; the next load of the same
sizes takes it from the cache and compiles nothing (Datapath.compiled, the log line); both give
working programs (verdicts through BPF_PROG_TEST_RUN, the tail-called slow path, events through
the ring buffer). Other sizes get another artifact; an unusable artifact file is built again
with a warning; a pinned map that does not match its definition is refused by name; the agent
process never imports bcc, also when it compiles (a fresh interpreter says so, with its RSS);
the build leaves no directory, mount or pin behind. Adoption of pinned maps by a second load
is tested in tests/test_datapath_apply.py.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.bpf import EventSink, loaded_datapath, unique_instance
from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, R, install, pk

from streamer.datapath import artifact
from streamer.datapath.artifact import ArtifactError
from streamer.datapath.bindings import BPF_PROG_TYPE_SCHED_CLS, libbpf, map_create, prog_load
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import EVENT, MS_EV_NEW

ROOT = Path(__file__).resolve().parents[1]
BPF_MAP_TYPE_HASH = 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build cache of this module's own, cold at its start."""
    return tmp_path_factory.mktemp("classifier-cache")


def small(cache: Path, tag: str = "ld", **sizes: int) -> DatapathConfig:
    base = {"session_entries": 1024, "max_shapes": 8, "rule_slots": 64, "rule_entries": 4096}
    return DatapathConfig(
        instance=unique_instance(tag), cache_dir=cache, failsafe=(), **{**base, **sizes}
    )


def artifacts(cache: Path) -> list[Path]:
    return sorted(cache.glob("classifier-*.json"))


def enforce(dp: Datapath) -> None:
    """The programs judge: an allowed and a denied flow (through ms_judge and ms_record),
    the deny's event on the ring buffer, counters read per CPU."""
    install(dp, "deny", R(1, protocol="tcp", dst_port=443))
    sink = EventSink(dp)
    sink.drain()
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1000, 443)) == PASS
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1000, 22)) == DROP
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1000, 443)) == PASS  # the session
    events = [EVENT.as_dict(r) for r in sink.drain()]
    assert [(e["dport"], e["kind"]) for e in events] == [(22, MS_EV_NEW)]
    c = dp.counters()
    assert (c["total_packets"], c["allowed_packets"], c["denied_packets"]) == (3, 2, 1)
    assert c["session_hits"] == 1
    assert dp.rule_counters(1).packets == 2


def test_cold_build_then_cached_load(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = small(cache)
    with (
        caplog.at_level(logging.INFO, logger="streamer.datapath.loader"),
        loaded_datapath(cfg) as dp,
    ):
        assert dp.compiled
        enforce(dp)
    assert "classifier compiled by bcc" in caplog.text
    (built,) = artifacts(cache)
    assert built == artifact.artifact_path(cache, artifact.cache_key(artifact.size_defines(cfg)))
    assert built.stat().st_mode & 0o777 == 0o644
    caplog.clear()

    again = replace(cfg, instance=unique_instance("ld"))
    with (
        caplog.at_level(logging.INFO, logger="streamer.datapath.loader"),
        loaded_datapath(again) as dp,
    ):
        assert not dp.compiled
        enforce(dp)
    assert "classifier from the build cache" in caplog.text
    assert "compiled by bcc" not in caplog.text
    assert artifacts(cache) == [built]


def test_other_sizes_get_another_artifact(cache: Path) -> None:
    """Any size in the compiled code is in the key (here max_shapes); the instance is not."""
    with loaded_datapath(small(cache)) as dp:
        before = set(artifacts(cache))
        assert not dp.compiled  # the first test's build: another instance, same sizes
    with loaded_datapath(small(cache, max_shapes=16)) as dp:
        assert dp.compiled
        enforce(dp)
    after = set(artifacts(cache))
    assert len(after - before) == 1 and before <= after


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"\0" * 64,  # not JSON
        lambda b: b.replace(b'"license": "GPL"', b'"license": "BSD"'),  # altered
    ],
    ids=["truncated", "garbage", "altered"],
)
def test_an_unusable_artifact_is_refused(
    cache: Path, damage: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    """A file that is not exactly what a build wrote is never loaded (cheap: no kernel)."""
    cfg = small(cache)
    key = artifact.cache_key(artifact.size_defines(cfg))
    good = artifact.artifact_path(cache, key)
    if not good.exists():
        with loaded_datapath(cfg):
            pass
    copy = tmp_path / good.name
    data = good.read_bytes()
    bad = damage(data)
    assert bad != data
    copy.write_bytes(bad)
    with pytest.raises(ArtifactError, match="unusable"):
        artifact.read(copy, key)
    copy.write_bytes(data)
    assert artifact.read(copy, key).key == key
    with pytest.raises(ArtifactError, match="another key"):
        artifact.read(copy, "0" * 40)


def test_a_corrupt_artifact_is_built_again(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = small(cache, rule_slots=32)
    with loaded_datapath(cfg):
        pass
    path = artifact.artifact_path(cache, artifact.cache_key(artifact.size_defines(cfg)))
    path.write_bytes(path.read_bytes()[:1000])
    again = replace(cfg, instance=unique_instance("ld"))
    with (
        caplog.at_level(logging.WARNING, logger="streamer.datapath.loader"),
        loaded_datapath(again) as dp,
    ):
        assert dp.compiled
        enforce(dp)
    assert "unusable" in caplog.text and "building it again" in caplog.text
    artifact.read(path, artifact.cache_key(artifact.size_defines(cfg)))  # whole again


def test_a_pinned_map_of_another_definition_is_refused(cache: Path) -> None:
    """A pin where a map of the classifier belongs, with another value size: the load fails
    naming that map, and leaves the pin as it was."""
    cfg = small(cache)
    cfg.pin_dir.mkdir(parents=True)
    dp = Datapath(cfg)
    try:
        fd = map_create("sessions", BPF_MAP_TYPE_HASH, 44, 8, 1024)
        try:
            assert libbpf().bpf_obj_pin(fd, str(cfg.pin_dir / "sessions").encode()) == 0
        finally:
            os.close(fd)
        with pytest.raises(DatapathError, match=r"pinned map sessions at .* does not match"):
            dp.load()
        assert not dp.loaded and not dp._maps.fds
        assert (cfg.pin_dir / "sessions").exists()
    finally:
        dp.remove_pins()


def test_a_program_the_verifier_refuses_says_why() -> None:
    """The DatapathError carries the end of the verifier's log (here: r0 never set)."""
    exit_only = struct.pack("<BBhi", 0x95, 0, 0, 0)  # BPF_JMP | BPF_EXIT
    with pytest.raises(DatapathError, match=r"(?s)loading program ms_bad failed: .*R0 !read_ok"):
        prog_load("ms_bad", BPF_PROG_TYPE_SCHED_CLS, exit_only, "GPL")


_PROBE = """
import json, sys
from pathlib import Path
from streamer.datapath.config import DatapathConfig
from streamer.datapath.datapath import Datapath
cfg = DatapathConfig(instance=sys.argv[1], cache_dir=Path(sys.argv[2]), session_entries=1024,
                     max_shapes=8, rule_slots=64, rule_entries=4096)
dp = Datapath(cfg)
try:
    dp.load()
    rss = [int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmRSS:")][0]
    print(json.dumps({"bcc": "bcc" in sys.modules, "compiled": dp.compiled, "rss_kib": rss}))
finally:
    dp.close()
    dp.remove_pins()
"""


@pytest.fixture
def probe_instance() -> Iterator[str]:
    yield unique_instance("probe")


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "cached"])
def test_the_agent_process_never_imports_bcc(
    cache: Path, tmp_path: Path, cold: bool, probe_instance: str
) -> None:
    """A fresh interpreter loads the classifier, compiling it first (cold) or not: bcc is
    never in its sys.modules; its RSS after the load is printed (-s shows it)."""
    where = tmp_path / "cold-cache" if cold else cache
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, probe_instance, str(where)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bcc"] is False
    assert got["compiled"] is cold
    print(f"VmRSS after a {'cold' if cold else 'cached'} load: {got['rss_kib'] / 1024:.1f} MiB")


def test_the_build_leaves_nothing_behind(tmp_path: Path) -> None:
    """The child's private bpffs (its pins) goes with it, and so does its directory."""
    cfg = small(tmp_path)
    key = artifact.cache_key(artifact.size_defines(cfg))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamer.datapath.build",
            "--cache-dir",
            str(tmp_path),
            "--key",
            key,
            "--",
            *artifact.size_defines(cfg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["path"] == str(artifact.artifact_path(tmp_path, key))
    built = artifact.read(artifact.artifact_path(tmp_path, key), key)
    assert {m.name: m.pin for m in built.maps}["sessions"] == "sessions"
    assert {m.name: m.inner for m in built.maps}["barrier"] == "barrier_inner"
    assert not list(Path("/tmp").glob(f"microseg-build-{proc.pid}-*"))
    assert not list(Path("/sys/fs/bpf").glob(f"microseg-build-{proc.pid}-*"))
    mounts = Path("/proc/self/mounts").read_text()
    assert f"microseg-build-{proc.pid}-" not in mounts
    # the relocations patch every map reference: no instruction keeps a map fd of the build
    for p in built.programs:
        for index, _name in p.relocs:
            assert struct.unpack_from("<i", p.insns, index * 8 + 4)[0] == 0
