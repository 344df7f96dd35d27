#!/usr/bin/env python3
"""Local development services for DigiVault Conversations: a PostgreSQL, a RabbitMQ and a Redis
(the shared rate-limit budgets) private to this checkout (own ports, own data in .dev/, loopback
only), from Debian's packages, without containers.

Usage: deploy/dev/services.py up|down|env|status
  up      start all three; harmless when they already run; installs missing packages
  down    stop what `up` started (the data stays)
  env     print `export DATABASE_URL=...`, `export AMQP_URL=...` and
          `export RATE_LIMIT_REDIS_URL=...` lines for eval
  status  say what runs (exit 0 when all run, 3 otherwise)

Settings, from the environment:
  DEV_PG_PORT (15432), DEV_AMQP_PORT (16572), DEV_EPMD_PORT (14369),
  DEV_RABBIT_DIST_PORT (26729; rabbitmqctl uses the 10 ports above it),
  DEV_REDIS_PORT (16379),
  DEV_SERVICES_TIMEOUT (seconds to wait for a start or a stop, 60).
When DATABASE_URL and AMQP_URL are both set, `up` starts nothing and `env` prints them: the same
commands then work against services run elsewhere. RATE_LIMIT_REDIS_URL is then printed only if
it is set too: Redis is optional, and without it each process keeps its own budgets.

Standard library only: it runs before the project's virtualenv exists, with the system's python3.
"""

import contextlib
import dataclasses
import functools
import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import install_packages

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
LOOPBACK = "127.0.0.1"
# One dev account for every service, as the app's configuration expects.
APP_USER = APP_PASSWORD = DB_NAME = "conversations"
HEADER = "# Written by deploy/dev/services.py at each start: edit the script, not this file.\n"


class Failure(Exception):
    """A command that cannot go on; `log` is the server log whose end usually says why."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


def _setting(variable: str, default: int) -> Any:
    return dataclasses.field(default=default, metadata={"variable": variable})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the services keep their files, their ports, and how long to wait for them."""

    state_dir: Path
    pg_port: int = _setting("DEV_PG_PORT", 15432)
    amqp_port: int = _setting("DEV_AMQP_PORT", 16572)
    epmd_port: int = _setting("DEV_EPMD_PORT", 14369)
    # Erlang's distribution ports sit below Linux's ephemeral range (32768-60999), where no
    # client connection can be holding them (see wait_port_free): RabbitMQ refuses to start
    # when its distribution port is busy.
    dist_port: int = _setting("DEV_RABBIT_DIST_PORT", 26729)
    redis_port: int = _setting("DEV_REDIS_PORT", 16379)
    timeout: int = _setting("DEV_SERVICES_TIMEOUT", 60)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], state_dir: Path) -> "Settings":
        """The defaults, overridden by the DEV_* variables that are set and not empty."""
        values = {}
        for field in dataclasses.fields(cls):
            value = environ.get(field.metadata.get("variable", ""))
            if value and not value.isdigit():
                raise Failure(f"{field.metadata['variable']} must be a number, not {value!r}")
            if value:
                values[field.name] = int(value)
        return cls(state_dir, **values)


def log(message: str) -> None:
    """Messages go to stderr: stdout is kept for `env`, which callers eval."""
    print(f"services: {message}", file=sys.stderr, flush=True)


# --- Processes, ports, files ---------------------------------------------------------------


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command (which may hold spaces), or []."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True while the process runs. A zombie counts as gone: a detached server's launcher may
    be left unreaped by an init that does not reap."""
    state = _proc_stat(pid)[:1]
    return bool(state) and state[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    numbers = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [child for child in numbers if _proc_stat(child)[1:2] == [str(pid)]]


def read_pid(pid_file: Path, program: str) -> int | None:
    """The pid on the first line of `pid_file` if that process is alive and still runs
    `program` (pids get reused), else None."""
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and program.encode() in command else None


def send(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signum)


def terminate(pid: int, timeout: float) -> bool:
    """TERMs `pid` until it is gone; False when it still runs after `timeout` seconds. The TERM
    is repeated every 2 seconds: one that reaches RabbitMQ very early in its boot is lost."""
    deadline, next_term = time.monotonic() + timeout, time.monotonic()
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        if time.monotonic() >= next_term:
            send(pid, signal.SIGTERM)
            next_term = time.monotonic() + 2
        time.sleep(0.1)
    return True


def port_state(port: int) -> str:
    """`free`, `listening` (a server is there) or `busy` (held by something else). The bind
    uses SO_REUSEADDR, as the servers do, so only what would stop them counts."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            probe.bind((LOOPBACK, port))
            return "free"
    with socket.socket() as client:
        return "listening" if client.connect_ex((LOOPBACK, port)) == 0 else "busy"


