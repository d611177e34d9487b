"""What one classifier instance is: its configuration, where its pins live, and its error.

In: the operator's choices (instance name, table sizes, timeouts, failsafe entries, whether
every rule is staged, attach mode). Out: a frozen
DatapathConfig, the paths derived from it (pin directories, the attachment record, the build
cache), and DatapathError, which every datapath module raises. Nothing here touches the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streamer.datapath.layout import MS_LAYOUT_VERSION
from streamer.datapath.reference import Timeouts
from streamer.policy.failsafe import DEFAULT_FAILSAFE, FailsafeRule, parse_failsafe

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/microseg")
DEFAULT_RUN_DIR = Path("/run/microseg")
# Compiled classifiers by a hash of what they depend on (streamer.datapath.artifact).
DEFAULT_CACHE_DIR = Path("/var/cache/microseg/classifier")
ATTACH_MODES = ("auto", "tcx", "tc")
LINKS_DIR = "links"  # <instance>/links/: our pinned tcx links, beside the maps' layout dirs


class DatapathError(RuntimeError):
    """Loading, attaching or updating the classifier failed; the message says what and where."""


@dataclass(frozen=True)
class DatapathConfig:
    """Sizes and identity of one classifier instance (one pin directory)."""

    instance: str
    pin_root: Path = DEFAULT_PIN_ROOT
    session_entries: int = 262144
    max_shapes: int = 512  # the verifier walks the probe loop: 1,024 exceeds its budget
    rule_entries: int = 1 << 22
    # two whole sets of 100,000 rules side by side, plus slots 0 (default) and 1 (failsafe)
    rule_slots: int = 200_002
    ringbuf_pages: int = 256
    event_interval_ns: int = 1_000_000_000
    frag_entries: int = 16384  # remembered first fragments (an LRU)
    timeouts: Timeouts = field(default_factory=Timeouts)  # idle timeouts per protocol and TCP state
    # flows that pass before any rule (contract §6, --failsafe; () with none); written with
    # the timeouts
    failsafe: tuple[FailsafeRule, ...] = field(
        default_factory=lambda: parse_failsafe(DEFAULT_FAILSAFE)
    )
    # --policy-mode staged: policies are compiled with every rule staged (compile_policy's
    # staged_all); the banks refuse tables compiled otherwise
    staged_all: bool = False
    # "tcx": BPF links on the TC hook (kernel 6.6+; no qdisc, and the cheaper hook), "tc":
    # direct-action filters on a clsact qdisc, "auto": tcx where the kernel has it
    attach_mode: str = "auto"

    run_dir: Path = DEFAULT_RUN_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR  # the classifier's builds: a start that finds one is fast

    @property
    def instance_dir(self) -> Path:
        return self.pin_root / self.instance

    @property
    def pin_dir(self) -> Path:
        """Maps of one layout: a restart with other sizes gets fresh maps, never misread ones."""
        return self.instance_dir / (
            f"v{MS_LAYOUT_VERSION}-s{self.session_entries}-p{self.max_shapes}"
            f"-r{self.rule_entries}-c{self.rule_slots}-f{self.frag_entries}"
        )

    @property
    def attachments_file(self) -> Path:
        """Which interfaces we attached to (bpffs holds no plain files, so it lives in /run)."""
        return self.run_dir / self.instance / "attachments.json"
