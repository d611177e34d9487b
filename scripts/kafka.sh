#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft, broker + controller in one JVM) for demos and tests.
#
#   scripts/kafka.sh fetch  [--version V]
#   scripts/kafka.sh cached [--version V]
#   scripts/kafka.sh start  [--port P | --listen ADDR:PORT [--advertised HOST:PORT]]
#                           [--controller-port C] [--dir D] [--version V] [--timeout S]
#   scripts/kafka.sh stop   [--port P | --dir D] [--keep] [--timeout S]
#   scripts/kafka.sh status [--port P | --dir D]
#
# fetch   Kafka's jars from Maven Central into the cache, once (later calls do not touch the
#         network). `start` fetches too when the cache is empty; `make setup` does it ahead.
# cached  prints the cache's jar directory and exits 0 when fetched, exits 1 otherwise.
# start   formats a fresh data dir (or reuses D's), starts the JVM detached, waits (bounded)
#         until the broker answers metadata requests, then prints its advertised address
#         ("127.0.0.1:P" by default) on stdout. --listen ADDR:PORT listens there instead of
#         127.0.0.1:P (0.0.0.0 for every address: other hosts' agents can then reach it);
#         --advertised HOST:PORT is the address clients are told to use (default: the listen
#         address; required with 0.0.0.0 or ::). The controller stays on 127.0.0.1.
#         Starting what already runs just prints its address. D (default: a new temporary
#         directory) holds server.properties, data/, logs/server.log and kafka.pid; a restart
#         with the same D keeps topics, data and ports.
# stop    SIGTERM, then SIGKILL after --timeout (default 30 s); removes D unless --keep.
#         Stopping what does not run is not an error.
# status  prints the address, pid and dir and exits 0 when running; exits 3 otherwise.
#
# By default everything listens on 127.0.0.1 of the network namespace it is started in, so
# `ip netns exec NS scripts/kafka.sh start` gives NS its own broker on 127.0.0.1:9092; stop and
# status find brokers per namespace and port. Messages go to stderr, results to stdout.
#
# Environment: MICROSEG_KAFKA_VERSION (default: DEFAULT_VERSION below), MICROSEG_KAFKA_CACHE (default
# /var/cache/microseg/kafka for root, ~/.cache/microseg/kafka otherwise), MICROSEG_KAFKA_HEAP
# (default 512m), MICROSEG_KAFKA_FETCH_TIMEOUT (seconds, default 900), JAVA_HOME.
set -euo pipefail

DEFAULT_VERSION=4.3.1
SCALA=2.13
PROG="kafka"

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    printf 'usage: %s fetch|cached|start|stop|status [--port P] [--listen ADDR:PORT] [--advertised HOST:PORT] [--controller-port C] [--dir D] [--version V] [--timeout S] [--keep]\n' "$0" >&2
    exit 2
}

if [ "$(id -u)" -eq 0 ]; then
    CACHE_ROOT="${MICROSEG_KAFKA_CACHE:-/var/cache/microseg/kafka}"
    RUN_DIR="/run/microseg/kafka"
else
    CACHE_ROOT="${MICROSEG_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microseg/kafka}"
    RUN_DIR="${XDG_RUNTIME_DIR:-/tmp}/microseg-kafka-$(id -u)"
fi
VERSION="${MICROSEG_KAFKA_VERSION:-$DEFAULT_VERSION}"
HEAP="${MICROSEG_KAFKA_HEAP:-512m}"
FETCH_TIMEOUT="${MICROSEG_KAFKA_FETCH_TIMEOUT:-900}"
MARKER=".microseg-kafka"

# ---- arguments ------------------------------------------------------------------------

[ $# -ge 1 ] || usage_error "missing command"
CMD="$1"; shift
case "$CMD" in
    fetch|cached|start|stop|status) ;;
    -h|--help) sed -n '2,34s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) usage_error "unknown command '$CMD'" ;;
esac

