#!/usr/bin/env bash
# Local development services for DigiVault Conversations: a PostgreSQL, a
# RabbitMQ and a Redis (the shared rate-limit budgets) private to this checkout
# (own ports, own data in .dev/, loopback only), from Debian's packages, without
# containers.
#
# Usage: deploy/dev/services.sh up|down|env|status
#   up      start all three; harmless when they already run; installs missing packages
#   down    stop what `up` started (the data stays)
#   env     print `export DATABASE_URL=...`, `export AMQP_URL=...` and
#           `export RATE_LIMIT_REDIS_URL=...` lines for eval
#   status  say what runs (exit 0 when all run, 3 otherwise)
#
# Settings, from the environment:
#   DEV_PG_PORT (15432), DEV_AMQP_PORT (16572), DEV_EPMD_PORT (14369),
#   DEV_RABBIT_DIST_PORT (26729; rabbitmqctl uses the 10 ports above it),
#   DEV_REDIS_PORT (16379),
#   DEV_SERVICES_TIMEOUT (seconds to wait for a start or a stop, 60).
# When DATABASE_URL and AMQP_URL are both set, `up` starts nothing and `env`
# prints them: the same commands then work against services run elsewhere.
# RATE_LIMIT_REDIS_URL is then printed only if it is set too: Redis is
# optional, and without it each process keeps its own budgets.
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)
SCRIPT_DIR=$REPO_ROOT/deploy/dev
STATE_DIR=$REPO_ROOT/.dev

PG_PORT=${DEV_PG_PORT:-15432}
AMQP_PORT=${DEV_AMQP_PORT:-16572}
EPMD_PORT=${DEV_EPMD_PORT:-14369}
# Erlang's distribution ports sit below Linux's ephemeral range (32768-60999),
# where no client connection can be holding them (see port_wait_free): RabbitMQ
# refuses to start when its distribution port is busy.
DIST_PORT=${DEV_RABBIT_DIST_PORT:-26729}
REDIS_PORT=${DEV_REDIS_PORT:-16379}
TIMEOUT=${DEV_SERVICES_TIMEOUT:-60}

# One dev account for both services, as the app's configuration expects.
APP_USER=conversations
APP_PASSWORD=conversations
DB_NAME=conversations
DEV_DATABASE_URL=postgresql://$APP_USER:$APP_PASSWORD@127.0.0.1:$PG_PORT/$DB_NAME
DEV_AMQP_URL=amqp://$APP_USER:$APP_PASSWORD@127.0.0.1:$AMQP_PORT/
DEV_REDIS_URL=redis://:$APP_PASSWORD@127.0.0.1:$REDIS_PORT/0

# PostgreSQL's own directory: data/, postgres.log and the Unix socket. It may be
# a symlink into /var/tmp (see pg_prepare_dir).
PG_DIR=$STATE_DIR/pg
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log

RABBIT_DIR=$STATE_DIR/rabbitmq
RABBIT_LOG=$RABBIT_DIR/rabbitmq.log
RABBIT_PID_FILE=$RABBIT_DIR/server.pid
RABBIT_NODE=conversations-dev@localhost
# Debian's unwrapped scripts: the /usr/sbin wrappers switch to the rabbitmq user
# and the system's directories.
RABBIT_BIN=/usr/lib/rabbitmq/bin

REDIS_DIR=$STATE_DIR/redis
REDIS_LOG=$REDIS_DIR/redis.log
REDIS_PID_FILE=$REDIS_DIR/redis.pid

# Messages go to stderr: stdout is kept for `env`, which callers eval.
log() { printf 'services: %s\n' "$*" >&2; }

die() {
    log "error: $*"
    exit 1
}

# Fails showing the end of a server's log, where the reason usually is.
die_with_log() {
    local logfile=$1
    shift
    log "error: $*"
    if [[ -r $logfile ]]; then
        log "last lines of $logfile:"
        tail -n 30 -- "$logfile" >&2
    fi
    exit 1
}

external_services() { [[ -n ${DATABASE_URL:-} && -n ${AMQP_URL:-} ]]; }

# True while the process runs. A zombie counts as gone: a detached server's
# launcher may be left unreaped by an init that does not reap.
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]
}

