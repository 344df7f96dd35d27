"""A py-spy profile of one service worker under load, boiled down to its top functions.

py-spy samples the live process from outside (ptrace: root, or CAP_SYS_PTRACE) and needs no
TTY. It pauses the worker for each sample (without that, `--nonblocking`, stacks come out cut
short), which is why the profile is taken in a run of its own. `--format raw` writes collapsed
stacks, `frame;frame;...;leaf N` with each frame `function (file:line)`; the summary counts a
function's own samples (it is the leaf), its total samples (anywhere on the stack, once per
stack) and the own samples per package.
"""

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.bench.load import Commands, run_bounded

SAMPLE_RATE = 200
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class FunctionCost:
    """One function's share of the busy samples."""

    function: str
    self_percent: float
    total_percent: float


@dataclass(frozen=True)
class Profile:
    """The top functions of a recording, and own time per package."""

    samples: int
    top_self: list[FunctionCost]
    top_total: list[FunctionCost]
    by_package: list[tuple[str, float]]  # (package, percent of the samples), largest first


def _is_entry(function: str) -> bool:
    """The process's entry and the event loop: on (nearly) every stack, so they say nothing."""
    return function.startswith("<module> ") or any(
        place in function for place in ("(service/cli.py)", "(service/api/server.py)")
    )


def _py_spy() -> str:
    found = Path(sys.executable).with_name("py-spy")
    if found.exists():
        return str(found)
    on_path = shutil.which("py-spy")
    if on_path is None:
        raise RuntimeError("py-spy not found: make bench installs it (the bench extra)")
    return on_path


async def record(commands: Commands, pid: int, seconds: int, raw_path: Path) -> None:
    """Sample `pid` for `seconds` into `raw_path` (collapsed stacks)."""
    argv = [
        _py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        "raw",
        "--output",
        str(raw_path),
    ]
    commands.record(argv)
    code, output = await run_bounded(argv)
    if code != 0:
        raise RuntimeError(f"py-spy failed:\n{output}")


def _name(frame: str) -> str:
    """`function (file)`: py-spy's frame without the line, so a function counts as one."""
    match = _FRAME.match(frame)
    return f"{match['function']} ({match['file']})" if match else frame


def _package(function: str) -> str:
    """`aiohttp` for `f (aiohttp/web.py)`, `uuid` for `f (uuid.py)`: py-spy's file names are
    relative to the import path already."""
    path = function.rpartition(" (")[2].removesuffix(")")
    return path.partition("/")[0].removesuffix(".py")


def summarize(raw_path: Path, top: int = 15) -> Profile:
    """The `top` functions by own samples and by total samples, and own samples per package."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            if not _is_entry(frame):
                total[frame] += count

    def costs(counter: Counter[str]) -> list[FunctionCost]:
        return [
            FunctionCost(name, 100 * own[name] / samples, 100 * total[name] / samples)
            for name, _ in counter.most_common(top)
        ]

    shares = [(name, 100 * count / samples) for name, count in packages.most_common()]
    return Profile(samples, costs(own), costs(total), shares)