def wait_port_free(
    port: int,
    variable: str,
    *,
    allow_listener: bool = False,
    probe: Callable[[int], str] = port_state,
    patience: float = 75,
    pause: float = 1,
) -> None:
    """Called before a server binds `port`. A port in Linux's ephemeral range (the defaults lie
    below it) may have been given to a client connection (the test suite makes many), which
    holds it up to 60 s in TIME-WAIT after it closes: the server's bind would fail. Waits for
    such a holder to go; fails at once when a server listens there, unless `allow_listener`
    (an epmd that ours can share)."""
    deadline = time.monotonic() + patience
    said = False
    while (state := probe(port)) != "free":
        if state == "listening" and allow_listener:
            return
        if state == "listening":
            raise Failure(
                f"port {port} is taken by another server: stop it, or set {variable} to another port"
            )
        if time.monotonic() >= deadline:
            raise Failure(
                f"port {port} stayed busy for {patience:g}s: set {variable} to another port"
            )
        if not said:
            log(f"port {port} is held by a closing client connection: waiting for it")
            said = True
        time.sleep(pause)


def run(command: Sequence[str | Path | int], **options: Any) -> subprocess.CompletedProcess[str]:
    """Runs `command` to its end, never raising on failure; its output is kept unless
    redirected."""
    options.setdefault("capture_output", "stdout" not in options)
    return subprocess.run([str(part) for part in command], text=True, check=False, **options)


def write_private(path: Path, text: str) -> None:
    """(Re)writes a file that only its owner can read: it may hold a password."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)


# --- Services ------------------------------------------------------------------------------


class Service(ABC):
    """One server of this checkout: how to start it, know it is ready, find it running and stop
    it, and the variable (`env`) that tells the app where it is."""

    name: ClassVar[str]
    variable: ClassVar[str]  # exported by `env`, with url() as its value
    packages: ClassVar[tuple[str, ...]]  # Debian's, installed when installed() is false
    program: ClassVar[str]  # in the command line of the process named by the pid file
    boots_slowly: ClassVar[bool] = False  # started first, so the others start while it boots

    def __init__(self, settings: Settings, directory: Path, port: int, log_name: str) -> None:
        self.settings = settings
        self.directory = directory
        self.port = port
        self.log = directory / log_name  # its tail is shown when the server fails
        self.pid_file = directory / "server.pid"

    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def installed(self) -> bool: ...

    @abstractmethod
    def start(self) -> int:
        """Starts the server, not running yet; returns its pid, maybe before it is ready."""

    @abstractmethod
    def ready(self) -> bool: ...

    def pid(self) -> int | None:
        """The running server's pid, or None."""
        return read_pid(self.pid_file, self.program)

    def prepare(self) -> None:  # noqa: B027  # a hook: only PostgreSQL has something to do
        """Runs at each `up` once the server is ready."""

    def stop(self, pid: int) -> None:
        """TERM, and after the timeout KILL, with the children (RabbitMQ's Erlang VM, which epmd
        keeps registered until it is gone)."""
        if terminate(pid, self.settings.timeout):
            return
        log(f"{self.name} did not stop within {self.settings.timeout}s: killing it")
        doomed = [pid, *children(pid)]
        for each in doomed:
            send(each, signal.SIGKILL)
        while any(alive(each) for each in doomed):
            time.sleep(0.1)

    def clear(self) -> None:
        """Removes what a stopped server leaves behind, at each `down`."""
        self.pid_file.unlink(missing_ok=True)

    def details(self) -> str:
        """What `status` says of the running server after its pid."""
        return f"{LOOPBACK}:{self.port}, data in {self.directory}"