# Polls CMD... until it succeeds. Fails early, with the log's tail, when the
# server's process PID has exited; and after TIMEOUT seconds.
wait_ready() {
    local name=$1 pid=$2 logfile=$3 deadline=$((SECONDS + TIMEOUT))
    shift 3
    until "$@" >/dev/null 2>&1; do
        alive "$pid" || die_with_log "$logfile" "$name exited while starting"
        ((SECONDS < deadline)) || die_with_log "$logfile" "$name not ready after ${TIMEOUT}s"
        sleep 0.5
    done
}

# Prints free, listening (a server is there) or busy (held by something else).
# The bind uses SO_REUSEADDR, as the servers do, so only what would stop them counts.
port_probe() {
    python3 - "$1" <<'EOF'
import socket
import sys

port = int(sys.argv[1])
with socket.socket() as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
        print("free")
    except OSError:
        with socket.socket() as client:
            print("listening" if client.connect_ex(("127.0.0.1", port)) == 0 else "busy")
EOF
}

# Called before a server binds PORT. The default ports lie in Linux's ephemeral
# range, so a client connection (the test suite makes many) may have been given
# one by chance, and keeps it up to 60 s in TIME-WAIT after it closes: the
# server's bind would fail. Waits for such a holder to go; fails at once when a
# server listens there, unless ALLOW_LISTENER (an epmd that ours can share).
port_wait_free() {
    local port=$1 setting=$2 allow_listener=${3:-} deadline=$((SECONDS + 75)) said=
    # Without python3 there is no probe: the server's own error tells.
    command -v python3 >/dev/null || return 0
    while true; do
        case $(port_probe "$port") in
        free) return ;;
        listening)
            [[ -n $allow_listener ]] && return
            die "port $port is taken by another server: stop it, or set $setting to another port"
            ;;
        esac
        ((SECONDS < deadline)) || die "port $port stayed busy for 75s: set $setting to another port"
        [[ -n $said ]] || log "port $port is held by a closing client connection: waiting for it"
        said=1
        sleep 1
    done
}

# --- PostgreSQL ----------------------------------------------------------------

# Prints the bin directory of the newest installed server. pg_config alone is
# not proof: libpq-dev ships it without any server.
pg_find_bindir() {
    local dir
    if command -v pg_config >/dev/null && dir=$(pg_config --bindir) && [[ -x $dir/postgres ]]; then
        echo "$dir"
        return
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -r -V); do
        if [[ -x $dir/postgres ]]; then
            echo "$dir"
            return
        fi
    done
    return 1
}

pg_bindir_or_install() {
    pg_find_bindir && return
    "$SCRIPT_DIR/install-packages.sh" postgresql
    pg_find_bindir || die "no PostgreSQL server binaries found after installing postgresql"
}

# Prints the OS user that runs PostgreSQL, which refuses to run as root.
pg_os_user() {
    if ((EUID != 0)); then
        id -un
    elif [[ -e $PG_DIR ]]; then
        # An existing cluster keeps its owner.
        stat -L -c %U -- "$PG_DIR"
    elif id -u postgres >/dev/null 2>&1; then
        echo postgres
    else
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin conversations-dev >&2
        echo conversations-dev
    fi
}

# Runs a command as PG_USER. From /, because that user may not be allowed into
# the checkout (e.g. one under /root).
as_pg() {
    if ((EUID == 0)); then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        "$@"
    fi
}

make_pg_owned_dir() {
    mkdir -p -- "$1"
    chmod 700 -- "$1"
    if ((EUID == 0)); then chown -- "$PG_USER:" "$1"; fi
}

