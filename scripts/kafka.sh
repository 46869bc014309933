#!/usr/bin/env bash
# Runs a real single-node Apache Kafka broker (KRaft: broker + controller in one JVM) on loopback,
# for development and for the Kafka tests. The broker's jars come from Maven Central through Maven
# (scripts/kafka/pom.xml), because package registries are the one thing reachable everywhere we
# run (CI, offline-ish dev boxes) and Docker is not always available.
#
# Usage: scripts/kafka.sh fetch|start|stop|wipe|status|config
#   config: only write server.properties and log4j2.properties into SNAPLEARN_KAFKA_DIR (what
#   start writes; tests/helpers/kafka_cluster.py writes each node of its cluster with it, so the
#   single-node and cluster brokers have one source of settings)
#
# Environment (all optional):
#   SNAPLEARN_KAFKA_VERSION          Kafka version to fetch/run                 (4.4.0)
#   SNAPLEARN_CACHE                  jar cache root             (~/.cache/snaplearn)
#   SNAPLEARN_KAFKA_DIR              config, data, log and pid file   (<repo>/.kafka)
#   SNAPLEARN_KAFKA_PORT             client (PLAINTEXT) port                      (19092)
#   SNAPLEARN_KAFKA_CONTROLLER_PORT  KRaft controller port                        (19093)
#   SNAPLEARN_KAFKA_PARTITIONS       num.partitions for topics created without a count (3)
#   SNAPLEARN_KAFKA_NODE_ID          node.id                                          (1)
#   SNAPLEARN_KAFKA_VOTERS           a static controller quorum, id@host:port,...  (unset:
#                                    this node alone, formatted --standalone)
#   SNAPLEARN_KAFKA_REPLICATION      replication factor of topics and internal topics (1)
#   SNAPLEARN_KAFKA_MIN_ISR          min.insync.replicas                              (1)
#   SNAPLEARN_KAFKA_START_TIMEOUT    seconds to wait for the broker to serve metadata (120)
#   SNAPLEARN_KAFKA_STOP_TIMEOUT     seconds to wait after SIGTERM before SIGKILL    (30)
#   SNAPLEARN_KAFKA_JVM_OPTS         JVM flags                         (-Xms128m -Xmx512m ...)
#   SNAPLEARN_PYTHON                 python with kafka-python, for the readiness check
#                                    (<repo>/.venv/bin/python, else python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POM="$REPO_ROOT/scripts/kafka/pom.xml"

KAFKA_VERSION="${SNAPLEARN_KAFKA_VERSION:-4.4.0}"
CACHE_ROOT="${SNAPLEARN_CACHE:-$HOME/.cache/snaplearn}"
KAFKA_CACHE="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_CACHE/libs"
DATA_DIR="${SNAPLEARN_KAFKA_DIR:-$REPO_ROOT/.kafka}"
HOST=127.0.0.1
PORT="${SNAPLEARN_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${SNAPLEARN_KAFKA_CONTROLLER_PORT:-19093}"
PARTITIONS="${SNAPLEARN_KAFKA_PARTITIONS:-3}"
NODE_ID="${SNAPLEARN_KAFKA_NODE_ID:-1}"
VOTERS="${SNAPLEARN_KAFKA_VOTERS:-}"
REPLICATION="${SNAPLEARN_KAFKA_REPLICATION:-1}"
MIN_ISR="${SNAPLEARN_KAFKA_MIN_ISR:-1}"
START_TIMEOUT="${SNAPLEARN_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${SNAPLEARN_KAFKA_STOP_TIMEOUT:-30}"
# Small heap: dev machines and CI runners have 2 cores and little memory to spare. C1-only JIT
# (TieredStopAtLevel=1) roughly halves startup CPU on 2 cores; throughput is irrelevant here.
JVM_OPTS="${SNAPLEARN_KAFKA_JVM_OPTS:--Xms128m -Xmx512m -XX:+UseG1GC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError}"

PID_FILE="$DATA_DIR/kafka.pid"
LOG_FILE="$DATA_DIR/kafka.log"
CONFIG_FILE="$DATA_DIR/server.properties"
LOG4J_FILE="$DATA_DIR/log4j2.properties"
PORTS_FILE="$DATA_DIR/ports"
LOG_DIRS="$DATA_DIR/data"
# Marks a directory this script created, so that `wipe` never deletes anything else.
OWNER_MARK="$DATA_DIR/.snaplearn-kafka"
BOOTSTRAP="$HOST:$PORT"

