"""The load generators, run as separate processes: wrk (HTTP) and pgbench (PostgreSQL).

Each run is bounded (`-d` / `-T`) and returns one `LoadResult`; the command lines are kept for
the report (with the database password replaced by a placeholder).
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

WRK_DIR = Path(__file__).resolve().parent / "wrk"
PGBENCH_DIR = Path(__file__).resolve().parent / "pgbench"
WRK_THREADS = 2
WRK_CONNECTIONS = 64
# A request slower than this counts as a wrk timeout (a failure), not as a latency.
WRK_TIMEOUT = "10s"
# pgbench logs one transaction in this many, for the percentiles (its summary has none).
PGBENCH_SAMPLING = 0.2


@dataclass(frozen=True)
class LoadResult:
    """What one bounded run measured."""

    rate: float  # requests (or transactions) per second
    p50_ms: float
    p99_ms: float
    requests: int
    failures: int  # non-2xx/3xx answers, socket errors and timeouts (or failed transactions)


class Commands:
    """The commands a run executed, in order, for the report."""

    def __init__(self, database_url: str, root: Path) -> None:
        self._secret = urlsplit(database_url).password or None
        self._root = f"{root}/"
        self.lines: list[str] = []

    def record(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        """Note a command line (and the variables that matter): paths relative to the
        repository, the database password redacted."""
        prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        line = (prefix + " " if prefix else "") + subprocess.list2cmdline(argv)
        if cwd is not None:
            line = f"(cd {cwd} && {line})"
        line = line.replace(self._root, "")
        if self._secret:
            line = line.replace(f":{self._secret}@", ":***@")
        if line not in self.lines:
            self.lines.append(line)

    def note(self, text: str) -> None:
        """A step the harness does itself, as a comment among the commands."""
        self.lines.append(f"# {text}")


def find_pgbench() -> str:
    """pgbench of the newest installed server, found the way deploy/dev/services.py finds it."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if (Path(bindir) / "postgres").exists() and (Path(bindir) / "pgbench").exists():
            return str(Path(bindir) / "pgbench")
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pgbench"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
        reverse=True,
    )
    if versions:
        return str(versions[0])
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found: it comes with Debian's postgresql package")
    return found


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


async def wrk(
    commands: Commands,
    script: str,
    base_url: str,
    seconds: float,
    data_dir: Path,
    *,
    connections: int = WRK_CONNECTIONS,
    args: tuple[str, ...] = (),
) -> LoadResult:
    """Run wrk with `script` (a file of tests/bench/wrk) against `base_url` for `seconds`;
    `args` go to the script's init() (after `--`)."""
    argv = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        f"--timeout={WRK_TIMEOUT}",
        "--latency",
        "-s",
        script,
        base_url,
        *(("--", *args) if args else ()),
    ]
    env = {
        "BENCH_DATA_DIR": str(data_dir),
        "BENCH_TAG": uuid.uuid4().hex[:8],
        "BENCH_THREADS": str(WRK_THREADS),
    }
    shown = {**env, "BENCH_DATA_DIR": _relative(data_dir, WRK_DIR), "BENCH_TAG": "$RANDOM"}
    commands.record(argv, shown, cwd=WRK_DIR)
    code, output = await run_bounded(argv, cwd=WRK_DIR, env=env)
    match = re.search(r"^BENCH_RESULT (\{.*\})$", output, re.MULTILINE)
    if code != 0 or match is None:
        raise RuntimeError(f"wrk {script} failed:\n{output}")
    summary = json.loads(match.group(1))
    errors = sum(value for key, value in summary.items() if key.startswith("errors_"))
    return LoadResult(
        rate=summary["requests"] / (summary["duration_us"] / 1e6),
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        requests=summary["requests"],
        failures=errors,
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The value at `fraction` (0..1) of sorted values (nearest rank); NaN when there are none."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


async def run_bounded(
    argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a command that stops by itself; its exit code and output (stdout and stderr).

    If the harness is interrupted meanwhile, the command is killed by its pid first.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output = (await process.communicate())[0].decode()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return process.returncode or 0, output


def _empty_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _logged_latencies_ms(log_dir: Path) -> list[float]:
    """Sorted latencies from pgbench's per-transaction logs, whose lines are: client,
    transaction, latency (us), script, epoch seconds, epoch microseconds."""
    return sorted(
        int(line.split()[2]) / 1000
        for path in log_dir.iterdir()
        for line in path.read_text().splitlines()
    )


async def pgbench(
    commands: Commands,
    script: str,
    database_url: str,
    seconds: int,
    clients: int,
    variables: dict[str, int],
    log_dir: Path,
) -> LoadResult:
    """Run `pgbench -M prepared` with `script` (a file of tests/bench/pgbench) for `seconds`."""
    _empty_dir(log_dir)
    argv = [
        find_pgbench(),
        "-M",
        "prepared",
        "-n",
        f"-c{clients}",
        f"-j{WRK_THREADS}",
        f"-T{seconds}",
        *(f"-D{name}={value}" for name, value in variables.items()),
        "-l",
        f"--sampling-rate={PGBENCH_SAMPLING}",
        f"--log-prefix={log_dir}/tx",
        "-f",
        str(PGBENCH_DIR / script),
        database_url,
    ]
    commands.record(argv)
    code, output = await run_bounded(argv)
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", output, re.MULTILINE)
    done = re.search(r"^number of transactions actually processed: (\d+)", output, re.MULTILINE)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.MULTILINE)
    if code != 0 or tps is None or done is None:
        raise RuntimeError(f"pgbench {script} failed:\n{output}")
    latencies = _logged_latencies_ms(log_dir)
    return LoadResult(
        rate=float(tps.group(1)),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        requests=int(done.group(1)),
        failures=int(failed.group(1)) if failed else 0,
    )