# Makes PG_DIR usable by PG_USER, on the first run: in the checkout when that
# user can write there and the socket's path fits (Unix socket paths are limited
# to 107 bytes); otherwise in a per-checkout directory under /var/tmp, linked
# from PG_DIR so that every later command finds it the same way.
pg_prepare_dir() {
    local fallback socket=$PG_DIR/.s.PGSQL.$PG_PORT
    fallback=/var/tmp/conversations-dev-pg-$(printf '%s' "$REPO_ROOT" | sha256sum | cut -c1-12)
    if [[ -L $PG_DIR ]]; then
        # The system may have cleaned /var/tmp since: recreate the target (initdb follows).
        make_pg_owned_dir "$(readlink -- "$PG_DIR")"
        return
    fi
    [[ -d $PG_DIR ]] && return
    mkdir -p -- "$STATE_DIR"
    make_pg_owned_dir "$PG_DIR"
    if ! as_pg test -w "$PG_DIR" || ((${#socket} > 107)); then
        rmdir -- "$PG_DIR"
        make_pg_owned_dir "$fallback"
        ln -s -- "$fallback" "$PG_DIR"
        log "PostgreSQL files in $fallback ($PG_USER cannot use $PG_DIR)"
    fi
}

# From here on the resolved path: PG_USER may be unable to follow the link
# through the checkout's directories.
pg_use_real_dir() {
    PG_DIR=$(realpath -- "$PG_DIR")
    PG_DATA=$PG_DIR/data
    PG_LOG=$PG_DIR/postgres.log
}

# First run: a cluster whose superuser is the app's user; passwords (SCRAM) over
# TCP, trust on the Unix socket, which only PG_USER (and root) can reach.
pg_init() {
    [[ -f $PG_DATA/PG_VERSION ]] && return
    local staging=$PG_DIR/data.initdb pwfile=$PG_DIR/initdb.pw
    log "initialising PostgreSQL in $PG_DATA"
    rm -rf -- "$staging"
    # Written as PG_USER, inside PG_DIR (mode 700), so only that user reads it.
    printf '%s\n' "$APP_PASSWORD" | as_pg tee -- "$pwfile" >/dev/null
    if ! as_pg "$PG_BIN/initdb" -D "$staging" -U "$APP_USER" --pwfile="$pwfile" \
        --encoding=UTF8 --no-locale --auth-local=trust --auth-host=scram-sha-256 \
        --no-sync >"$PG_DIR/initdb.log" 2>&1; then
        rm -f -- "$pwfile"
        die_with_log "$PG_DIR/initdb.log" "initdb failed"
    fi
    rm -f -- "$pwfile"
    echo "include = 'conversations-dev.conf'" | as_pg tee -a -- "$staging/postgresql.conf" >/dev/null
    # Staged, then moved: an interrupted initdb leaves no half-made cluster behind.
    mv -- "$staging" "$PG_DATA"
}

# Rewritten at every start, so that a changed DEV_PG_PORT or a moved checkout
# takes effect.
pg_write_settings() {
    as_pg tee -- "$PG_DATA/conversations-dev.conf" >/dev/null <<EOF
# Written by deploy/dev/services.sh at each start: edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
# Room for a benchmark account of a million conversations and its indexes (about 600 MB), as
# a production server would have: a deep page then reads cached pages, not the OS's. Allocated
# only as it is used.
shared_buffers = 1GB
# Throwaway local data: speed over crash safety.
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

# Sets PG_BIN and PG_USER for an existing cluster, installing nothing; fails
# when there is no cluster.
pg_locate() {
    [[ -f $PG_DATA/PG_VERSION ]] && PG_BIN=$(pg_find_bindir) && PG_USER=$(pg_os_user) &&
        pg_use_real_dir
}

pg_running() {
    [[ -f $PG_DATA/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

# postmaster.pid: line 1 is the pid, line 4 the port the server listens on.
pg_pid() { sed -n 1p -- "$PG_DATA/postmaster.pid"; }
pg_port() { sed -n 4p -- "$PG_DATA/postmaster.pid"; }

# Connects the way the app does (TCP and password), which also checks the login.
pg_ensure_database() {
    local found
    found=$(PGPASSWORD=$APP_PASSWORD "$PG_BIN/psql" -X -q -t -A -h 127.0.0.1 -p "$PG_PORT" \
        -U "$APP_USER" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ||
        die_with_log "$PG_LOG" "cannot log in to PostgreSQL as $APP_USER on 127.0.0.1:$PG_PORT"
    [[ $found == 1 ]] && return
    log "creating database $DB_NAME"
    PGPASSWORD=$APP_PASSWORD "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$APP_USER" "$DB_NAME"
}

pg_up() {
    PG_BIN=$(pg_bindir_or_install)
    PG_USER=$(pg_os_user)
    pg_prepare_dir
    pg_use_real_dir
    pg_init
    if pg_running; then
        log "PostgreSQL already running (pid $(pg_pid))"
    else
        pg_write_settings
        port_wait_free "$PG_PORT" DEV_PG_PORT
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
        # -w: pg_ctl waits for readiness and notices an early exit. pg_ctl also
        # gives the server its own session, so a Ctrl-C in the terminal that
        # started it (e.g. `make run`) does not reach it.
        as_pg "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" >/dev/null ||
            die_with_log "$PG_LOG" "PostgreSQL did not start"
    fi
    wait_ready PostgreSQL "$(pg_pid)" "$PG_LOG" "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
    pg_ensure_database
}

pg_down() {
    if ! pg_locate || ! pg_running; then
        log "PostgreSQL not running"
        return
    fi
    log "stopping PostgreSQL (pid $(pg_pid))"
    as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t "$TIMEOUT" >/dev/null ||
        die_with_log "$PG_LOG" "PostgreSQL did not stop"
}

pg_status() {
    if pg_locate && pg_running; then
        echo "PostgreSQL: running, pid $(pg_pid), 127.0.0.1:$(pg_port), data in $PG_DATA"
    else
        echo "PostgreSQL: not running"
        return 1
    fi
}

# --- RabbitMQ ------------------------------------------------------------------

# The environment shared by the server and rabbitmqctl: they find each other
# through our epmd port, our node name and the same cookie. Meant for subshells.
rabbit_env() {
    # Erlang keeps its cookie in $HOME: a private one in the state directory.
    export HOME=$RABBIT_DIR
    # Nothing from the system's /etc/rabbitmq: no rabbitmq-env.conf, an empty
    # conf.d of our own, no advanced.config.
    export RABBITMQ_CONF_ENV_FILE=/dev/null
    export RABBITMQ_CONFIG_FILE=$RABBIT_DIR/rabbitmq.conf
    export RABBITMQ_CONFIG_FILES=$RABBIT_DIR/conf.d
    export RABBITMQ_ADVANCED_CONFIG_FILE=$RABBIT_DIR/advanced.config
    export RABBITMQ_ENABLED_PLUGINS_FILE=$RABBIT_DIR/enabled_plugins
    export RABBITMQ_MNESIA_BASE=$RABBIT_DIR/mnesia
    export RABBITMQ_LOG_BASE=$RABBIT_DIR/log
    # "-" logs to stdout, which rabbit_start sends to one file together with
    # any error from before the logger starts.
    export RABBITMQ_LOGS=-
    export RABBITMQ_NODENAME=$RABBIT_NODE
    # Erlang distribution, the server's and the CLI's, on loopback and our ports.
    export RABBITMQ_DIST_PORT=$DIST_PORT
    export RABBITMQ_CTL_DIST_PORT_MIN=$((DIST_PORT + 1))
    export RABBITMQ_CTL_DIST_PORT_MAX=$((DIST_PORT + 10))
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
    export RABBITMQ_CTL_ERL_ARGS=$RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS
    export ERL_EPMD_PORT=$EPMD_PORT
    export ERL_EPMD_ADDRESS=127.0.0.1
}

rabbit_ctl() { (rabbit_env && "$RABBIT_BIN/rabbitmqctl" "$@"); }

rabbit_install_if_missing() {
    [[ -x $RABBIT_BIN/rabbitmq-server ]] && return
    "$SCRIPT_DIR/install-packages.sh" rabbitmq-server
    [[ -x $RABBIT_BIN/rabbitmq-server ]] || die "no $RABBIT_BIN/rabbitmq-server after installing rabbitmq-server"
}

# Prints the recorded pid if that process is alive and still ours (pids get reused).
rabbit_pid() {
    local pid
    pid=$(cat -- "$RABBIT_PID_FILE" 2>/dev/null) || return 1
    alive "$pid" && [[ $(ps -o args= -p "$pid") == *rabbitmq-server* ]] && echo "$pid"
}

rabbit_write_config() {
    mkdir -p -- "$RABBIT_DIR/conf.d" "$RABBIT_DIR/mnesia"
    cat >"$RABBIT_DIR/rabbitmq.conf" <<EOF
# Written by deploy/dev/services.sh at each start: edit the script, not this file.
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
# Made by the node when it first boots, instead of guest: administrator with
# full permissions on vhost /.
default_user = $APP_USER
default_pass = $APP_PASSWORD
EOF
    # One plugin (no management UI, for the fastest start): the consistent-hash
    # exchange that docs/events.md's ordered scale-out subscriber binds to ours.
    echo '[rabbitmq_consistent_hash_exchange].' >"$RABBIT_DIR/enabled_plugins"
    # Our cookie exists before the first start, so that the server and a
    # rabbitmqctl racing it cannot each create a different one.
    if [[ ! -f $RABBIT_DIR/.erlang.cookie ]]; then
        (umask 077 && od -A n -N 16 -t x1 /dev/urandom | tr -d ' \n' >"$RABBIT_DIR/.erlang.cookie")
    fi
}

rabbit_start() {
    rabbit_write_config
    port_wait_free "$AMQP_PORT" DEV_AMQP_PORT
    port_wait_free "$EPMD_PORT" DEV_EPMD_PORT allow-listener
    log "starting RabbitMQ on 127.0.0.1:$AMQP_PORT (node $RABBIT_NODE)"
    # Detached in its own session (setsid), so a Ctrl-C in the terminal that
    # started it (e.g. `make run`) does not reach it. exec keeps $! the pid of
    # the launcher, which turns a TERM into a clean broker shutdown.
    (rabbit_env && cd -- "$RABBIT_DIR" && exec setsid "$RABBIT_BIN/rabbitmq-server") \
        >"$RABBIT_LOG" 2>&1 </dev/null &
    echo "$!" >"$RABBIT_PID_FILE"
}

# Starts the node unless it runs, without waiting for it (see rabbit_wait).
rabbit_launch() {
    local pid
    rabbit_install_if_missing
    if pid=$(rabbit_pid); then
        log "RabbitMQ already running (pid $pid)"
    else
        rabbit_start
    fi
}

rabbit_wait() {
    # await_startup fails at once while the node is not registered yet; then it
    # waits for the broker to finish booting.
    wait_ready RabbitMQ "$(<"$RABBIT_PID_FILE")" "$RABBIT_LOG" rabbit_ctl -q await_startup --timeout 10
}

# TERMs the launcher, which stops the broker cleanly and then exits. A TERM
# that reaches the node very early in its boot is lost, so it is repeated
# every 2 seconds; fails after TIMEOUT seconds.
rabbit_stop() {
    local pid=$1 deadline=$((SECONDS + TIMEOUT)) next_term=$SECONDS
    while alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        if ((SECONDS >= next_term)); then
            kill -TERM "$pid" 2>/dev/null || true
            next_term=$((SECONDS + 2))
        fi
        sleep 0.2
    done
}

# Last resort: the launcher and the Erlang VM it waits for.
rabbit_kill() {
    local pid=$1 vm
    vm=$(ps -o pid= --ppid "$pid" | tr -d ' ') || true
    log "RabbitMQ did not stop within ${TIMEOUT}s: killing it"
    kill -KILL "$pid" ${vm:+"$vm"} 2>/dev/null || true
    # Until the VM is gone, epmd keeps it registered and refuses to quit.
    while [[ -n $vm ]] && alive "$vm"; do sleep 0.2; done
}

rabbit_down() {
    local pid
    if pid=$(rabbit_pid); then
        log "stopping RabbitMQ (pid $pid)"
        rabbit_stop "$pid" || rabbit_kill "$pid"
    else
        log "RabbitMQ not running"
    fi
    rm -f -- "$RABBIT_PID_FILE"
    # The node's VM started an epmd on our port, which outlives the node. Only
    # ours listens on that port; it also catches one left by a rabbitmqctl.
    if command -v epmd >/dev/null; then
        ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true
    fi
}

rabbit_status() {
    local pid
    if pid=$(rabbit_pid); then
        echo "RabbitMQ: running, pid $pid, AMQP on 127.0.0.1:$AMQP_PORT, node $RABBIT_NODE"
    else
        echo "RabbitMQ: not running"
        return 1
    fi
}

# --- Redis ---------------------------------------------------------------------

redis_install_if_missing() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return
    "$SCRIPT_DIR/install-packages.sh" redis-server
    command -v redis-server >/dev/null || die "no redis-server after installing redis-server"
}

# Prints the recorded pid if that process is alive and still ours (pids get reused).
redis_pid() {
    local pid
    pid=$(cat -- "$REDIS_PID_FILE" 2>/dev/null) || return 1
    alive "$pid" && [[ $(ps -o args= -p "$pid") == *redis-server* ]] && echo "$pid"
}

# The password goes through the environment, never on a command line that ps shows.
redis_ping() {
    [[ $(REDISCLI_AUTH=$APP_PASSWORD redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# Rewritten at every start, so that a changed DEV_REDIS_PORT or a moved checkout
# takes effect. It holds the password: readable by its owner only.
redis_write_config() {
    mkdir -p -- "$REDIS_DIR"
    (umask 077 && cat >"$REDIS_DIR/redis.conf") <<EOF
# Written by deploy/dev/services.sh at each start: edit the script, not this file.
bind 127.0.0.1
port $REDIS_PORT
requirepass $APP_PASSWORD
daemonize yes
pidfile "$REDIS_PID_FILE"
logfile "$REDIS_LOG"
dir "$REDIS_DIR"
# Rate-limit counters live for a window (a minute): nothing worth writing to disk.
save ""
appendonly no
EOF
}

redis_up() {
    local pid deadline
    redis_install_if_missing
    if pid=$(redis_pid); then
        log "Redis already running (pid $pid)"
    else
        redis_write_config
        port_wait_free "$REDIS_PORT" DEV_REDIS_PORT
        log "starting Redis on 127.0.0.1:$REDIS_PORT"
        rm -f -- "$REDIS_PID_FILE"
        # daemonize: the server forks into a session of its own (a Ctrl-C in the
        # terminal that started it, e.g. `make run`, does not reach it) and
        # writes its pid file once it runs.
        redis-server "$REDIS_DIR/redis.conf" >>"$REDIS_LOG" 2>&1 </dev/null ||
            die_with_log "$REDIS_LOG" "Redis did not start"
        deadline=$((SECONDS + TIMEOUT))
        until pid=$(redis_pid); do
            ((SECONDS < deadline)) || die_with_log "$REDIS_LOG" "Redis wrote no pid file in ${TIMEOUT}s"
            sleep 0.1
        done
    fi
    wait_ready Redis "$pid" "$REDIS_LOG" redis_ping
}

# TERM: Redis shuts down cleanly (nothing to save, see `save ""`).
redis_down() {
    local pid deadline=$((SECONDS + TIMEOUT))
    if ! pid=$(redis_pid); then
        log "Redis not running"
        rm -f -- "$REDIS_PID_FILE"
        return
    fi
    log "stopping Redis (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "Redis did not stop within ${TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f -- "$REDIS_PID_FILE"
}

redis_status() {
    local pid
    if pid=$(redis_pid); then
        echo "Redis: running, pid $pid, 127.0.0.1:$REDIS_PORT, data in $REDIS_DIR"
    else
        echo "Redis: not running"
        return 1
    fi
}

# --- Commands ------------------------------------------------------------------

cmd_up() {
    if external_services; then
        log "DATABASE_URL and AMQP_URL are set: using them, starting nothing"
        return
    fi
    # The broker boots in the background while PostgreSQL starts: its boot is
    # the longest part of a start.
    rabbit_launch
    pg_up
    redis_up
    rabbit_wait
    log "ready: PostgreSQL on 127.0.0.1:$PG_PORT, RabbitMQ on 127.0.0.1:$AMQP_PORT," \
        "Redis on 127.0.0.1:$REDIS_PORT"
}

cmd_down() {
    rabbit_down
    redis_down
    pg_down
}

cmd_env() {
    if external_services; then
        # %q: quoted for eval, whatever the URLs contain.
        printf 'export DATABASE_URL=%q\nexport AMQP_URL=%q\n' "$DATABASE_URL" "$AMQP_URL"
        if [[ -n ${RATE_LIMIT_REDIS_URL:-} ]]; then
            printf 'export RATE_LIMIT_REDIS_URL=%q\n' "$RATE_LIMIT_REDIS_URL"
        fi
    else
        printf 'export DATABASE_URL=%s\nexport AMQP_URL=%s\nexport RATE_LIMIT_REDIS_URL=%s\n' \
            "$DEV_DATABASE_URL" "$DEV_AMQP_URL" "$DEV_REDIS_URL"
    fi
}

cmd_status() {
    local rc=0
    if external_services; then
        echo "DATABASE_URL and AMQP_URL are set: the app uses those"
    fi
    pg_status || rc=3
    rabbit_status || rc=3
    redis_status || rc=3
    return "$rc"
}

usage() {
    echo "usage: $0 up|down|env|status" >&2
    exit 2
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
env) cmd_env ;;
status) cmd_status ;;
*) usage ;;
esac
