#!/usr/bin/env bash
# Install microseg on a Debian host as a systemd service; upgrade, roll back, uninstall.
#
#   scripts/install.sh [--prefix /opt/microseg] [--wheel FILE]   install or upgrade
#   scripts/install.sh [--prefix ...] --rollback                 back to the previous version
#   scripts/install.sh [--prefix ...] --uninstall [--purge]      remove it
#
# DESTDIR=/some/root installs into a staging root (nothing outside it is touched, systemd
# is not called, no apt). What goes where (under DESTDIR):
#
#   PREFIX/<version>/           the wheel in a venv of its own (Debian's /usr/bin/python3,
#                               system site-packages: bcc is Debian's python3-bpfcc)
#   PREFIX/current, previous    -> <version> directories (relative links); versions that are
#                               neither are removed
#   PREFIX/share/               sys-fs-bpf.mount (optional, for distributions whose systemd
#                               does not mount bpffs; never installed as a unit by this script)
#   /usr/local/bin/microseg     -> PREFIX/current/bin/microseg
#   /etc/microseg/microseg.toml, policy.json
#                               examples, installed only when missing: an upgrade keeps them
#   /var/lib/microseg           the state dir (0700)
#   /etc/systemd/system/microseg.service
#                               always replaced (it is ours; local changes go in drop-ins)
#
# Without --wheel, the wheel is built from this checkout (pip wheel --no-deps, setuptools from
# PyPI or pip's cache). On a host where systemd runs (and no DESTDIR): daemon-reload, and an
# active service is restarted onto the new version (the config's keep-on-exit keeps the
# classifier attached meanwhile: no packet passes unjudged). Uninstall detaches the configured
# interfaces; /etc/microseg and /var/lib/microseg stay unless --purge.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=/usr/bin/python3
PREFIX=/opt/microseg
WHEEL=
ACTION=install
PURGE=0
WORK=
D="${DESTDIR:-}"
D="${D%/}"

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,6s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL="$2"; shift 2 ;;
        --wheel=*) WHEEL="${1#*=}"; shift ;;
        --rollback) ACTION=rollback; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path: $PREFIX" ;; esac
PREFIX="${PREFIX%/}"
[ "$PURGE" -eq 0 ] || [ "$ACTION" = uninstall ] || die "--purge goes with --uninstall"
[ -z "$WHEEL" ] || [ "$ACTION" = install ] || die "--wheel goes with an install"
[ "$(id -u)" -eq 0 ] || [ -n "$D" ] || die "must run as root (or with DESTDIR=)"

OPT="$D$PREFIX"
BIN_LINK="$D/usr/local/bin/microseg"
ETC="$D/etc/microseg"
STATE="$D/var/lib/microseg"
UNIT="$D/etc/systemd/system/microseg.service"

# systemd is ours to call only on the real root of a host that runs it.
systemd_running() { [ -z "$D" ] && [ -d /run/systemd/system ]; }

# Replace link $2 with one to $1, atomically (a rename), so it is never missing.
relink() {
    ln -sfn "$1" "$2.new.$$"
    mv -Tf "$2.new.$$" "$2"
}

restart_if_active() {
    if systemd_running; then
        systemctl daemon-reload
        if systemctl is-active --quiet microseg; then
            say "restarting microseg.service"
            systemctl restart microseg
        fi
    fi
}