# A half-copied libs directory from an interrupted fetch, removed when the script exits.
CLEANUP_DIR=""
cleanup() {
    if [[ -n "$CLEANUP_DIR" ]]; then
        rm -rf "$CLEANUP_DIR"
    fi
}
trap cleanup EXIT

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

require_java() {
    command -v java >/dev/null 2>&1 || die "java not found on PATH; Kafka $KAFKA_VERSION needs Java 17+ (apt install openjdk-17-jre-headless)"
    local major
    major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')"
    major="${major#1.}"
    if [[ -z "$major" || "$major" -lt 17 ]]; then
        die "Kafka $KAFKA_VERSION needs Java 17+, found java.specification.version=${major:-unknown}"
    fi
}

require_maven() {
    command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH; it resolves the Kafka jars from Maven Central (apt install maven)"
}

python_bin() {
    if [[ -n "${SNAPLEARN_PYTHON:-}" ]]; then
        echo "$SNAPLEARN_PYTHON"
    elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        echo "$REPO_ROOT/.venv/bin/python"
    else
        echo python3
    fi
}

# --- fetch -----------------------------------------------------------------------------------

fetch_stamp() {
    # The cache is valid for this exact pom and version; editing the pom refetches.
    { echo "$KAFKA_VERSION"; cat "$POM"; } | sha256sum | cut -d' ' -f1
}

cmd_fetch() {
    local stamp_file="$KAFKA_CACHE/.fetched" stamp
    stamp="$(fetch_stamp)"
    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" && -d "$LIBS" ]]; then
        log "Kafka $KAFKA_VERSION already fetched: $LIBS"
        return 0
    fi
    require_maven
    require_java
    mkdir -p "$KAFKA_CACHE"
    # Copy into a fresh directory and swap it in, so an interrupted fetch never leaves a
    # half-filled libs/ that a later start would run from.
    local tmp="$KAFKA_CACHE/libs.tmp.$$"
    rm -rf "$tmp"
    CLEANUP_DIR="$tmp"
    log "resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies with Maven..."
    local started=$SECONDS
    # Maven writes nothing into the repo for a pom-packaged project; target/ is pointed at the cache
    # anyway so that plugins which do write there cannot dirty the working tree.
    # Output goes to a log, shown only on failure: Maven's -q still prints colour escapes.
    local mvn_log="$KAFKA_CACHE/mvn.log"
    if ! mvn -B -q -Dstyle.color=never -f "$POM" \
        -Dkafka.version="$KAFKA_VERSION" \
        -Dproject.build.directory="$KAFKA_CACHE/mvn-target" \
        dependency:copy-dependencies \
        -DincludeScope=runtime \
        -DoutputDirectory="$tmp" >"$mvn_log" 2>&1; then
        tail -n 40 "$mvn_log" >&2
        die "Maven could not resolve Kafka $KAFKA_VERSION (is Maven Central reachable? full log: $mvn_log)"
    fi
    compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null ||
        die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp"
    rm -rf "$LIBS" "$KAFKA_CACHE/mvn-target"
    mv "$tmp" "$LIBS"
    CLEANUP_DIR=""
    echo "$stamp" >"$stamp_file"
    log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars into $LIBS in $((SECONDS - started))s"
}

# --- process helpers -------------------------------------------------------------------------

# Prints the broker's pid if the pid file names a live Kafka JVM; a stale pid file (crash, reboot,
# pid reused by another program) counts as not running.
running_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # -ww: without it ps cuts args to $COLUMNS (80 in many CI shells) before kafka.Kafka, and a
    # running broker would read as stopped.
    ps -ww -p "$pid" -o args= 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    echo "$pid"
}