def launch(service: Service) -> int:
    """Starts `service` unless it runs (installing it first if needed); returns its pid."""
    if not service.installed():
        install_packages.install(service.packages)
        if not service.installed():
            raise Failure(f"no {service.name} after installing {' '.join(service.packages)}")
    pid = service.pid()
    if pid is not None:
        log(f"{service.name} already running (pid {pid})")
        return pid
    return service.start()


def wait_ready(service: Service, pid: int) -> None:
    """Polls service.ready(); fails, with the log's tail, when the process `pid` has exited,
    and after the timeout."""
    deadline = time.monotonic() + service.settings.timeout
    while not service.ready():
        if not alive(pid):
            raise Failure(f"{service.name} exited while starting", service.log)
        if time.monotonic() >= deadline:
            timeout = service.settings.timeout
            raise Failure(f"{service.name} not ready after {timeout}s", service.log)
        time.sleep(0.5)


def start_all(services: Sequence[Service]) -> None:
    """Starts what does not run yet, then waits until every service is ready."""
    order = sorted(services, key=lambda service: not service.boots_slowly)
    for service, pid in [(service, launch(service)) for service in order]:
        wait_ready(service, pid)
        service.prepare()


def stop_all(services: Sequence[Service]) -> None:
    """Stops what runs; the data stays."""
    for service in services:
        pid = service.pid()
        if pid is None:
            log(f"{service.name} not running")
        else:
            log(f"stopping {service.name} (pid {pid})")
            service.stop(pid)
        service.clear()


# --- PostgreSQL ----------------------------------------------------------------------------


def find_pg_bindir() -> Path | None:
    """The bin directory of the newest installed server. pg_config alone is not proof:
    libpq-dev ships it without any server."""
    if shutil.which("pg_config"):
        bindir = Path(run(["pg_config", "--bindir"]).stdout.strip() or "/nonexistent")
        if os.access(bindir / "postgres", os.X_OK):
            return bindir
    servers = Path("/usr/lib/postgresql").glob("*/bin/postgres")
    version = lambda path: [int(part) for part in re.findall(r"\d+", path.parts[-3])]  # noqa: E731
    for server in sorted(servers, key=version, reverse=True):
        if os.access(server, os.X_OK):
            return server.parent
    return None