# Versions that are neither current nor previous go.
prune() {
    local keep_c keep_p d
    keep_c="$(readlink "$OPT/current" 2>/dev/null || true)"
    keep_p="$(readlink "$OPT/previous" 2>/dev/null || true)"
    for d in "$OPT"/*/; do
        d="$(basename "$d")"
        case "$d" in current|previous|share) continue ;; esac
        [ -e "$OPT/$d/bin/microseg" ] || continue  # not one of our venvs
        if [ "$d" != "$keep_c" ] && [ "$d" != "$keep_p" ]; then
            say "removing old version $d"
            rm -rf "${OPT:?}/$d"
        fi
    done
}

need_host_packages() {  # on a real host: what the venv and bcc need, from Debian
    [ -z "$D" ] || return 0
    local missing=()
    "$PYTHON" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    "$PYTHON" -c 'import bcc' 2>/dev/null || missing+=(python3-bpfcc)
    if [ "${#missing[@]}" -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}"
    fi
    if [ ! -e "/lib/modules/$(uname -r)/build" ]; then
        say "WARNING: /lib/modules/$(uname -r)/build is missing: bcc needs the kernel headers" \
            "(apt-get install linux-headers-$(uname -r), or see scripts/setup.sh)"
    fi
}

build_wheel() {  # $1: a pip; $2: the output directory. Prints the wheel's path.
    local src="$2/src"
    mkdir -p "$src"
    # A copy: a build writes build/ and *.egg-info next to the sources, and a stale build/lib
    # would end up in the wheel. streamer/datapath/bpf stays the link to bpf/ it is.
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.mypy_cache --exclude=.ruff_cache -cf - . | tar -C "$src" -xf -
    "$1" wheel -q --disable-pip-version-check --no-deps --wheel-dir "$2" "$src" >&2
    ls "$2"/microseg-*.whl
}

do_install() {
    need_host_packages
    WORK="$(mktemp -d /tmp/microseg-install.XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
    mkdir -p "$OPT"
    # The new venv is built beside the others under a temporary name, then renamed into
    # place: a failed install leaves the installed versions as they were.
    local staging="$OPT/.staging.$$"
    rm -rf "$staging"
    "$PYTHON" -m venv --system-site-packages "$staging"
    if [ -z "$WHEEL" ]; then
        say "building the wheel from $ROOT"
        WHEEL="$(build_wheel "$staging/bin/pip" "$WORK")"
    fi
    [ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
    local name version
    name="$(basename "$WHEEL")"
    version="$(cut -d- -f2 <<<"$name")"
    [[ "$name" == microseg-*.whl && "$version" =~ ^[0-9A-Za-z.+_]+$ ]] \
        || die "$WHEEL is not a microseg wheel"
    say "installing microseg $version into $PREFIX/$version"
    "$staging/bin/pip" install -q --disable-pip-version-check "$WHEEL"
    # The venv's scripts name their interpreter by path: the final one, not the staging
    # name nor DESTDIR (a staging root is meant to be copied to /).
    local f
    for f in "$staging"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && head -c 2 "$f" | grep -q '^#!'; then
            sed -i "1s|^#!$staging/|#!$PREFIX/$version/|" "$f"
        fi
    done
    sed -i "s|$staging|$PREFIX/$version|g" "$staging/bin/activate" "$staging/pyvenv.cfg" \
        2>/dev/null || true
    "$staging/bin/python" "$staging/bin/microseg" --version >/dev/null \
        || die "the new venv's microseg does not run"

    local old
    old="$(readlink "$OPT/current" 2>/dev/null || true)"
    if [ "$old" = "$version" ]; then
        say "reinstalling $version over itself"
    fi
    rm -rf "${OPT:?}/$version.old.$$"
    [ ! -e "$OPT/$version" ] || mv -T "$OPT/$version" "$OPT/$version.old.$$"
    mv -T "$staging" "$OPT/$version"
    rm -rf "${OPT:?}/$version.old.$$"
    if [ -n "$old" ] && [ "$old" != "$version" ] && [ -e "$OPT/$old" ]; then
        relink "$old" "$OPT/previous"
    fi
    relink "$version" "$OPT/current"
    prune

    mkdir -p "$(dirname "$BIN_LINK")" "$OPT/share"
    relink "$PREFIX/current/bin/microseg" "$BIN_LINK"
    install -m 0644 "$ROOT/deploy/systemd/sys-fs-bpf.mount" "$OPT/share/sys-fs-bpf.mount"

    install -d -m 0755 "$ETC"
    if [ -e "$ETC/microseg.toml" ]; then
        say "keeping $ETC/microseg.toml"
    else
        install -m 0644 "$ROOT/examples/microseg.toml" "$ETC/microseg.toml"
    fi
    if [ -e "$ETC/policy.json" ]; then
        say "keeping $ETC/policy.json"
    else
        install -m 0644 "$ROOT/examples/host-policy.json" "$ETC/policy.json"
    fi
    install -d -m 0700 "$STATE"
    chmod 0700 "$STATE"
    install -D -m 0644 "$ROOT/deploy/systemd/microseg.service" "$UNIT"
    restart_if_active
    local was=""
    [ -z "$old" ] || [ "$old" = "$version" ] || was=" (previous: $old)"
    say "microseg $version installed$was"
    if systemd_running && ! systemctl is-active --quiet microseg; then
        say "edit $ETC/microseg.toml (iface) and $ETC/policy.json, then:" \
            "systemctl enable --now microseg"
    fi
}

do_rollback() {
    local cur prev
    cur="$(readlink "$OPT/current" 2>/dev/null || true)"
    prev="$(readlink "$OPT/previous" 2>/dev/null || true)"
    [ -n "$cur" ] || die "nothing installed under $OPT"
    [ -n "$prev" ] && [ -e "$OPT/$prev" ] || die "no previous version under $OPT to roll back to"
    relink "$prev" "$OPT/current"
    relink "$cur" "$OPT/previous"
    restart_if_active
    say "rolled back from $cur to $prev (previous is now $cur)"
}

do_uninstall() {
    if systemd_running; then
        systemctl disable --now microseg 2>/dev/null || true
    fi
    # With keep-on-exit the classifier outlives the agent: detach what the config names.
    if [ -z "$D" ] && [ -x "$OPT/current/bin/python" ] && [ -r "$ETC/microseg.toml" ]; then
        local line
        while read -r line; do
            [ -n "$line" ] || continue
            # shellcheck disable=SC2086  # "--iface X [--netns N]" words on purpose
            "$OPT/current/bin/microseg" detach $line || true
        done < <("$OPT/current/bin/python" - "$ETC/microseg.toml" <<'PY' || true
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
ns = f" --netns {c['netns']}" if c.get("netns") else ""
for i in c.get("iface", []):
    print(f"--iface {i}{ns}")
PY
        )
    fi
    rm -f "$UNIT"
    if [ -L "$BIN_LINK" ]; then rm -f "$BIN_LINK"; fi
    rm -rf "${OPT:?}"
    if systemd_running; then systemctl daemon-reload; fi
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$ETC" "$STATE" "$D/var/cache/microseg" "$D/run/microseg"
        say "removed microseg, its configuration and its state"
    else
        say "removed microseg; kept $ETC and $STATE (--purge removes them)"
    fi
}

case "$ACTION" in
    install) do_install ;;
    rollback) do_rollback ;;
    uninstall) do_uninstall ;;
esac
