#!/usr/bin/env bash
# Install everything microseg needs on Debian 12, as root, without a terminal.
#
# Idempotent and quick when nothing is missing: apt is only touched when a package is
# absent, pip only when pyproject.toml changed since the last install. No systemd, so a
# Dockerfile can RUN it too (set SETUP_SKIP_MOUNT=1 there: a build cannot mount bpffs), and
# does (see Dockerfile): SETUP_IMAGE=1 then leaves out what an image does not need (Java,
# Maven and Kafka's jars: compose runs Kafka's own image; kernel headers: the host's are
# mounted; the browser and compose test tools).
#
#   apt:     tools and libraries below, plus kernel headers for bcc
#   bpffs:   mounted at /sys/fs/bpf
#   venv:    .venv from Debian's /usr/bin/python3 with system site-packages (bcc lives
#            in /usr/lib/python3/dist-packages), package installed editable with [dev]
#   kafka:   Java 17 and Maven when missing; Kafka's jars into scripts/kafka.sh's cache, once
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt, kernel headers, bpffs)"
[ -r /etc/debian_version ] || die "this script targets Debian 12; /etc/debian_version not found"

# Several people (or CI jobs) may run this at once in one checkout; apt and pip are not
# safe to run twice concurrently against the same targets.
exec 9>>"$ROOT/.setup.lock"
flock -w 900 9 || die "another setup has held $ROOT/.setup.lock for 15 minutes"

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
          -o Dpkg::Options::=--force-confold)
PACKAGES=(python3-bpfcc libbpf1 iproute2 python3-venv kcat nftables iperf3 ethtool
          tcpdump procps iputils-ping)
KVER="$(uname -r)"
ARCH="$(dpkg --print-architecture)"

missing_packages() {  # prints those of the given packages that are not installed
    # One dpkg-query for all (unknown names just print nothing on stdout).
    local installed
    installed="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "$@" 2>/dev/null \
                 | awk '$2 ~ /^ii/ { print $1 }' || true)"
    local pkg
    for pkg in "$@"; do
        grep -qxF "$pkg" <<<"$installed" || printf '%s\n' "$pkg"
    done
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        apt-get -q -o DPkg::Lock::Timeout=300 update
        apt_updated=1
    fi
}

apt_install() {
    apt_update_once
    say "apt-get install $*"
    apt-get install "${APT_OPTS[@]}" --no-install-recommends "$@"
}

