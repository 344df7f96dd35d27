"""The servers under test: started on a free loopback port, logging to a file, stopped by pid.

Each server is a parent process with WORKERS worker processes (the service and the minimal
baseline fork them, uvicorn spawns them). Peak RSS is read per worker from /proc.
"""

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.load import Commands

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
# Left out of the commands in the report: they carry passwords and secrets (`make env` has them).
UNSHOWN_VARIABLES = frozenset({"DATABASE_URL", "AMQP_URL", "JWT_HS256_SECRETS"})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc/<n>/stat."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        # The command may contain spaces and parentheses: the fields after the last ')' are fixed.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        # multiprocessing's resource tracker (uvicorn) is a child too, but serves nothing.
        if parent == pid and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


@dataclass
class Server:
    """A running server: its parent process, port, log and workers."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    workers: list[int] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """Where to send requests."""
        return f"http://127.0.0.1:{self.port}"

    def reset_peak_rss(self) -> None:
        """Start each worker's peak RSS (VmHWM) again from its current RSS (Linux clear_refs)."""
        for pid in self.workers:
            with contextlib.suppress(OSError):  # not permitted: the peak stays cumulative
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peak_rss_mb(self) -> list[float]:
        """Each worker's peak RSS (VmHWM) since the last reset, in MB."""
        return [_status_kb(pid, "VmHWM") / 1024 for pid in self.workers]


async def _stop(server: Server) -> None:
    """SIGTERM to the parent (it stops its workers), then SIGKILL to whatever is left, by pid."""
    process = server.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for pid in server.workers:
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def running(
    commands: Commands,
    name: str,
    argv: list[str],
    env: dict[str, str],
    *,
    port: int,
    workers: int,
    log_path: Path,
    ready: Callable[[Server], Awaitable[bool]],
) -> AsyncIterator[Server]:
    """Start `argv` with `env` added to ours, wait until `ready` and all workers are up, yield
    it, and stop it whatever happens. Its stdout and stderr go to `log_path`."""
    commands.record(argv, {k: v for k, v in env.items() if k not in UNSHOWN_VARIABLES})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C of the harness is the harness's to handle
        )
    server = Server(name, process, port, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log_path}")
            server.workers = _children(process.pid)
            if len(server.workers) >= workers and await ready(server):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not ready in {READY_TIMEOUT_SECONDS:g}s; see {log_path}"
                )
            await asyncio.sleep(0.2)
        yield server
    finally:
        server.workers = sorted(set(server.workers) | set(_children(process.pid)))
        await _stop(server)