PORT=""; CPORT=""; DIR=""; KEEP=0; TIMEOUT=""; LISTEN=""; ADVERTISED=""
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || usage_error "option $1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --port) need_value "$@"; PORT="$2"; shift 2 ;;
        --controller-port) need_value "$@"; CPORT="$2"; shift 2 ;;
        --listen) need_value "$@"; LISTEN="$2"; shift 2 ;;
        --advertised) need_value "$@"; ADVERTISED="$2"; shift 2 ;;
        --dir) need_value "$@"; DIR="$2"; shift 2 ;;
        --version) need_value "$@"; VERSION="$2"; shift 2 ;;
        --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) usage_error "unknown option '$1'" ;;
    esac
done

valid_port() { [[ "$1" =~ ^[0-9]{1,5}$ ]] && [ "$((10#$1))" -ge 1 ] && [ "$((10#$1))" -le 65535 ]; }
if [ -n "$PORT" ]; then
    valid_port "$PORT" || usage_error "invalid --port '$PORT': expected 1-65535"
    PORT=$((10#$PORT))
fi
# ADDR:PORT (IPv6 in brackets: [::]:9092) -> "ADDR PORT"; empty when malformed.
split_hostport() {
    local v6='^\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})$' plain='^([^]:[]+):([0-9]{1,5})$'
    if [[ "$1" =~ $v6 ]] || [[ "$1" =~ $plain ]]; then
        local host="${BASH_REMATCH[1]}" port="${BASH_REMATCH[2]}"  # valid_port's =~ resets them
        if valid_port "$port"; then
            printf '%s %s\n' "$host" "$((10#$port))"
        fi
    fi
}
LISTEN_HOST=""
if [ -n "$LISTEN" ]; then
    read -r LISTEN_HOST lport <<<"$(split_hostport "$LISTEN")" || true
    [ -n "$LISTEN_HOST" ] || usage_error "invalid --listen '$LISTEN': expected ADDR:PORT (e.g. 0.0.0.0:9092)"
    if [ -n "$PORT" ] && [ "$PORT" -ne "$lport" ]; then
        usage_error "--port $PORT and --listen $LISTEN name different ports"
    fi
    PORT=$lport
    [[ "$LISTEN_HOST" == *:* ]] && LISTEN="[$LISTEN_HOST]:$PORT" || LISTEN="$LISTEN_HOST:$PORT"
fi
if [ -n "$ADVERTISED" ]; then
    [ "$CMD" = start ] || usage_error "--advertised is for start"
    [ -n "$(split_hostport "$ADVERTISED")" ] \
        || usage_error "invalid --advertised '$ADVERTISED': expected HOST:PORT (e.g. kafka1.example.net:9092)"
fi
if [ -n "$LISTEN" ] && [ -z "$ADVERTISED" ]; then
    case "$LISTEN_HOST" in
        0.0.0.0|::) usage_error "--listen $LISTEN listens on every address: say which one clients use with --advertised HOST:PORT" ;;
    esac
fi
if [ -n "$CPORT" ]; then
    valid_port "$CPORT" || usage_error "invalid --controller-port '$CPORT': expected 1-65535"
    CPORT=$((10#$CPORT))
fi
if [ -n "$TIMEOUT" ]; then
    [[ "$TIMEOUT" =~ ^[0-9]{1,4}$ ]] && [ "$TIMEOUT" -gt 0 ] \
        || usage_error "invalid --timeout '$TIMEOUT': expected whole seconds, 1-9999"
fi
[[ "$VERSION" =~ ^4\.[0-9]+\.[0-9]+$ ]] \
    || usage_error "invalid Kafka version '$VERSION': expected 4.x.y (this script runs KRaft with log4j2)"
if [ -n "$DIR" ]; then
    DIR="$(realpath -m -- "$DIR")"
    [ "$DIR" != / ] || usage_error "--dir / is not a broker directory"
fi
if [ -n "$PORT" ] && [ -n "$CPORT" ] && [ "$PORT" -eq "$CPORT" ]; then
    usage_error "--port and --controller-port must differ"
fi

LIB="$CACHE_ROOT/$VERSION/lib"

# ---- the jar cache ----------------------------------------------------------------------

cache_ok() { [ -f "$CACHE_ROOT/$VERSION/.complete" ] && [ -f "$LIB/kafka_$SCALA-$VERSION.jar" ]; }

# mvn with a private local repository; its output goes to $log. Bounded by FETCH_TIMEOUT.
run_mvn() {
    local work="$1" log="$2"; shift 2
    local rc=0
    timeout --kill-after=10 "$FETCH_TIMEOUT" mvn -B -f "$work/pom.xml" \
        -Dmaven.repo.local="$work/m2" \
        -Dmaven.wagon.http.retryHandler.count=3 -Dmaven.wagon.rto=60000 \
        "$@" >>"$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then return 0; fi
    rm -rf -- "$work"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        die "Maven did not finish within ${FETCH_TIMEOUT}s fetching Kafka $VERSION (slow or no network?); log: $log"
    fi
    if grep -qiE 'could not (transfer|resolve)|unknown ?host|connect(ion)? (timed out|refused)|network is unreachable|no route to host|temporary failure in name resolution' "$log"; then
        if grep -qiE 'could not find artifact|was not found in' "$log"; then
            die "Kafka $VERSION (org.apache.kafka:kafka_$SCALA) is not on Maven Central; log: $log"
        fi
        die "cannot download Kafka $VERSION from Maven Central (is it reachable from here?); log: $log
$(grep -E 'ERROR' "$log" | head -n 3)"
    fi
    die "Maven failed (exit $rc) fetching Kafka $VERSION; log: $log
$(grep -E 'ERROR' "$log" | head -n 5)"
}

fetch() {
    if cache_ok; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn (Maven) is missing: run 'make setup' (Debian package maven)"
    mkdir -p "$CACHE_ROOT"
    # One fetch at a time per cache; whoever waited finds the cache filled.
    exec {lockfd}>>"$CACHE_ROOT/.fetch.lock"
    flock -w "$FETCH_TIMEOUT" "$lockfd" || die "another fetch has held $CACHE_ROOT/.fetch.lock for ${FETCH_TIMEOUT}s"
    if cache_ok; then
        exec {lockfd}>&-
        return 0
    fi
    local work="$CACHE_ROOT/.work-$VERSION-$$"
    local log="$CACHE_ROOT/fetch-$VERSION.log"
    # Under the lock no other fetch runs: work dirs left are from fetches that were killed.
    rm -rf -- "$CACHE_ROOT"/.work-*
    mkdir -p "$work/out/lib"
    : >"$log"
    say "fetching Apache Kafka $VERSION (kafka_$SCALA) with Maven into $CACHE_ROOT/$VERSION (once)"
    cat >"$work/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka.sh: only used to resolve Kafka's run-time jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.microseg</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>$VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_$SCALA</artifactId>
      <version>$VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
    run_mvn "$work" "$log" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$work/out/lib"
    # Kafka ships log4j2 but no SLF4J binding for it (the distribution adds one): without it
    # the broker would log nothing. Pick the binding matching Kafka's log4j and SLF4J.
    local core log4j binding
    core="$(cd "$work/out/lib" && ls log4j-core-*.jar 2>/dev/null | head -n 1)"
    [ -n "$core" ] || die "Kafka $VERSION brought no log4j-core jar; cannot set up its logging (log: $log)"
    log4j="${core#log4j-core-}"; log4j="${log4j%.jar}"
    if ls "$work/out/lib"/slf4j-api-1.* >/dev/null 2>&1; then
        binding="log4j-slf4j-impl"
    else
        binding="log4j-slf4j2-impl"
    fi
    run_mvn "$work" "$log" dependency:copy \
        -Dartifact="org.apache.logging.log4j:$binding:$log4j" -DoutputDirectory="$work/out/lib"
    [ -f "$work/out/lib/kafka_$SCALA-$VERSION.jar" ] \
        || die "Maven finished but kafka_$SCALA-$VERSION.jar is missing (log: $log)"
    cp "$work/pom.xml" "$work/out/pom.xml"
    (cd "$work/out/lib" && ls) >"$work/out/.complete"
    rm -rf "${CACHE_ROOT:?}/$VERSION"
    mv "$work/out" "$CACHE_ROOT/$VERSION"
    rm -rf "$work"
    exec {lockfd}>&-
    say "cached Kafka $VERSION: $(du -sh "$CACHE_ROOT/$VERSION" | cut -f1) in $CACHE_ROOT/$VERSION"
}

# ---- Java ---------------------------------------------------------------------------------

java_major() {  # "17.0.15" -> 17, "1.8.0_x" -> 1
    "$1" -version 2>&1 | sed -n '1s/.*version "\([0-9]*\).*/\1/p'
}

find_java() {
    local c major
    for c in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" \
             /usr/lib/jvm/java-17-openjdk-*/bin/java /usr/lib/jvm/java-*-openjdk-*/bin/java; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        major="$(java_major "$c")"
        if [ -n "$major" ] && [ "$major" -ge 17 ]; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    die "no Java 17 or newer found (Kafka $VERSION needs it): run 'make setup' (Debian package openjdk-17-jre-headless)"
}

# ---- brokers: where they are --------------------------------------------------------------

# The network namespace we run in, as the kernel names it ("4026531840"): brokers on the
# same port in different namespaces are different brokers.
NETNS_ID="$(readlink /proc/self/ns/net | tr -dc '0-9')"
[ -n "$NETNS_ID" ] || die "cannot read /proc/self/ns/net"

registry_file() { printf '%s/%s-%s\n' "$RUN_DIR" "$NETNS_ID" "$1"; }

# Prints the broker dir registered for port $1 in this namespace, if any.
registered_dir() {
    local f
    f="$(registry_file "$1")"
    [ -f "$f" ] && head -n 1 "$f" || true
}

conf_get() {  # conf_get DIR KEY: a value from DIR's marker file
    [ -f "$1/$MARKER" ] && sed -n "s/^$2=//p" "$1/$MARKER" | head -n 1 || true
}

advertised_of() {  # the address clients use for the broker of DIR $1 (older dirs: 127.0.0.1:port)
    local a
    a="$(conf_get "$1" advertised)"
    printf '%s\n' "${a:-127.0.0.1:$(conf_get "$1" port)}"
}

# Prints the pid of the broker JVM of dir $1 when it runs (checked against its command line,
# so a recycled pid is never taken for it).
broker_pid() {
    local d="$1" pid
    [ -f "$d/kafka.pid" ] || return 0
    pid="$(head -n 1 "$d/kafka.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if [ -r "/proc/$pid/cmdline" ] \
        && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$d/server.properties"; then
        printf '%s\n' "$pid"
    fi
}

# Resolves DIR for stop/status: --dir, else the registered one for --port (default 9092).
resolve_dir() {
    if [ -n "$DIR" ]; then
        return 0
    fi
    PORT="${PORT:-9092}"
    DIR="$(registered_dir "$PORT")"
}

port_in_use() {  # a TCP listener on 127.0.0.1:$1 (or the wildcard) in this namespace
    [ -n "$(ss -H -ltn "sport = :$1" 2>/dev/null)" ]
}

pick_controller_port() {
    local p
    for p in $((PORT + 1)) $((PORT + 2)) $((PORT + 3)); do
        if [ "$p" -le 65535 ] && ! port_in_use "$p"; then printf '%s\n' "$p"; return 0; fi
    done
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 12000))
        if [ "$p" -ne "$PORT" ] && ! port_in_use "$p"; then printf '%s\n' "$p"; return 0; fi
    done
    die "no free port found for the controller listener; pass --controller-port"
}

# ---- start ----------------------------------------------------------------------------------

write_configs() {  # write_configs DIR PORT CPORT LISTEN ADVERTISED
    local d="$1" port="$2" cport="$3" listen="$4" advertised="$5"
    cat >"$d/server.properties" <<EOF
# Generated by scripts/kafka.sh: one KRaft node, broker and controller (on 127.0.0.1 only).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://$listen,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$d/data
auto.create.topics.enable=true
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Consumers in tests join at once instead of waiting for more members.
group.initial.rebalance.delay.ms=0
# After a crash (SIGKILL) the old registration blocks the restarted broker until its session
# expires: 4 s instead of 9 s (heartbeats every second keep a live broker well inside it).
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
# Small: a demo/test broker on a 2-core machine with a modest heap.
num.network.threads=2
num.io.threads=4
log.segment.bytes=8388608
log.cleaner.dedupe.buffer.size=8388608
log.retention.hours=24
EOF
    cat >"$d/log4j2.properties" <<EOF
# Generated by scripts/kafka.sh: everything to logs/server.log, nothing on the console.
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $d/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka-request.name = kafka.request.logger
logger.kafka-request.level = WARN
logger.state-change.name = state.change.logger
logger.state-change.level = WARN
EOF
}

log_tail() {  # the last lines of the broker's logs, for error messages
    local d="$1" f
    for f in "$d/logs/stdout.log" "$d/logs/server.log"; do
        if [ -s "$f" ]; then
            printf -- '--- last lines of %s:\n' "$f"
            grep -E 'ERROR|FATAL|Exception|Error' "$f" | tail -n 8 || true
            tail -n 5 "$f"
        fi
    done
}

# Waits until the broker of $1 (pid $2) answers metadata on $3; returns 1 when it died.
wait_ready() {
    local d="$1" pid="$2" bootstrap="$3" limit="$4"
    local deadline=$((SECONDS + limit))
    while [ "$SECONDS" -lt "$deadline" ]; do
        kill -0 "$pid" 2>/dev/null || return 1
        if timeout 5 kcat -b "$bootstrap" -L -J -m 2 2>/dev/null | grep -q '"brokers":\[{"id":1,'; then
            return 0
        fi
        sleep 0.3
    done
    return 2
}

elapsed() {  # seconds since $EPOCHREALTIME value $1, one decimal
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

kill_broker() {  # kill_broker PID GRACE: SIGTERM, SIGKILL after GRACE seconds; waits for exit
    local pid="$1" grace="$2" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "pid $pid did not stop within ${grace}s of SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "pid $pid survived SIGKILL for 10s"
}

start() {
    command -v kcat >/dev/null || die "kcat is missing (used to check the broker is up): run 'make setup'"
    command -v ss >/dev/null && command -v ip >/dev/null \
        || die "ss/ip (iproute2) are missing: run 'make setup'"
    local made_dir=0 existing pid

    if [ -z "$DIR" ]; then
        PORT="${PORT:-9092}"
        existing="$(registered_dir "$PORT")"
        if [ -n "$existing" ] && [ -n "$(broker_pid "$existing")" ]; then
            say "already running on $(advertised_of "$existing") (pid $(broker_pid "$existing"), dir $existing)"
            advertised_of "$existing"
            return 0
        fi
        if [ -n "$existing" ] && [ -f "$existing/$MARKER" ]; then
            # Left by a broker that died or a host that rebooted without stop: not ours to keep.
            rm -rf -- "$existing"
        fi
        DIR="$(mktemp -d "${TMPDIR:-/tmp}/microseg-kafka-XXXXXX")"
        made_dir=1
    else
        if [ -e "$DIR" ] && [ ! -d "$DIR" ]; then
            usage_error "--dir $DIR exists and is not a directory"
        fi
        if [ -d "$DIR" ] && [ ! -f "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR")" ]; then
            usage_error "--dir $DIR is not empty and was not made by this script; use a new or empty directory"
        fi
        pid="$(broker_pid "$DIR")"
        if [ -n "$pid" ]; then
            say "already running on $(advertised_of "$DIR") (pid $pid, dir $DIR)"
            advertised_of "$DIR"
            return 0
        fi
        # A restart keeps the ports the data was made with unless told otherwise.
        PORT="${PORT:-$(conf_get "$DIR" port)}"
        PORT="${PORT:-9092}"
        CPORT="${CPORT:-$(conf_get "$DIR" controller_port)}"
        # ... and the addresses, unless given (a new --listen alone advertises itself).
        if [ -z "$LISTEN" ] && [ "$PORT" = "$(conf_get "$DIR" port)" ]; then
            LISTEN="$(conf_get "$DIR" listen)"
            ADVERTISED="${ADVERTISED:-$(conf_get "$DIR" advertised)}"
        fi
        if [ -f "$DIR/$MARKER" ] && [ "$(conf_get "$DIR" version)" != "$VERSION" ]; then
            usage_error "--dir $DIR holds data of Kafka $(conf_get "$DIR" version), not $VERSION"
        fi
        mkdir -p "$DIR"
    fi
    # When the start fails or is interrupted (Ctrl-C in `make kafka`): no JVM left behind,
    # no registration, and a temporary dir made here goes too (a given --dir stays).
    CLEANUP_DIR=$made_dir
    STARTED_PID=""
    # shellcheck disable=SC2317  # called by the trap
    on_fail() {
        trap - EXIT INT TERM
        if [ -n "$STARTED_PID" ] && kill -0 "$STARTED_PID" 2>/dev/null; then
            kill_broker "$STARTED_PID" 5 || true
        fi
        rm -f "$(registry_file "$PORT")"
        if [ "$CLEANUP_DIR" -eq 1 ]; then rm -rf -- "$DIR"; fi
    }
    trap on_fail EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    # A namespace made with `ip netns add` starts with its loopback down: nothing could
    # connect to 127.0.0.1 there.
    if ! ip -o link show lo 2>/dev/null | grep -qE '<([A-Z_]+,)*UP[,>]'; then
        say "bringing up the loopback interface of this network namespace"
        ip link set lo up || die "cannot bring up lo in this network namespace"
    fi

    LISTEN="${LISTEN:-127.0.0.1:$PORT}"
    ADVERTISED="${ADVERTISED:-$LISTEN}"
    # Where this script itself connects: the listen address, or loopback for a wildcard.
    local connect="$LISTEN"
    case "$LISTEN" in 0.0.0.0:*|"[::]":*) connect="127.0.0.1:$PORT" ;; esac

    if port_in_use "$PORT"; then
        die "127.0.0.1:$PORT is already in use in this network namespace (another broker? try: $0 status --port $PORT)"
    fi
    CPORT="${CPORT:-$(pick_controller_port)}"
    [ "$CPORT" -ne "$PORT" ] || usage_error "--port and --controller-port must differ"
    if port_in_use "$CPORT"; then
        die "controller port 127.0.0.1:$CPORT is already in use; pass another --controller-port"
    fi

    fetch
    local java
    java="$(find_java)"

    mkdir -p "$DIR/data" "$DIR/logs"
    printf 'version=%s\nport=%s\ncontroller_port=%s\nlisten=%s\nadvertised=%s\n' \
        "$VERSION" "$PORT" "$CPORT" "$LISTEN" "$ADVERTISED" >"$DIR/$MARKER"
    write_configs "$DIR" "$PORT" "$CPORT" "$LISTEN" "$ADVERTISED"
    local jvm_common=(-Djava.awt.headless=true -Dlog4j2.configurationFile="$DIR/log4j2.properties"
                      -cp "$LIB/*")
    local t0=$EPOCHREALTIME
    if [ ! -f "$DIR/data/meta.properties" ]; then
        # A Kafka cluster id: 16 random bytes, base64url without padding, not starting with
        # "-" (Kafka's own generator avoids that too: it would read as an option).
        local cluster_id="-"
        while [[ "$cluster_id" == -* ]]; do
            cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        done
        if ! "$java" -Xmx256m "${jvm_common[@]}" kafka.tools.StorageTool format \
                --cluster-id="$cluster_id" --config="$DIR/server.properties" \
                >"$DIR/logs/format.log" 2>&1; then
            die "formatting $DIR/data failed:
$(tail -n 20 "$DIR/logs/format.log")"
        fi
    fi

    # setsid: the broker outlives the shell (and make) that started it, and Ctrl-C there does
    # not reach it. The inner shell writes its own pid, which exec hands to the JVM.
    : >"$DIR/logs/stdout.log"
    rm -f "$DIR/kafka.pid"  # a crashed broker's, which would be read below instead of ours
    setsid bash -c 'echo $$ >"$1/kafka.pid"; shift; exec "$@"' _ "$DIR" \
        "$java" -Xms128m -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError "${jvm_common[@]}" \
        kafka.Kafka "$DIR/server.properties" \
        </dev/null >>"$DIR/logs/stdout.log" 2>&1 &
    local i
    for ((i = 0; i < 50; i++)); do
        [ -s "$DIR/kafka.pid" ] && break
        sleep 0.1
    done
    pid="$(head -n 1 "$DIR/kafka.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || die "the broker JVM did not start (no pid in $DIR/kafka.pid)"
    STARTED_PID=$pid
    mkdir -p "$RUN_DIR"
    printf '%s\n' "$DIR" >"$(registry_file "$PORT")"

    local rc=0
    wait_ready "$DIR" "$pid" "$connect" "${TIMEOUT:-60}" || rc=$?
    if [ "$rc" -ne 0 ]; then
        local why="did not answer on $connect within ${TIMEOUT:-60}s"
        [ "$rc" -eq 1 ] && why="exited during start-up"
        local tail_text
        tail_text="$(log_tail "$DIR")"
        if [ "$CLEANUP_DIR" -eq 0 ]; then
            tail_text="$tail_text
(logs kept in $DIR/logs)"
        fi
        die "Kafka $VERSION $why
$tail_text"
    fi
    trap - EXIT INT TERM
    local where="$ADVERTISED"
    [ "$LISTEN" = "$ADVERTISED" ] || where="$ADVERTISED (listening on $LISTEN)"
    say "Kafka $VERSION ready on $where in $(elapsed "$t0")s (pid $pid, controller 127.0.0.1:$CPORT, dir $DIR); stop: $0 stop --port $PORT"
    printf '%s\n' "$ADVERTISED"
}

# ---- stop / status ----------------------------------------------------------------------------

stop() {
    resolve_dir
    if [ -z "$DIR" ] || [ ! -d "$DIR" ]; then
        say "no broker${PORT:+ on 127.0.0.1:$PORT}${DIR:+ in $DIR} in this network namespace; nothing to stop"
        [ -n "$PORT" ] && rm -f "$(registry_file "$PORT")"
        return 0
    fi
    [ -f "$DIR/$MARKER" ] || usage_error "$DIR is not a broker directory made by this script"
    local port pid
    port="$(conf_get "$DIR" port)"
    pid="$(broker_pid "$DIR")"
    if [ -n "$pid" ]; then
        kill_broker "$pid" "${TIMEOUT:-30}"
        say "stopped the broker on $(advertised_of "$DIR") (pid $pid)"
    else
        say "the broker of $DIR was not running"
    fi
    rm -f "$DIR/kafka.pid"
    # Its registration, whichever namespace it was started in (a reaper may stop it from
    # another one).
    local f
    for f in "$RUN_DIR"/*; do
        if [ -f "$f" ] && [ "$(head -n 1 "$f")" = "$DIR" ]; then rm -f "$f"; fi
    done
    if [ "$KEEP" -eq 1 ]; then
        say "kept $DIR (data and logs)"
    else
        rm -rf -- "$DIR"
    fi
}

status() {
    resolve_dir
    local pid=""
    if [ -n "$DIR" ] && [ -d "$DIR" ]; then
        pid="$(broker_pid "$DIR")"
    fi
    if [ -z "$pid" ]; then
        printf 'not running%s\n' "${PORT:+ (127.0.0.1:$PORT)}${DIR:+ (dir $DIR)}"
        exit 3
    fi
    printf 'running %s pid %s version %s dir %s\n' \
        "$(advertised_of "$DIR")" "$pid" "$(conf_get "$DIR" version)" "$DIR"
}

case "$CMD" in
    fetch)
        if cache_ok; then
            say "Kafka $VERSION already cached in $CACHE_ROOT/$VERSION"
        else
            fetch
        fi
        ;;
    cached)
        cache_ok || exit 1
        printf '%s\n' "$LIB"
        ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
esac