port_open() {
    # bash's /dev/tcp: no dependency on nc, which minimal images lack.
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

write_configs() {
    local quorum="controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT" cluster_only=""
    if [[ -n "$VOTERS" ]]; then
        quorum="controller.quorum.voters=$VOTERS"
        # A killed node's replicas leave the ISR within this long, so acks=all writes go on
        # with the others.
        cluster_only="replica.lag.time.max.ms=10000"
    fi
    cat >"$CONFIG_FILE" <<EOF
# Generated by scripts/kafka.sh; rewritten on every start. Loopback only.
process.roles=broker,controller
node.id=$NODE_ID
$quorum
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$LOG_DIRS
num.partitions=$PARTITIONS
default.replication.factor=$REPLICATION
min.insync.replicas=$MIN_ISR
unclean.leader.election.enable=false
# Internal topics cannot have more replicas than there are brokers.
offsets.topic.replication.factor=$REPLICATION
transaction.state.log.replication.factor=$REPLICATION
transaction.state.log.min.isr=$MIN_ISR
share.coordinator.state.topic.replication.factor=$REPLICATION
share.coordinator.state.topic.min.isr=$MIN_ISR
# Fewer internal partitions than the default 50: creating them is most of a first group join
# on a 2-core machine.
offsets.topic.num.partitions=5
transaction.state.log.num.partitions=5
# Tests join groups constantly; the default 3 s delay would be added to every first join.
group.initial.rebalance.delay.ms=0
# Topics are created explicitly with their partition count (EventBus.create_topic); a typo in
# a topic name must fail instead of silently creating a topic.
auto.create.topics.enable=false
log.retention.hours=24
num.network.threads=2
num.io.threads=2
background.threads=2
$cluster_only
EOF
    cat >"$LOG4J_FILE" <<'EOF'
# Generated by scripts/kafka.sh: everything to stdout, which start redirects into kafka.log.
status = warn
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
# The full config dumps (thousands of lines per start) bury the lines that matter.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
EOF
}

format_storage() {
    local cluster_id
    # A Kafka cluster id is 16 random bytes, base64url without padding (what StorageTool
    # random-uuid prints); made here to save a JVM start. Like Kafka's Uuid.randomUuid(), draw
    # again while it starts with '-' (1 in 64): StorageTool would read it as an option.
    cluster_id="-"
    while [[ $cluster_id == -* ]]; do
        cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    done
    [[ ${#cluster_id} -eq 22 ]] || die "could not generate a cluster id"
    log "formatting $LOG_DIRS (cluster id $cluster_id)"
    # --standalone: this node is the whole controller quorum (dynamic quorum, KIP-853); a
    # static quorum (SNAPLEARN_KAFKA_VOTERS) is named in the config instead.
    local standalone="--standalone"
    [[ -z "$VOTERS" ]] || standalone=""
    # shellcheck disable=SC2086  # JVM_OPTS is a list of flags; standalone is one flag or none
    java $JVM_OPTS -Dlog4j2.configurationFile="$LOG4J_FILE" -cp "$LIBS/*" \
        kafka.tools.StorageTool format $standalone -t "$cluster_id" -c "$CONFIG_FILE" \
        >>"$LOG_FILE" 2>&1 || {
        tail -n 30 "$LOG_FILE" >&2
        die "formatting the storage directory failed (log: $LOG_FILE)"
    }
    echo "$PORT $CONTROLLER_PORT" >"$PORTS_FILE"
}

fail_start() {
    local pid="$1" reason="$2"
    log "error: $reason"
    log "last lines of $LOG_FILE:"
    tail -n 40 "$LOG_FILE" >&2 || true
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    exit 1
}

# Ready means the broker answers a Metadata request and lists itself, which it only does once it
# has registered with the controller and been unfenced (so create_topic will work right away).
wait_ready() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
    while ! port_open "$PORT"; do
        kill -0 "$pid" 2>/dev/null || fail_start "$pid" "the broker exited during startup"
        ((SECONDS < deadline)) || fail_start "$pid" "port $PORT not open after ${START_TIMEOUT}s"
        sleep 0.2
    done
    local py
    py="$(python_bin)"
    if "$py" -c 'import kafka' 2>/dev/null; then
        "$py" - "$BOOTSTRAP" "$pid" "$((deadline - SECONDS))" <<'EOF' || fail_start "$pid" "the broker did not serve metadata within ${START_TIMEOUT}s"
import logging, os, sys, time
from kafka import KafkaAdminClient

bootstrap, pid, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
logging.disable(logging.CRITICAL)  # connection refusals while starting are expected noise
deadline = time.monotonic() + max(budget, 1.0)
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            if admin.describe_cluster().get("brokers"):
                sys.exit(0)
        finally:
            admin.close()
    except Exception:
        pass
    time.sleep(0.3)
sys.exit(1)
EOF
    else
        # No kafka-python here: fall back to the broker's own "started" log line.
        log "kafka-python not importable by $py; waiting for the broker's startup log line instead"
        until grep -q 'Kafka Server started' "$LOG_FILE"; do
            kill -0 "$pid" 2>/dev/null || fail_start "$pid" "the broker exited during startup"
            ((SECONDS < deadline)) || fail_start "$pid" "the broker did not start within ${START_TIMEOUT}s"
            sleep 0.3
        done
    fi
}

# --- commands --------------------------------------------------------------------------------

cmd_start() {
    local pid
    if pid="$(running_pid)"; then
        log "already running (pid $pid)"
        echo "$BOOTSTRAP"
        return 0
    fi
    require_java
    cmd_fetch
    if port_open "$PORT" || port_open "$CONTROLLER_PORT"; then
        die "port $PORT or $CONTROLLER_PORT on $HOST is already in use; set SNAPLEARN_KAFKA_PORT / SNAPLEARN_KAFKA_CONTROLLER_PORT"
    fi
    mkdir -p "$DATA_DIR" "$LOG_DIRS"
    touch "$OWNER_MARK"
    # The controller's address is stored in the formatted metadata log, so a formatted directory
    # only works with the ports it was formatted for.
    if [[ -f "$LOG_DIRS/meta.properties" && -f "$PORTS_FILE" && "$(cat "$PORTS_FILE")" != "$PORT $CONTROLLER_PORT" ]]; then
        die "$DATA_DIR was formatted for ports $(cat "$PORTS_FILE"); use those ports or run 'scripts/kafka.sh wipe'"
    fi
    [[ -f "$LOG_FILE" ]] && mv -f "$LOG_FILE" "$LOG_FILE.1"
    write_configs
    local started=$SECONDS
    [[ -f "$LOG_DIRS/meta.properties" ]] || format_storage
    log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (data: $DATA_DIR, log: $LOG_FILE)"
    # setsid + nohup: the broker outlives this script and the shell or test process that ran it,
    # and a Ctrl-C in that terminal does not reach it; `stop` is the way to end it.
    # shellcheck disable=SC2086  # JVM_OPTS is a list of flags
    nohup setsid java $JVM_OPTS -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$LOG4J_FILE" \
        -cp "$LIBS/*" kafka.Kafka "$CONFIG_FILE" >>"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
    wait_ready "$pid"
    log "ready in $((SECONDS - started))s (pid $pid)"
    echo "$BOOTSTRAP"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        log "not running"
        return 0
    fi
    log "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still running after ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_wipe() {
    cmd_stop
    [[ -e "$DATA_DIR" ]] || return 0
    local resolved
    resolved="$(cd "$DATA_DIR" && pwd -P)"
    if [[ "$resolved" == "/" || "$resolved" == "$(cd "$HOME" && pwd -P)" || "$resolved" == "$REPO_ROOT" ]]; then
        die "refusing to delete $resolved"
    fi
    # Only a directory this script made (or an empty one) is deleted.
    if [[ ! -f "$OWNER_MARK" && -n "$(ls -A "$DATA_DIR")" ]]; then
        die "$DATA_DIR was not created by scripts/kafka.sh (no $(basename "$OWNER_MARK")); not deleting it"
    fi
    rm -rf "$DATA_DIR"
    log "deleted $DATA_DIR"
}

cmd_status() {
    local pid
    if pid="$(running_pid)"; then
        echo "running pid=$pid bootstrap=$BOOTSTRAP version=$KAFKA_VERSION dir=$DATA_DIR"
        return 0
    fi
    echo "stopped dir=$DATA_DIR"
    return 3 # LSB "not running"
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
    fetch) cmd_fetch ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    wipe) cmd_wipe ;;
    status) cmd_status ;;
    config)
        mkdir -p "$DATA_DIR"
        write_configs
        ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