# --- apt packages ---------------------------------------------------------------------
mapfile -t missing < <(missing_packages "${PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# --- make bench: side by side with nftables ----------------------------------------------
# iperf3 and nftables are above; a C compiler builds bench/nettool.c (TCP_RR / TCP_CRR / UDP
# flood: netperf is in Debian's non-free only); matplotlib draws docs/bench.png (the venv
# sees Debian's through its system site-packages).
BENCH_PACKAGES=(gcc libc6-dev python3-matplotlib util-linux coreutils)
mapfile -t missing < <(missing_packages "${BENCH_PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# --- the viewer's browser tests, the compose check, make in the image -------------------
# Debian's Chromium and chromedriver, driven by Debian's Selenium (the venv sees it through
# its system site-packages), for tests/test_viewer.py; Debian's docker-compose validates
# docker-compose.yml (tests/test_compose.py). `make` runs the demo inside the image.
VIEWER_PACKAGES=(make)
if [ "${SETUP_IMAGE:-0}" != 1 ]; then
    VIEWER_PACKAGES+=(chromium chromium-driver python3-selenium docker-compose)
fi
mapfile -t missing < <(missing_packages "${VIEWER_PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# --- the alert rules' tests -------------------------------------------------------------
# Debian's prometheus gives promtool (`promtool check rules` / `test rules` on
# deploy/prometheus/) and the server a test runs against a real agent
# (tests/test_deploy_prometheus.py; it listens on a port of its own, not the package's 9090).
if [ "${SETUP_IMAGE:-0}" != 1 ]; then
    mapfile -t missing < <(missing_packages prometheus)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
fi

# --- tests/test_install.py: the unit and the installed agent ------------------------------
# systemd-analyze verifies microseg.service offline (systemd need not be PID 1; installing the
# package in a container does not make it so); nsenter and setpriv run the installed agent in
# a lab's namespace with the unit's capabilities only; the venvs come from python3-venv above.
if [ "${SETUP_IMAGE:-0}" != 1 ]; then
    mapfile -t missing < <(missing_packages systemd util-linux)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
fi

# --- Java and Maven, for the local Kafka (make kafka, tests) -------------------------------
if [ "${SETUP_IMAGE:-0}" != 1 ]; then  # (not in an image: compose runs Kafka's own)
# Usually preinstalled. Kafka 4 needs Java 17 or newer; scripts/kafka.sh also finds a JDK 17
# under /usr/lib/jvm when `java` on PATH is an older one.
java17_ok() {
    local c v
    for c in "$(command -v java || true)" /usr/lib/jvm/java-17-openjdk-*/bin/java; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        v="$("$c" -version 2>&1 | sed -n '1s/.*version "\([0-9]*\).*/\1/p')"
        if [ -n "$v" ] && [ "$v" -ge 17 ]; then return 0; fi
    done
    return 1
}
java_maven=()
java17_ok || java_maven+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || java_maven+=(maven)
if [ "${#java_maven[@]}" -gt 0 ]; then
    apt_install "${java_maven[@]}"
fi
java17_ok || die "no Java 17 runtime after installing openjdk-17-jre-headless"
command -v mvn >/dev/null || die "no mvn after installing maven"
fi

# --- kernel headers for bcc -------------------------------------------------------------
# bcc compiles against /lib/modules/$(uname -r)/build. A distro kernel has a matching
# headers package. A foreign kernel (VM/cloud builds) has none: Debian's generic headers
# then do for TC programs (only stable UAPI/helpers are used), linked into place.
# In an image (SETUP_IMAGE=1) the host's /lib/modules and /usr/src are mounted at run time.
if [ "${SETUP_IMAGE:-0}" != 1 ] && [ ! -e "/lib/modules/$KVER/build" ]; then
    apt_update_once
    if apt-cache show "linux-headers-$KVER" >/dev/null 2>&1; then
        apt_install "linux-headers-$KVER"
    else
        mapfile -t missing < <(missing_packages "linux-headers-$ARCH")
        if [ "${#missing[@]}" -gt 0 ]; then
            apt_install "linux-headers-$ARCH"
        fi
    fi
fi
if [ "${SETUP_IMAGE:-0}" != 1 ] && [ ! -e "/lib/modules/$KVER/build" ]; then
    newest="$(find /usr/src -maxdepth 1 -name "linux-headers-*-$ARCH" -printf '%f\n' \
              | sed -e "s/^linux-headers-//" -e "s/-$ARCH\$//" | sort -V | tail -n 1)"
    [ -n "$newest" ] || die "no /usr/src/linux-headers-*-$ARCH found after installing headers"
    [ -d "/usr/src/linux-headers-$newest-common" ] \
        || die "/usr/src/linux-headers-$newest-common is missing (broken headers install?)"
    say "kernel $KVER has no headers package; using $newest headers"
    mkdir -p "/lib/modules/$KVER"
    ln -sfn "/usr/src/linux-headers-$newest-$ARCH" "/lib/modules/$KVER/build"
    ln -sfn "/usr/src/linux-headers-$newest-common" "/lib/modules/$KVER/source"
fi

# --- bpffs -----------------------------------------------------------------------------
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts
then
    if [ "${SETUP_SKIP_MOUNT:-0}" = 1 ]; then
        say "SETUP_SKIP_MOUNT=1: not mounting bpffs (mount it before running the agent)"
    else
        say "mounting bpffs at /sys/fs/bpf"
        mkdir -p /sys/fs/bpf 2>/dev/null || true
        mount -t bpf bpf /sys/fs/bpf \
            || die "cannot mount bpffs at /sys/fs/bpf (in a container: run it privileged)"
    fi
fi

# --- venv --------------------------------------------------------------------------------
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"
venv_ok() {
    [ -x "$VENV/bin/python" ] && [ -r "$VENV/pyvenv.cfg" ] \
        && grep -Eq '^home *= */usr/bin$' "$VENV/pyvenv.cfg" \
        && grep -Eq '^include-system-site-packages *= *true$' "$VENV/pyvenv.cfg"
}
if [ -e "$VENV" ] && ! venv_ok; then
    say "$VENV is not a /usr/bin/python3 venv with system site-packages; recreating it"
    rm -rf "$VENV"
fi
if [ ! -e "$VENV" ]; then
    say "creating $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [ ! -e "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    say "pip install -e '.[dev]'"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]"
    touch "$STAMP"
fi

# --- Kafka's jars ----------------------------------------------------------------------------
# Fetched from Maven Central once into a cache (scripts/kafka.sh says where), so that tests
# and `make kafka` only start a JVM. Bounded; a clear error when Maven Central is unreachable.
if [ "${SETUP_IMAGE:-0}" != 1 ] && ! scripts/kafka.sh cached >/dev/null; then
    scripts/kafka.sh fetch || die "could not fetch Apache Kafka's jars (see above)"
fi

# --- check --------------------------------------------------------------------------------
if ! err="$("$VENV/bin/python" -c 'import bcc, pyroute2' 2>&1)"; then
    die "the venv cannot import bcc/pyroute2:
$err
(bcc comes from the Debian package python3-bpfcc; the venv must be built from
/usr/bin/python3 with --system-site-packages)"
fi
say "ok (kernel $KVER, headers $(readlink -f "/lib/modules/$KVER/build"))"
