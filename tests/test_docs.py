"""The operator-facing docs list every configuration variable the service reads."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SETTINGS = (ROOT / "service" / "settings.py").read_text()
VARIABLES = sorted(set(re.findall(r'env\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', SETTINGS)))


def test_the_settings_read_variables():
    assert "DATABASE_URL" in VARIABLES
    assert "AMQP_URL" in VARIABLES
    assert len(VARIABLES) >= 20


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_every_variable_is_in_the_configuration_table(doc):
    text = (ROOT / doc).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {
        name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])
    }
    missing = [name for name in VARIABLES if name not in documented]
    assert not missing, f"{doc} lacks configuration rows for {missing}"
