"""deploy/dev/services.py, the local PostgreSQL, RabbitMQ and Redis: its decisions with fakes,
and one real Redis started, found, printed and stopped in a temporary directory."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.proxy import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy" / "dev"))
import install_packages
import services as dev

DEV_PORTS = {
    "DEV_PG_PORT": "25432",
    "DEV_AMQP_PORT": "25672",
    "DEV_EPMD_PORT": "24369",
    "DEV_RABBIT_DIST_PORT": "27729",
    "DEV_REDIS_PORT": "26379",
}
NOBODY = 65534


def settings(tmp_path: Path, **ports: int) -> dev.Settings:
    return dev.Settings(tmp_path / ".dev", **ports)


# --- env, status and up as the Makefile calls them ----------------------------------------


def test_env_prints_the_local_urls_on_the_dev_ports(tmp_path, capsys):
    assert dev.main(["env"], DEV_PORTS, tmp_path / ".dev") == 0
    assert capsys.readouterr().out.splitlines() == [
        "export DATABASE_URL=postgresql://conversations:conversations@127.0.0.1:25432/conversations",
        "export AMQP_URL=amqp://conversations:conversations@127.0.0.1:25672/",
        "export RATE_LIMIT_REDIS_URL=redis://:conversations@127.0.0.1:26379/0",
    ]
    assert not (tmp_path / ".dev").exists()  # env starts nothing


def test_the_default_ports(tmp_path):
    defaults = dev.Settings.from_environ({"DEV_PG_PORT": ""}, tmp_path)
    ports = (defaults.pg_port, defaults.amqp_port, defaults.epmd_port, defaults.dist_port)
    assert ports == (15432, 16572, 14369, 26729)
    assert (defaults.redis_port, defaults.timeout) == (16379, 60)


def test_a_port_that_is_not_a_number_is_refused(tmp_path, capsys):
    assert dev.main(["env"], {"DEV_REDIS_PORT": "6379x"}, tmp_path) == 1
    assert "DEV_REDIS_PORT must be a number" in capsys.readouterr().err


def test_an_unknown_command_prints_the_usage(tmp_path, capsys):
    assert dev.main(["start"], {}, tmp_path) == 2
    assert dev.main([], {}, tmp_path) == 2
    assert "up|down|env|status" in capsys.readouterr().err


@pytest.mark.parametrize("redis", [None, "redis://:secret@cache:6379/1"])
def test_with_database_and_amqp_urls_set_env_prints_those_for_eval(tmp_path, capsys, redis):
    environ = {
        "DATABASE_URL": "postgresql://u:p@db/x?sslmode=require&a=1",
        "AMQP_URL": "amqp://mq/",
    }
    if redis:
        environ["RATE_LIMIT_REDIS_URL"] = redis
    assert dev.main(["env"], {**environ, **DEV_PORTS}, tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line) for line in lines] == [
        ["export", f"{name}={value}"] for name, value in environ.items()
    ]


def test_with_database_and_amqp_urls_set_up_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dev, "start_all", lambda services: pytest.fail("started services"))
    environ = {"DATABASE_URL": "postgresql://db/x", "AMQP_URL": "amqp://mq/"}
    assert dev.main(["up"], environ, tmp_path / ".dev") == 0
    assert "starting nothing" in capsys.readouterr().err
    assert not (tmp_path / ".dev").exists()


def test_status_says_what_does_not_run_and_exits_3(tmp_path, capsys):
    ports = {name: str(free_port()) for name in DEV_PORTS}
    assert dev.main(["status"], ports, tmp_path / ".dev") == 3
    assert capsys.readouterr().out.splitlines() == [
        "PostgreSQL: not running",
        "RabbitMQ: not running",
        "Redis: not running",
    ]


def test_a_failure_shows_the_end_of_the_servers_log(tmp_path, capsys, monkeypatch):
    server_log = tmp_path / "server.log"
    server_log.write_text("".join(f"line {n}\n" for n in range(100)))

    def failing_up(services, environ):
        raise dev.Failure("Redis exited while starting", server_log)

    monkeypatch.setitem(dev.COMMANDS, "up", failing_up)
    assert dev.main(["up"], {}, tmp_path) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "services: error: Redis exited while starting"
    assert err[2:] == [f"line {n}" for n in range(70, 100)]


# --- the Service abstraction, with a fake service ------------------------------------------


class FakeService(dev.Service):
    name, variable, packages, program = "Fake", "FAKE_URL", ("fake-server",), "fake"

    def __init__(self, tmp_path, *, installed=True, running_pid=None, process_pid=None):
        super().__init__(dev.Settings(tmp_path, timeout=5), tmp_path, 1, "fake.log")
        self.is_installed, self.running_pid, self.process_pid = installed, running_pid, process_pid
        self.calls: list[str] = []

    def url(self):
        return "fake://"

    def installed(self):
        return self.is_installed

    def pid(self):
        return self.running_pid

    def start(self):
        self.calls.append("start")
        return self.process_pid or os.getpid()

    def ready(self):
        return self.running_pid is not None or self.process_pid is None

    def prepare(self):
        self.calls.append("prepare")

    def stop(self, pid):
        self.calls.append(f"stop {pid}")

    def clear(self):
        self.calls.append("clear")


def test_up_installs_the_packages_of_a_missing_server_then_starts_it(tmp_path, monkeypatch):
    service = FakeService(tmp_path, installed=False)
    installed = []

    def install(packages):
        installed.extend(packages)
        service.is_installed = True

    monkeypatch.setattr(install_packages, "install", install)
    dev.start_all([service])
    assert installed == ["fake-server"]
    assert service.calls == ["start", "prepare"]


def test_up_fails_when_the_install_did_not_bring_the_binaries(tmp_path, monkeypatch):
    monkeypatch.setattr(install_packages, "install", lambda packages: None)
    with pytest.raises(dev.Failure, match="no Fake after installing fake-server"):
        dev.start_all([FakeService(tmp_path, installed=False)])


def test_up_leaves_a_running_server_alone(tmp_path, capsys):
    service = FakeService(tmp_path, running_pid=os.getpid())
    dev.start_all([service])
    assert service.calls == ["prepare"]  # not started again; its database is still checked
    assert f"Fake already running (pid {os.getpid()})" in capsys.readouterr().err


def test_up_starts_the_slow_booting_server_first(tmp_path):
    started = []
    fast, slow = FakeService(tmp_path), FakeService(tmp_path)
    slow.boots_slowly = True
    fast.start = lambda: started.append("fast") or os.getpid()
    slow.start = lambda: started.append("slow") or os.getpid()
    dev.start_all([fast, slow])
    assert started == ["slow", "fast"]


def test_up_fails_with_the_log_when_the_server_exits_while_starting(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    service = FakeService(tmp_path, process_pid=finished.pid)
    with pytest.raises(dev.Failure, match="Fake exited while starting") as failure:
        dev.start_all([service])
    assert failure.value.log == tmp_path / "fake.log"


def test_down_stops_what_runs_and_clears_what_a_stopped_server_leaves(tmp_path, capsys):
    running, stopped = FakeService(tmp_path, running_pid=4242), FakeService(tmp_path)
    dev.stop_all([running, stopped])
    assert running.calls == ["stop 4242", "clear"]
    assert stopped.calls == ["clear"]
    assert "Fake not running" in capsys.readouterr().err


# --- processes and ports -------------------------------------------------------------------


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        assert dev._proc_stat(child.pid)[:1] == ["Z"]
        assert not dev.alive(child.pid)
    finally:
        child.wait()
    assert dev.alive(os.getpid())


def test_a_pid_file_counts_only_while_its_process_runs_the_program(tmp_path):
    pid_file = tmp_path / "server.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    assert dev.read_pid(pid_file, "python") == os.getpid()
    assert dev.read_pid(pid_file, "redis-server") is None  # the pid was reused
    pid_file.write_text("garbage\n")
    assert dev.read_pid(pid_file, "python") is None
    assert dev.read_pid(tmp_path / "missing.pid", "python") is None


def test_the_port_probe_tells_free_listening_and_busy_apart():
    with socket.socket() as listener, socket.socket() as holder:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert dev.port_state(listener.getsockname()[1]) == "listening"
        holder.bind(("127.0.0.1", 0))  # bound, not listening: what a client connection holds
        assert dev.port_state(holder.getsockname()[1]) == "busy"
    assert dev.port_state(free_port()) == "free"


def probes(*states):
    answers = iter(states)
    return lambda port: next(answers)


def test_a_port_held_by_a_closing_connection_is_waited_for(capsys):
    dev.wait_port_free(1, "DEV_X_PORT", probe=probes("busy", "busy", "free"), pause=0)
    err = capsys.readouterr().err
    assert err.count("held by a closing client connection: waiting for it") == 1


def test_a_port_that_stays_busy_fails_naming_the_setting():
    with pytest.raises(dev.Failure, match="port 1 stayed busy for 0s: set DEV_X_PORT"):
        dev.wait_port_free(1, "DEV_X_PORT", probe=lambda port: "busy", patience=0)


def test_a_port_where_another_server_listens_fails_at_once_unless_shared():
    with pytest.raises(dev.Failure, match="taken by another server: stop it, or set DEV_X_PORT"):
        dev.wait_port_free(1, "DEV_X_PORT", probe=probes("listening"))
    dev.wait_port_free(1, "DEV_EPMD_PORT", probe=probes("listening"), allow_listener=True)


# --- PostgreSQL: its OS user and its directory ---------------------------------------------


def test_postgresql_runs_as_the_user_who_is_not_root(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    assert dev.postgres_os_user(tmp_path / "pg") == "nobody"
    assert dev.PostgreSQL(settings(tmp_path)).as_user(["pg_ctl"]) == ["pg_ctl"]


def test_as_root_postgresql_keeps_the_owner_of_an_existing_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "pg").mkdir()
    if os.getuid() == 0:
        os.chown(tmp_path / "pg", NOBODY, NOBODY)
        assert dev.postgres_os_user(tmp_path / "pg") == "nobody"
    else:
        assert dev.postgres_os_user(tmp_path / "pg") == (tmp_path / "pg").owner()


def test_as_root_postgresql_runs_as_postgres_or_a_user_made_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    users = {"postgres"}
    commands = []

    def getpwnam(name):
        if name not in users:
            raise KeyError(name)
        return dev.pwd.struct_passwd((name, "x", 1, 1, "", "/", "/bin/sh"))

    def run(command, **options):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(dev.pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(dev, "run", run)
    assert dev.postgres_os_user(tmp_path / "pg") == "postgres"
    assert commands == []
    users.clear()
    assert dev.postgres_os_user(tmp_path / "pg") == "conversations-dev"
    assert commands[0][:2] == ["useradd", "--system"]

    postgresql = dev.PostgreSQL(settings(tmp_path))
    postgresql.user = "conversations-dev"
    assert postgresql.as_user(["pg_ctl", "status"]) == [
        "runuser",
        "-u",
        "conversations-dev",
        "--",
        "pg_ctl",
        "status",
    ]


@pytest.mark.skipif(os.getuid() != 0, reason="gives a directory to another user")
def test_as_root_the_user_is_chosen_before_its_directory_is_made(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    nobody = dev.pwd.getpwnam("nobody")
    monkeypatch.setattr(dev.pwd, "getpwnam", lambda name: nobody)  # "postgres" is nobody here
    postgresql = dev.PostgreSQL(settings(tmp_path))
    monkeypatch.setattr(postgresql, "run_as_user", lambda command, **options: 0)
    postgresql.prepare_dir()
    assert postgresql.user == "nobody"  # not root, the owner of a directory made by root
    assert postgresql.link.stat().st_uid == nobody.pw_uid


def unprivileged_postgresql(tmp_path, monkeypatch, state_dir, writable=True):
    """A PostgreSQL whose user may not write in `state_dir`, with its fallback in tmp_path."""
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)  # no chown
    postgresql = dev.PostgreSQL(dev.Settings(state_dir))
    postgresql.user = "nobody"
    monkeypatch.setattr(postgresql, "fallback_dir", lambda: tmp_path / "var-tmp-pg")
    monkeypatch.setattr(postgresql, "run_as_user", lambda command, **options: 0 if writable else 1)
    return postgresql


def test_postgresql_keeps_its_files_in_the_checkout_when_its_user_can(tmp_path, monkeypatch):
    postgresql = unprivileged_postgresql(tmp_path, monkeypatch, tmp_path / ".dev")
    postgresql.prepare_dir()
    assert not postgresql.link.is_symlink()
    assert postgresql.data == tmp_path / ".dev" / "pg" / "data"
    assert (tmp_path / ".dev" / "pg").stat().st_mode & 0o777 == 0o700


def test_postgresql_files_move_to_var_tmp_when_its_user_cannot_enter_the_checkout(
    tmp_path, monkeypatch
):
    postgresql = unprivileged_postgresql(tmp_path, monkeypatch, tmp_path / ".dev", writable=False)
    postgresql.prepare_dir()
    assert postgresql.link.readlink() == tmp_path / "var-tmp-pg"
    # Every later command uses the real directory: the user may not follow the link.
    assert postgresql.data == tmp_path / "var-tmp-pg" / "data"
    assert (
        dev.PostgreSQL(dev.Settings(tmp_path / ".dev")).log
        == tmp_path / "var-tmp-pg" / "postgres.log"
    )
    # The system cleaned /var/tmp: the next start recreates the directory behind the link.
    shutil.rmtree(tmp_path / "var-tmp-pg")
    postgresql.prepare_dir()
    assert (tmp_path / "var-tmp-pg").is_dir()


def test_postgresql_files_move_to_var_tmp_when_the_socket_path_is_too_long(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / ".dev"
    postgresql = unprivileged_postgresql(tmp_path, monkeypatch, deep)
    postgresql.prepare_dir()
    assert (deep / "pg").readlink() == tmp_path / "var-tmp-pg"


def test_the_fallback_directory_is_one_per_checkout(tmp_path):
    one = dev.PostgreSQL(dev.Settings(tmp_path / "a" / ".dev")).fallback_dir()
    other = dev.PostgreSQL(dev.Settings(tmp_path / "b" / ".dev")).fallback_dir()
    assert one != other
    assert one.parent == Path("/var/tmp")  # noqa: S108
    assert one.name.startswith("conversations-dev-pg-")


# --- what each server is given -------------------------------------------------------------


def test_postgresql_configuration(tmp_path):
    config = dev.PostgreSQL(settings(tmp_path, pg_port=25432)).config()
    assert "listen_addresses = '127.0.0.1'\nport = 25432\n" in config
    assert f"unix_socket_directories = '{tmp_path / '.dev' / 'pg'}'" in config
    assert "shared_buffers = 1GB\n" in config
    assert "fsync = off\n" in config


def test_rabbitmq_uses_its_own_epmd_and_distribution_ports_on_loopback(tmp_path):
    rabbitmq = dev.RabbitMQ(settings(tmp_path, epmd_port=24369, dist_port=27729))
    environment = rabbitmq.environment()
    assert environment["ERL_EPMD_PORT"] == "24369"
    assert environment["ERL_EPMD_ADDRESS"] == "127.0.0.1"
    assert environment["RABBITMQ_DIST_PORT"] == "27729"
    assert (
        environment["RABBITMQ_CTL_DIST_PORT_MIN"],
        environment["RABBITMQ_CTL_DIST_PORT_MAX"],
    ) == (
        "27730",
        "27739",
    )
    assert environment["HOME"] == str(tmp_path / ".dev" / "rabbitmq")  # its own Erlang cookie
    assert environment["RABBITMQ_CONF_ENV_FILE"] == "/dev/null"


def test_rabbitmq_configuration_and_cookie_survive_a_rewrite(tmp_path):
    rabbitmq = dev.RabbitMQ(settings(tmp_path, amqp_port=25672))
    rabbitmq.write_config()
    cookie = (rabbitmq.directory / ".erlang.cookie").read_text()
    rabbitmq.write_config()
    assert (rabbitmq.directory / ".erlang.cookie").read_text() == cookie
    assert (rabbitmq.directory / ".erlang.cookie").stat().st_mode & 0o777 == 0o600
    config = (rabbitmq.directory / "rabbitmq.conf").read_text()
    assert "listeners.tcp.1 = 127.0.0.1:25672\n" in config
    assert "default_user = conversations\n" in config
    enabled = (rabbitmq.directory / "enabled_plugins").read_text()
    assert enabled == "[rabbitmq_consistent_hash_exchange].\n"


def test_redis_configuration_has_the_password_and_nothing_on_disk(tmp_path):
    config = dev.Redis(settings(tmp_path, redis_port=26379)).config()
    assert "bind 127.0.0.1\nport 26379\nrequirepass conversations\ndaemonize yes\n" in config
    assert 'save ""\nappendonly no\n' in config


# --- installing Debian packages ------------------------------------------------------------


@pytest.fixture
def apt(monkeypatch):
    """A system with apt-get and sudo; `sudo -n true` answers `apt.sudo_status`."""

    class Apt:
        sudo_status = 0

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        install_packages,
        "_succeeds",
        lambda command: command == ["sudo", "-n", "true"] and Apt.sudo_status == 0,
    )
    return Apt


def test_root_installs_packages_directly(apt, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert install_packages.as_root(["redis-server"]) == []


def test_a_user_with_passwordless_sudo_installs_through_it(apt, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert install_packages.as_root(["redis-server"]) == ["sudo", "-n"]


def test_a_user_without_sudo_is_told_the_command_to_run(apt, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    apt.sudo_status = 1
    with pytest.raises(install_packages.Unavailable) as refused:
        install_packages.as_root(["postgresql", "redis-server"])
    assert str(refused.value) == (
        "missing Debian packages: postgresql redis-server; install them with: "
        "sudo apt-get install --no-install-recommends postgresql redis-server"
    )


def test_without_apt_the_packages_are_left_to_the_user(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(install_packages.Unavailable, match="your system's package manager"):
        install_packages.as_root(["redis-server"])


def test_apt_runs_without_questions_and_waits_for_the_dpkg_lock():
    update, install = install_packages.apt_commands(["sudo", "-n"], ["wrk"])
    assert update == ["sudo", "-n", "apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"]
    assert install[:3] == ["sudo", "-n", "env"]
    assert "DEBIAN_FRONTEND=noninteractive" in install
    assert install[-5:] == ["install", "-y", "-q", "--no-install-recommends", "wrk"]


# --- one real server ------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="Debian's redis-server is not installed"
)
def test_redis_up_twice_status_env_down(tmp_path, capsys):
    redis = [dev.Redis(dev.Settings(tmp_path / ".dev", redis_port=free_port(), timeout=10))]
    port = redis[0].port
    try:
        assert dev.up(redis, {}) == 0
        pid = redis[0].pid()
        assert pid is not None
        assert dev.up(redis, {}) == 0  # harmless: the same server
        assert redis[0].pid() == pid
        assert f"Redis already running (pid {pid})" in capsys.readouterr().err

        assert dev.status(redis, {}) == 0
        assert dev.env(redis, {}) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"Redis: running, pid {pid}, 127.0.0.1:{port}, data in {tmp_path / '.dev' / 'redis'}",
            f"export RATE_LIMIT_REDIS_URL=redis://:conversations@127.0.0.1:{port}/0",
        ]
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"PING\r\n")
            assert client.recv(100).startswith(b"-NOAUTH")  # the password is required
        assert (tmp_path / ".dev" / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
    finally:
        assert dev.down(redis, {}) == 0
    assert not dev.alive(pid)
    assert dev.status(redis, {}) == 3
    assert dev.port_state(port) == "free"


def test_redis_refuses_a_port_where_another_server_listens(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        redis = dev.Redis(dev.Settings(tmp_path, redis_port=other.getsockname()[1]))
        with pytest.raises(dev.Failure, match="or set DEV_REDIS_PORT to another port"):
            redis.start()
