"""`microseg run --config FILE` (streamer/cli/config.py, SPEC §8): every kind of key (string,
path, typed value, choice, boolean, repeatable list) gives what the flag gives; the flags on the
command line replace the file's keys, a repeatable flag's list replacing the file's list; the
file satisfies --iface; an unknown key, a table, a value of the wrong type and a value the flag's
type refuses are errors (exit 2, naming the file and the key) before anything runs; and
examples/microseg.toml is a valid file naming every key there is."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest
from support import REPO

from streamer.cli import main as cli_main
from streamer.cli.config import ConfigError, config_path_in
from streamer.cli.main import build_parser, parse_command_line
from streamer.policy.failsafe import parse_failsafe

EXAMPLE = REPO / "examples" / "microseg.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "microseg.toml"
    path.write_text(text)
    return path


def _parse(config: Path, *flags: str) -> argparse.Namespace:
    return parse_command_line(["run", "--config", str(config), *flags])


def _run_keys() -> set[str]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    # (flags hidden from --help are keys too, but for tests: the example leaves them out)
    return {
        o[2:]
        for a in run._actions
        for o in a.option_strings
        if o.startswith("--") and a.help != argparse.SUPPRESS
    } - {"help", "config"}


def test_every_kind_of_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
iface = ["eth0", "eth1"]
netns = "blue"
policy-file = "/etc/microseg/policy.json"
state-dir = "state"
keep-on-exit = true
no-auth = false
session-table-size = 65536
event-interval = 0.5
events-file-max-bytes = "10M"
kafka-spool-max-bytes = 1048576
attach-mode = "tc"
policy-mode = "staged"
failsafe = "tcp:22:in"
fill-warning = "70%"
timeout = ["tcp_established=3600", "udp=60"]
host-label = ["role=db", "zone=a"]
api = ["127.0.0.1:9000", "unix:/run/microseg/api.sock"]
kafka = "k1:9092, k2:9092"
""",
    )
    args = _parse(path)
    assert args.func is cli_main.cmd_run
    assert args.iface == ["eth0", "eth1"]
    assert args.netns == "blue"
    assert args.policy_file == Path("/etc/microseg/policy.json")
    # relative paths are the file's directory's, not the working directory's
    assert args.state_dir == tmp_path / "state"
    assert args.keep_on_exit is True and args.no_auth is False
    assert args.session_table_size == 65536 and args.event_interval == 0.5
    assert args.events_file_max_bytes == 10 << 20 and args.kafka_spool_max_bytes == 1 << 20
    assert args.attach_mode == "tc" and args.policy_mode == "staged"
    assert args.failsafe == parse_failsafe("tcp:22:in")
    assert args.fill_warning == pytest.approx(0.7)
    assert args.timeout == [("tcp_established", 3600.0), ("udp", 60.0)]
    assert args.host_label == [("role", "db"), ("zone", "a")]
    assert args.api == ["127.0.0.1:9000", "unix:/run/microseg/api.sock"]
    assert args.kafka == "k1:9092,k2:9092"
    # keys the file does not give keep the flags' defaults
    assert args.ringbuf_pages == 256 and args.print_events is False
    assert args.events_file is None


def test_flags_win_and_lists_are_replaced(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'iface = ["eth0", "eth1"]\ntimeout = ["udp=60"]\nsession-table-size = 1024\n'
        'keep-on-exit = true\nattach-mode = "tc"\n',
    )
    args = _parse(path, "--iface", "eth9", "--session-table-size", "2048", "--attach-mode", "tcx")
    assert args.iface == ["eth9"], "the command line's --iface list replaces the file's"
    assert args.timeout == [("udp", 60.0)], "a list the command line does not give stays"
    assert args.session_table_size == 2048 and args.attach_mode == "tcx"
    assert args.keep_on_exit is True
    args = _parse(path, "--timeout", "icmp=5", "--timeout", "tcp_syn_sent=7")
    assert args.timeout == [("icmp", 5.0), ("tcp_syn_sent", 7.0)]
    assert args.iface == ["eth0", "eth1"]
    # the flag may come before --config, and -v before run
    args = parse_command_line(["-v", "run", "--iface", "x0", f"--config={path}"])
    assert args.iface == ["x0"] and args.verbose


