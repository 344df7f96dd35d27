"""The container image (deploy/Dockerfile), built without Docker.

The build context is what `.dockerignore` lets through of what the Dockerfile's build stage
copies. From it the wheels are built as in the build stage, then installed offline into a
clean venv as in the final stage, and the installed `conversations` runs outside the repository.
The tests marked `slow` share that one venv (about half a minute to build); the others only read
the Dockerfile and `.dockerignore`.
"""

import asyncio
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PACKAGES = ("service", "schemas", "sql")
MIGRATIONS = sorted(path.name for path in (REPO / "sql" / "migrations").glob("*.sql"))
BASE_IMAGE = "python:3.11-slim-bookworm"

Instruction = tuple[str, str]  # (keyword, arguments)


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per FROM; continuations joined, comments dropped."""
    stages: list[list[Instruction]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):  # comments may sit inside a continuation
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, arguments = (pending + text).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:  # an ARG before the first FROM belongs to no stage
            stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def arguments(stage: list[Instruction], keyword: str) -> list[str]:
    return [args for found, args in stage if found == keyword]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """`.dockerignore` as (is an exception "!", regex), compiled the way moby/patternmatcher does."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        exception = pattern.startswith("!")
        pattern = posixpath.normpath(pattern.removeprefix("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                i += 3 if pattern.startswith("**/", i) else 2
                regex += ".*" if i >= len(pattern) else "(.*/)?"  # any number of directories
                continue
            char = pattern[i]
            if char == "\\" and i + 1 < len(pattern):
                i += 1
                regex += re.escape(pattern[i])
            else:
                regex += {"*": "[^/]*", "?": "[^/]", "[": "[", "]": "]"}.get(char, re.escape(char))
            i += 1
        rules.append((exception, re.compile(regex)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves out `path`: the last rule matching it or a parent decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for exception, regex in rules:
        if exception == excluded and any(regex.fullmatch(c) for c in candidates):
            excluded = not exception
    return excluded


def build_context(destination: Path) -> None:
    """The build stage's WORKDIR after its COPY lines, taken from the context Docker would send."""
    rules = dockerignore_rules()
    for args in arguments(dockerfile_stages()[0], "COPY"):
        assert "--from" not in args, "a COPY from another stage has no place in the build stage"
        *sources, target = [word for word in shlex.split(args) if not word.startswith("--")]
        for source in sources:
            origin = REPO / source
            files = [origin] if origin.is_file() else sorted(origin.rglob("*"))
            for file in files:
                if not file.is_file() or ignored(file.relative_to(REPO).as_posix(), rules):
                    continue
                inside = file.name if origin.is_file() else file.relative_to(origin)
                copy = destination / target / inside
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, copy)


def repo_package_files() -> set[str]:
    """The files of the three packages in the checkout (what the wheel must carry)."""
    return {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@dataclass(frozen=True)
class Image:
    """A venv installed the way the final stage installs, and a working directory outside the repo."""

    wheel: Path
    venv: Path
    workdir: Path

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a program of the venv's bin/ in `workdir`, with the image's environment plus `env`."""
        return run([str(self.venv / "bin" / args[0]), *args[1:]], self.workdir, **env)


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    # The final stage's ENV.
    base |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json"}
    return subprocess.run(
        command, cwd=cwd, env=base | env, capture_output=True, text=True, timeout=300, check=False
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{shlex.join(result.args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The Dockerfile's steps: wheels from the build context, then an offline install."""
    root = tmp_path_factory.mktemp("image")
    context, wheels, venv = root / "context", root / "wheels", root / "venv"
    build_context(context)
    # Build stage. pip's cache is allowed here (the image build mounts one too).
    pip = [sys.executable, "-m", "pip"]
    succeeded(run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)], root))
    [wheel] = wheels.glob("digivault_conversations-*.whl")
    succeeded(
        run([*pip, "wheel", "--only-binary=:all:", "--wheel-dir", str(wheels), str(wheel)], root)
    )
    # Final stage.
    succeeded(run([sys.executable, "-m", "venv", str(venv)], root))
    venv_pip = [str(venv / "bin" / "python"), "-m", "pip"]
    succeeded(
        run(
            [
                *venv_pip,
                "install",
                "--no-index",
                "--find-links",
                str(wheels),
                "digivault-conversations",
            ],
            root,
        )
    )
    succeeded(run([*venv_pip, "uninstall", "--yes", "setuptools", "wheel"], root))
    succeeded(run([*venv_pip, "check"], root))
    workdir = root / "workdir"
    workdir.mkdir()
    return Image(wheel, venv, workdir)


@pytest.mark.slow
def test_wheel_carries_the_packages_and_migrations_only(image: Image) -> None:
    names = set(zipfile.ZipFile(image.wheel).namelist())
    assert {f"sql/migrations/{name}" for name in MIGRATIONS} <= names
    assert repo_package_files() <= names, "the image would lack some of the service's files"
    [dist_info] = {name.split("/")[0] for name in names} - set(PACKAGES)
    assert re.fullmatch(r"digivault_conversations-[^/]+\.dist-info", dist_info), dist_info
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.slow
def test_installed_command_lists_its_subcommands(image: Image) -> None:
    result = succeeded(image.run("conversations", "--help"))
    for command in ("serve", "migrate", "relay", "openapi"):
        assert command in result.stdout


@pytest.mark.slow
def test_installed_code_is_the_venvs_not_the_checkouts(image: Image) -> None:
    modules = "schemas, service, sql"
    code = f"import json, {modules}; print(json.dumps([m.__file__ for m in ({modules})]))"
    result = succeeded(image.run("python", "-c", code))
    for module_file in json.loads(result.stdout):
        assert Path(module_file).is_relative_to(image.venv), module_file


@pytest.mark.slow
def test_installed_openapi_prints_the_document(image: Image) -> None:
    document = json.loads(succeeded(image.run("conversations", "openapi")).stdout)
    assert document["openapi"].startswith("3.")
    assert "/v1/conversations" in document["paths"]


@pytest.mark.slow
async def test_installed_migrate_applies_every_shipped_migration(
    image: Image, empty_database: str
) -> None:
    result = await asyncio.to_thread(
        image.run,
        "conversations",
        "migrate",
        DATABASE_URL=empty_database,
        AMQP_URL="amqp://user:password@127.0.0.1:1/",
        JWT_HS256_SECRETS="image-test-secret-0123456789-abcdefgh",
    )
    succeeded(result)
    conn = await asyncpg.connect(empty_database)
    try:
        for table in ("conversations", "outbox"):
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == [
        name.removesuffix(".sql") for name in MIGRATIONS
    ]


def test_dockerfile_builds_wheels_in_one_stage_and_installs_them_in_another() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    build, final = stages
    for stage in stages:
        assert arguments(stage, "FROM")[0].split()[0] == BASE_IMAGE
    assert any("pip wheel" in args for args in arguments(build, "RUN"))
    final_runs = " ".join(arguments(final, "RUN"))
    installs = re.findall(r"pip install [^&;]*", final_runs)
    assert installs, "the final stage installs nothing"
    assert all("--no-index" in install for install in installs), "the final stage must not download"
    for tool in ("gcc", "build-essential", "apt-get install", "make "):
        assert tool not in final_runs, f"{tool} in the final stage"
    # The final stage takes nothing from the build context: its only input is the wheels.
    assert not [args for args in arguments(final, "COPY") if "--from" not in args]
    assert not arguments(final, "ADD")


def test_dockerfile_final_stage_runs_the_console_script_as_a_numeric_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    [user] = arguments(final, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "numeric uid:gid, so runAsNonRoot can check it"
    env = dict(word.split("=", 1) for args in arguments(final, "ENV") for word in shlex.split(args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOST"] == "0.0.0.0"  # noqa: S104  # listening on all interfaces is the point
    assert env["PORT"] in arguments(final, "EXPOSE")[0].split()
    assert json.loads(arguments(final, "ENTRYPOINT")[-1]) == ["conversations"]
    assert json.loads(arguments(final, "CMD")[-1]) == ["serve"]


def test_dockerignore_sends_the_package_sources_and_nothing_else() -> None:
    rules = dockerignore_rules()
    for path in ["pyproject.toml", "README.md", *sorted(repo_package_files())]:
        assert not ignored(path, rules), path
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        ".dev/jwt-secret",
        ".pytest_cache/README.md",
        "tests/conftest.py",
        "docs/openapi.json",
        "tools/asyncapi/node_modules/ajv/package.json",
        "deploy/k8s/deployment.yaml",
        "deploy/Dockerfile",
        "build/lib/service/api/app.py",
        "digivault_conversations.egg-info/PKG-INFO",
        "service/api/__pycache__/app.cpython-311.pyc",
        "sql/migrations/__pycache__/x.pyc",
    ]:
        assert ignored(path, rules), path