def postgres_os_user(directory: Path) -> str:
    """The OS user that runs PostgreSQL, which refuses to run as root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    if directory.exists():
        return directory.owner()  # an existing cluster keeps its owner
    with contextlib.suppress(KeyError):
        return pwd.getpwnam("postgres").pw_name
    user = "conversations-dev"
    useradd = ["useradd", "--system", "--user-group", "--no-create-home"]
    useradd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user]
    if run(useradd, stdout=sys.stderr).returncode:
        raise Failure(f"cannot create the user {user} to run PostgreSQL")
    return user


class PostgreSQL(Service):
    """From Debian's binaries, with pg_ctl, as an unprivileged user when run by root."""

    name = "PostgreSQL"
    variable = "DATABASE_URL"
    packages = ("postgresql",)
    program = "postgres"

    def __init__(self, settings: Settings) -> None:
        # PostgreSQL's own directory: data/, postgres.log and the Unix socket. It may be a
        # symlink into /var/tmp (see prepare_dir).
        self.link = settings.state_dir / "pg"
        super().__init__(settings, self.link, settings.pg_port, "postgres.log")
        self.use_real_dir()

    def use_real_dir(self) -> None:
        """From here on the resolved path: the server's user may be unable to follow the link
        through the checkout's directories."""
        self.directory = self.link.resolve()
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.pid_file = self.data / "postmaster.pid"  # line 1: the pid, line 4: the port

    @functools.cached_property
    def user(self) -> str:
        """Once the directory exists, its owner: asked first before prepare_dir makes it."""
        return postgres_os_user(self.link)

    @functools.cached_property
    def bin(self) -> Path:
        return find_pg_bindir() or Path("/nonexistent")  # then the first command says so

    def url(self) -> str:
        return f"postgresql://{APP_USER}:{APP_PASSWORD}@{LOOPBACK}:{self.port}/{DB_NAME}"

    def installed(self) -> bool:
        return find_pg_bindir() is not None

    def as_user(self, command: Sequence[str | Path | int]) -> list[str | Path | int]:
        """`command`, run as the server's user."""
        return ["runuser", "-u", self.user, "--", *command] if os.geteuid() == 0 else [*command]

    def run_as_user(self, command: Sequence[str | Path | int], **options: Any) -> int:
        """Runs `command` as the server's user; returns its status. From /, because that user
        may not be allowed into the checkout (e.g. one under /root)."""
        return run(self.as_user(command), cwd="/", **options).returncode

    def own(self, path: Path) -> None:
        """Gives `path` to the server's user, when that is someone else (we are root)."""
        if os.geteuid() == 0:
            account = pwd.getpwnam(self.user)
            os.chown(path, account.pw_uid, account.pw_gid)

    def make_own_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        self.own(path)

    def write_own_file(self, path: Path, text: str) -> None:
        write_private(path, text)
        self.own(path)

    def fallback_dir(self) -> Path:
        checkout = hashlib.sha256(str(self.settings.state_dir.parent).encode()).hexdigest()
        return Path(f"/var/tmp/conversations-dev-pg-{checkout[:12]}")  # noqa: S108  # mode 700

    def prepare_dir(self) -> None:
        """Makes the directory usable by the server's user, on the first run: in the checkout
        when that user can write there and the socket's path fits (Unix socket paths are limited
        to 107 bytes); otherwise in a per-checkout directory under /var/tmp, linked from the
        checkout so that every later command finds it the same way."""
        log(f"PostgreSQL runs as {self.user}")  # decided before the directory exists: see user
        if self.link.is_symlink():
            # The system may have cleaned /var/tmp since: recreate the target (initdb follows).
            self.make_own_dir(self.link.resolve())
        elif not self.link.is_dir():
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            self.make_own_dir(self.link)
            socket_path = os.fsencode(self.link / f".s.PGSQL.{self.port}")
            if self.run_as_user(["test", "-w", self.link]) or len(socket_path) > 107:
                self.link.rmdir()
                self.make_own_dir(self.fallback_dir())
                self.link.symlink_to(self.fallback_dir())
                log(
                    f"PostgreSQL files in {self.fallback_dir()} ({self.user} cannot use {self.link})"
                )
        self.use_real_dir()

    def init(self) -> None:
        """First run: a cluster whose superuser is the app's user; passwords (SCRAM) over TCP,
        trust on the Unix socket, which only the server's user (and root) can reach."""
        if (self.data / "PG_VERSION").is_file():
            return
        staging, initdb_log = self.directory / "data.initdb", self.directory / "initdb.log"
        password_file = self.directory / "initdb.pw"  # in a directory of mode 700
        log(f"initialising PostgreSQL in {self.data}")
        shutil.rmtree(staging, ignore_errors=True)
        self.write_own_file(password_file, APP_PASSWORD + "\n")
        initdb = [self.bin / "initdb", "-D", staging, "-U", APP_USER, f"--pwfile={password_file}"]
        initdb += ["--encoding=UTF8", "--no-locale", "--auth-local=trust"]
        initdb += ["--auth-host=scram-sha-256", "--no-sync"]
        try:
            with initdb_log.open("w") as output:
                failed = self.run_as_user(initdb, stdout=output, stderr=subprocess.STDOUT)
        finally:
            password_file.unlink(missing_ok=True)
        if failed:
            raise Failure("initdb failed", initdb_log)
        with (staging / "postgresql.conf").open("a") as conf:
            conf.write("include = 'conversations-dev.conf'\n")
        # Staged, then moved: an interrupted initdb leaves no half-made cluster behind.
        staging.rename(self.data)

    def config(self) -> str:
        """Rewritten at every start, so that a changed DEV_PG_PORT or a moved checkout takes
        effect."""
        return HEADER + (
            f"listen_addresses = '{LOOPBACK}'\nport = {self.port}\n"
            f"unix_socket_directories = '{self.directory}'\nmax_connections = 200\n"
            "# Room for a benchmark account of a million conversations and its indexes (about\n"
            "# 600 MB), as a production server would have: a deep page then reads cached\n"
            "# pages, not the OS's. Allocated only as it is used.\nshared_buffers = 1GB\n"
            "# Throwaway local data: speed over crash safety.\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )

    def start(self) -> int:
        self.prepare_dir()
        self.init()
        self.write_own_file(self.data / "conversations-dev.conf", self.config())
        wait_port_free(self.port, "DEV_PG_PORT")
        log(f"starting PostgreSQL on {LOOPBACK}:{self.port}")
        # -w: pg_ctl waits for readiness and notices an early exit. pg_ctl also gives the server
        # its own session, so a Ctrl-C in the terminal that started it (e.g. `make run`) does
        # not reach it.
        pg_ctl = [self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.log, "-w"]
        if self.run_as_user([*pg_ctl, "-t", self.settings.timeout], stdout=subprocess.DEVNULL):
            raise Failure("PostgreSQL did not start", self.log)
        return self.pid() or 0  # 0: gone already, which wait_ready reports

    def ready(self) -> bool:
        return run([self.bin / "pg_isready", "-q", "-h", LOOPBACK, "-p", self.port]).returncode == 0

    def prepare(self) -> None:
        """Creates the app's database if missing, connecting the way the app does (TCP and
        password), which also checks the login."""
        client = ["-h", LOOPBACK, "-p", str(self.port), "-U", APP_USER]
        env = {**os.environ, "PGPASSWORD": APP_PASSWORD}
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"  # noqa: S608  # constant
        psql = [self.bin / "psql", "-X", "-q", "-t", "-A", *client, "-d", "postgres", "-c", query]
        found = run(psql, env=env)
        if found.returncode:
            where = f"{LOOPBACK}:{self.port}"
            raise Failure(f"cannot log in to PostgreSQL as {APP_USER} on {where}", self.log)
        if found.stdout.strip() != "1":
            log(f"creating database {DB_NAME}")
            if run(
                [self.bin / "createdb", *client, DB_NAME], env=env, stdout=sys.stderr
            ).returncode:
                raise Failure(f"cannot create the database {DB_NAME}", self.log)

    def stop(self, pid: int) -> None:
        pg_ctl = [self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w"]
        if self.run_as_user([*pg_ctl, "-t", self.settings.timeout], stdout=subprocess.DEVNULL):
            raise Failure("PostgreSQL did not stop", self.log)

    def clear(self) -> None:
        pass  # pg_ctl removes postmaster.pid itself

    def details(self) -> str:
        port = self.pid_file.read_text().splitlines()[3]  # where it listens, maybe an old port
        return f"{LOOPBACK}:{port}, data in {self.data}"


# --- RabbitMQ ------------------------------------------------------------------------------


class RabbitMQ(Service):
    """From Debian's package, with a configuration, a cookie and an Erlang node of its own."""

    name = "RabbitMQ"
    variable = "AMQP_URL"
    packages = ("rabbitmq-server",)
    program = "rabbitmq-server"
    boots_slowly = True  # its boot is the longest part of a start
    node = "conversations-dev@localhost"
    # Debian's unwrapped scripts: the /usr/sbin wrappers switch to the rabbitmq user and the
    # system's directories.
    bin = Path("/usr/lib/rabbitmq/bin")

    def __init__(self, settings: Settings) -> None:
        directory = settings.state_dir / "rabbitmq"
        super().__init__(settings, directory, settings.amqp_port, "rabbitmq.log")

    def url(self) -> str:
        return f"amqp://{APP_USER}:{APP_PASSWORD}@{LOOPBACK}:{self.port}/"

    def installed(self) -> bool:
        return os.access(self.bin / "rabbitmq-server", os.X_OK)

    def environment(self) -> dict[str, str]:
        """The server's and rabbitmqctl's: they find each other through our epmd port, our node
        name and the same cookie."""
        directory, dist_port = str(self.directory), self.settings.dist_port
        erl_args = "-kernel inet_dist_use_interface {127,0,0,1}"
        return {
            **os.environ,
            # Erlang keeps its cookie in $HOME: a private one in the state directory.
            "HOME": directory,
            # Nothing from the system's /etc/rabbitmq: no rabbitmq-env.conf, an empty conf.d of
            # our own, no advanced.config.
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",
            "RABBITMQ_CONFIG_FILE": f"{directory}/rabbitmq.conf",
            "RABBITMQ_CONFIG_FILES": f"{directory}/conf.d",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{directory}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{directory}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{directory}/mnesia",
            "RABBITMQ_LOG_BASE": f"{directory}/log",
            # "-" logs to stdout, which start() sends to one file together with any error from
            # before the logger starts.
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_NODENAME": self.node,
            # Erlang distribution, the server's and the CLI's, on loopback and our ports.
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(dist_port + 1),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(dist_port + 10),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": erl_args,
            "RABBITMQ_CTL_ERL_ARGS": erl_args,
            "ERL_EPMD_PORT": str(self.settings.epmd_port),
            "ERL_EPMD_ADDRESS": LOOPBACK,
        }

    def write_config(self) -> None:
        (self.directory / "conf.d").mkdir(parents=True, exist_ok=True)
        (self.directory / "mnesia").mkdir(exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"{HEADER}listeners.tcp.1 = {LOOPBACK}:{self.port}\n"
            "# Made by the node when it first boots, instead of guest: administrator with\n"
            "# full permissions on vhost /.\n"
            f"default_user = {APP_USER}\ndefault_pass = {APP_PASSWORD}\n"
        )
        # One plugin (no management UI, for the fastest start): the consistent-hash exchange
        # that docs/events.md's ordered scale-out subscriber binds to ours.
        (self.directory / "enabled_plugins").write_text("[rabbitmq_consistent_hash_exchange].\n")
        # Our cookie exists before the first start, so that the server and a rabbitmqctl racing
        # it cannot each create a different one.
        if not (self.directory / ".erlang.cookie").is_file():
            write_private(self.directory / ".erlang.cookie", secrets.token_hex(16))

    def start(self) -> int:
        self.write_config()
        wait_port_free(self.port, "DEV_AMQP_PORT")
        wait_port_free(self.settings.epmd_port, "DEV_EPMD_PORT", allow_listener=True)
        log(f"starting RabbitMQ on {LOOPBACK}:{self.port} (node {self.node})")
        # In a session of its own, so that a Ctrl-C in the terminal that started it (e.g. `make
        # run`) does not reach it. Its pid is the launcher's, which turns a TERM into a clean
        # broker shutdown.
        with self.log.open("w") as output:
            server = subprocess.Popen(
                [self.bin / "rabbitmq-server"],
                cwd=self.directory,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{server.pid}\n")
        return server.pid

    def ready(self) -> bool:
        # await_startup fails at once while the node is not registered yet; then it waits for
        # the broker to finish booting.
        ctl = [self.bin / "rabbitmqctl", "-q", "await_startup", "--timeout", "10"]
        return run(ctl, env=self.environment()).returncode == 0

    def clear(self) -> None:
        super().clear()
        # The node's VM started an epmd on our port, which outlives the node. Only ours listens
        # on that port; this also stops one left by a rabbitmqctl.
        if shutil.which("epmd"):
            run(
                ["epmd", "-kill"], env={**os.environ, "ERL_EPMD_PORT": str(self.settings.epmd_port)}
            )

    def details(self) -> str:
        return f"AMQP on {LOOPBACK}:{self.port}, node {self.node}"


# --- Redis ---------------------------------------------------------------------------------


class Redis(Service):
    """From Debian's package, daemonized, with a password and nothing written to disk."""

    name = "Redis"
    variable = "RATE_LIMIT_REDIS_URL"
    packages = ("redis-server",)
    program = "redis-server"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.state_dir / "redis", settings.redis_port, "redis.log")
        self.pid_file = self.directory / "redis.pid"

    def url(self) -> str:
        return f"redis://:{APP_PASSWORD}@{LOOPBACK}:{self.port}/0"

    def installed(self) -> bool:
        return bool(shutil.which("redis-server") and shutil.which("redis-cli"))

    def config(self) -> str:
        """Rewritten at every start, so that a changed DEV_REDIS_PORT or a moved checkout takes
        effect."""
        return HEADER + (
            f"bind {LOOPBACK}\nport {self.port}\nrequirepass {APP_PASSWORD}\ndaemonize yes\n"
            f'pidfile "{self.pid_file}"\nlogfile "{self.log}"\ndir "{self.directory}"\n'
            "# Rate-limit counters live for a window (a minute): nothing worth writing to disk.\n"
            'save ""\nappendonly no\n'
        )

    def start(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_private(self.directory / "redis.conf", self.config())  # it holds the password
        wait_port_free(self.port, "DEV_REDIS_PORT")
        log(f"starting Redis on {LOOPBACK}:{self.port}")
        self.pid_file.unlink(missing_ok=True)
        # daemonize: the server forks into a session of its own (a Ctrl-C in the terminal that
        # started it, e.g. `make run`, does not reach it) and writes its pid file once it runs.
        with self.log.open("a") as output:
            server = ["redis-server", self.directory / "redis.conf"]
            started = run(server, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        if started.returncode:
            raise Failure("Redis did not start", self.log)
        deadline = time.monotonic() + self.settings.timeout
        while (pid := self.pid()) is None:
            if time.monotonic() >= deadline:
                raise Failure(f"Redis wrote no pid file in {self.settings.timeout}s", self.log)
            time.sleep(0.1)
        return pid

    def ready(self) -> bool:
        # The password goes through the environment, never on a command line that ps shows.
        ping = ["redis-cli", "-h", LOOPBACK, "-p", str(self.port), "ping"]
        return run(ping, env={**os.environ, "REDISCLI_AUTH": APP_PASSWORD}).stdout == "PONG\n"


# --- Commands ------------------------------------------------------------------------------


def external(environ: Mapping[str, str]) -> bool:
    """Whether DATABASE_URL and AMQP_URL point the app at services run elsewhere."""
    return bool(environ.get("DATABASE_URL") and environ.get("AMQP_URL"))


def up(services: Sequence[Service], environ: Mapping[str, str]) -> int:
    if external(environ):
        log("DATABASE_URL and AMQP_URL are set: using them, starting nothing")
        return 0
    start_all(services)
    log("ready: " + ", ".join(f"{each.name} on {LOOPBACK}:{each.port}" for each in services))
    return 0


def down(services: Sequence[Service], environ: Mapping[str, str]) -> int:
    stop_all(services)
    return 0


def env(services: Sequence[Service], environ: Mapping[str, str]) -> int:
    for service in services:
        value = environ.get(service.variable) if external(environ) else service.url()
        if value:
            print(f"export {service.variable}={shlex.quote(value)}")  # for eval, whatever it holds
    return 0


def status(services: Sequence[Service], environ: Mapping[str, str]) -> int:
    if external(environ):
        print("DATABASE_URL and AMQP_URL are set: the app uses those")
    code = 0
    for service in services:
        pid = service.pid()
        if pid is None:
            code = 3
            print(f"{service.name}: not running")
        else:
            print(f"{service.name}: running, pid {pid}, {service.details()}")
    return code


COMMANDS = {"up": up, "down": down, "env": env, "status": status}


def main(
    argv: Sequence[str],
    environ: Mapping[str, str] = os.environ,
    state_dir: Path = REPO_ROOT / ".dev",
) -> int:
    """The command line: runs the command argv[0] on the three services."""
    command = COMMANDS.get(argv[0]) if argv else None
    if command is None:
        print("usage: deploy/dev/services.py up|down|env|status", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_environ(environ, state_dir)
        return command([PostgreSQL(settings), RabbitMQ(settings), Redis(settings)], environ)
    except install_packages.Unavailable as error:
        log(f"error: {error}")
    except Failure as failure:
        log(f"error: {failure}")
        if failure.log is not None and os.access(failure.log, os.R_OK):
            log(f"last lines of {failure.log}:")
            print(
                *failure.log.read_text(errors="replace").splitlines()[-30:],
                sep="\n",
                file=sys.stderr,
            )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