def test_iface_still_required_without_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "keep-on-exit = true\n")
    with pytest.raises(SystemExit) as exc:
        _parse(path)
    assert exc.value.code == 2
    assert "--iface" in capsys.readouterr().err
    assert _parse(path, "--iface", "eth0").iface == ["eth0"]


@pytest.mark.parametrize(
    ("text", "key", "expects"),
    [
        ('ifac = ["eth0"]', "ifac", "unknown key 'ifac' (did you mean 'iface'?)"),
        ("config = 'other.toml'", "config", "unknown key"),
        ("[run]\niface = ['eth0']", "run", "unknown key"),
        ('iface = "eth0"', "iface", "expected a list"),
        ("iface = [true]", "iface", "expected a list, each item what --iface takes"),
        ('keep-on-exit = "yes"', "keep-on-exit", "expected true or false, got a string"),
        ("session-table-size = true", "session-table-size", "got a boolean"),
        ("session-table-size = 0", "session-table-size", "must be greater than 0"),
        ('session-table-size = "many"', "session-table-size", "is not a whole number"),
        ("policy-file = 3", "policy-file", "expected a path (a string), got a number"),
        ('attach-mode = "xdp"', "attach-mode", "is not one of 'auto', 'tcx', 'tc'"),
        ('timeout = ["bogus=3"]', "timeout", "is not CLASS=SECONDS"),
        ('host-label = ["no-equals"]', "host-label", "host-label"),
        ("fill-warning = [0.5]", "fill-warning", "got a list"),
        ('kafka = "nohost"', "kafka", "is not HOST:PORT"),
    ],
)
def test_bad_keys(tmp_path: Path, text: str, key: str, expects: str) -> None:
    path = _write(tmp_path, 'iface = ["eth0"]\n' * (not text.startswith("iface")) + text + "\n")
    with pytest.raises(ConfigError) as exc:
        _parse(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: "), message
    assert repr(key) in message and expects in message, message


def test_bad_file_exits_2_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[object] = []
    monkeypatch.setattr(cli_main, "cmd_run", lambda args: ran.append(args) or 0)
    path = _write(tmp_path, 'iface = ["eth0"]\nsesion-table-size = 10\n')
    assert cli_main.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"microseg run: --config {path}: unknown key 'sesion-table-size'" in err, err
    assert (
        cli_main.main(["run", "--iface", "eth0", "--config", str(tmp_path / "missing.toml")]) == 2
    )
    assert "missing.toml: cannot read" in capsys.readouterr().err
    bad = _write(tmp_path, "iface = [")
    assert cli_main.main(["run", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert not ran


def test_config_path_in() -> None:
    assert config_path_in(["run", "--config", "a.toml"]) == Path("a.toml")
    assert config_path_in(["--verbose", "run", "--iface", "x", "--config=b"]) == Path("b")
    assert config_path_in(["run", "--iface", "x"]) is None
    assert config_path_in(["policy-check", "--config", "a"]) is None
    assert config_path_in([]) is None


def test_example_names_every_key_and_is_valid() -> None:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    # Every key is in the example, set or as a commented-out line documenting it.
    documented = {
        line.lstrip("# ").split("=", 1)[0].strip()
        for line in text.splitlines()
        if "=" in line and line.lstrip("# ")[:1].isalpha()
    }
    missing = sorted(_run_keys() - documented)
    assert not missing, f"examples/microseg.toml does not document {missing}"
    args = _parse(EXAMPLE)
    assert args.iface == doc["iface"]
    assert args.policy_file == Path(doc["policy-file"])
