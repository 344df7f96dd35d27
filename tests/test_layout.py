"""The layout's import rules (docs/architecture.md), checked on the import graph of every module.

Imports run one way: `service.cli` -> `service.api` -> `service.conversations` and
`service.events` -> the shared root modules and `schemas`. Every import counts, also one inside
a function or under `if TYPE_CHECKING:`: a reader follows those too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service.api", "service.conversations", "service.events")

# What each part may not import (a prefix matches the module and everything below it).
FORBIDDEN = {
    "service.api": ("service.cli",),
    "service.conversations": ("service.cli", "service.api", "service.events"),
    "service.events": ("service.cli", "service.api", "service.conversations"),
    "service": ("service.cli", *PACKAGES),  # the shared root modules, cli excepted
    "schemas": ("service",),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """The part of the layout a module belongs to, by the rules' keys."""
    if module == "service.cli":
        return None  # the top: may import anything
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return module.split(".")[0]


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an import statement of the file names, relative imports resolved."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from service import api` imports the module service.api.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """The forbidden imports of the file at `path`, a module of the tree at `root`."""
    module = module_name(path, root)
    part = part_of(module)
    if part is None:
        return []
    return sorted(
        f"{module} imports {name}"
        for name in imported_modules(path, module)
        for banned in FORBIDDEN[part]
        if name == banned or name.startswith(banned + ".")
    )


def source_files() -> list[Path]:
    return sorted(
        [*ROOT.joinpath("service").rglob("*.py"), *ROOT.joinpath("schemas").rglob("*.py")]
    )


def test_every_module_follows_the_import_rules():
    files = source_files()
    assert len(files) > 20  # the walk found the tree
    assert [v for path in files for v in violations(path)] == []


@pytest.mark.parametrize(
    ("where", "line", "expected"),
    [
        (
            "service/events/relay.py",
            "from service.conversations import repository",
            "service.conversations",
        ),
        ("service/events/relay.py", "import service.api.handlers", "service.api.handlers"),
        (
            "service/conversations/operations.py",
            "from service.events.broker import Broker",
            "service.events.broker",
        ),
        ("service/conversations/operations.py", "from service import api", "service.api"),
        ("service/settings.py", "from service.api.auth import mint_token", "service.api.auth"),
        ("service/metrics.py", "from service.events import runtime", "service.events"),
        ("schemas/conversation.py", "from service.settings import Settings", "service.settings"),
        ("service/api/handlers.py", "from service.cli import main", "service.cli"),
        ("service/conversations/ids.py", "from ..api import keys", "service.api"),
    ],
)
def test_a_forbidden_import_added_by_hand_is_caught(tmp_path, where, line, expected):
    original = ROOT / where
    copy = tmp_path.joinpath(where)
    copy.parent.mkdir(parents=True)
    # Inside a function: imports there count as well.
    copy.write_text(original.read_text() + f"\n\ndef _added():\n    {line}\n")
    found = violations(copy, tmp_path)
    assert any(expected in v for v in found), found


def test_the_allowed_direction_is_not_flagged(tmp_path):
    copy = tmp_path / "service" / "api" / "handlers.py"
    copy.parent.mkdir(parents=True)
    copy.write_text(
        "from service.conversations import operations\nfrom service.events import runtime\n"
        "from service.settings import Settings\nfrom schemas import ErrorSchema\n"
    )
    assert violations(copy, tmp_path) == []
