"""The AsyncAPI document: generated from the event schemas, complete, committed unchanged, and
valid for the official AsyncAPI parser (@asyncapi/parser, run with Node)."""

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.event import EVENT_TYPES, EventSchema
from service.events.asyncapi import build_asyncapi, render_asyncapi

ROOT = Path(__file__).parent.parent
COMMITTED = ROOT / "docs" / "asyncapi.json"
EVENTS_GUIDE = ROOT / "docs" / "events.md"
TOOLS = ROOT / "tools" / "asyncapi"
VALIDATOR = TOOLS / "validate.mjs"
INSTALLED = TOOLS / "node_modules" / ".installed"


def test_the_committed_copy_matches_the_schemas():
    assert COMMITTED.read_bytes() == render_asyncapi(), (
        "docs/asyncapi.json is stale: run `.venv/bin/conversations asyncapi > docs/asyncapi.json`"
    )


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_has_a_channel_a_message_and_a_send_operation(event_type):
    doc = build_asyncapi()
    [(channel_key, channel)] = [
        (key, channel)
        for key, channel in doc["channels"].items()
        if channel["address"] == event_type
    ]
    [message_ref] = channel["messages"].values()
    message = doc["components"]["messages"][message_ref["$ref"].rsplit("/", 1)[-1]]
    [operation] = [
        operation
        for operation in doc["operations"].values()
        if operation["channel"] == {"$ref": f"#/channels/{channel_key}"}
    ]
    assert channel["bindings"]["amqp"]["exchange"]["name"] == "conversations"
    assert message["bindings"]["amqp"]["messageType"] == event_type
    assert message["payload"]["allOf"][0] == {"$ref": "#/components/schemas/Event"}
    assert operation["action"] == "send"


def test_the_payload_schema_is_the_event_schema():
    schemas = build_asyncapi()["components"]["schemas"]
    assert set(schemas["Event"]["properties"]) == {
        "id",
        "type",
        "created_at",
        "account_id",
        "sequence",
        "data",
    }
    assert schemas["Conversation"]["properties"]["archived_at"]["type"] == ["integer", "null"]


def test_the_subscriber_guide_shows_one_valid_event_of_each_type():
    examples = re.findall(
        r"^### `([a-z.]+)`\n.*?```json\n(.*?)```", EVENTS_GUIDE.read_text(), re.M | re.S
    )
    events = {heading: EventSchema().load(orjson.loads(body)) for heading, body in examples}
    assert sorted(events) == sorted(EVENT_TYPES)
    assert all(event["type"] == heading for heading, event in events.items())
    with_previous = {
        heading for heading, event in events.items() if "previous_attributes" in event["data"]
    }
    assert with_previous == {"conversation.updated", "conversation.archived"}


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    """Run tools/asyncapi/validate.mjs on `path`. A missing Node or parser fails the test rather
    than skipping it: nothing else proves the document valid."""
    node = shutil.which("node")
    if node is None or not INSTALLED.exists():
        pytest.fail(
            "the AsyncAPI validator is not installed (needs node and tools/asyncapi/node_modules): "
            "run `make test`, or `make tools/asyncapi/node_modules/.installed` for it alone"
        )
    return subprocess.run(
        [node, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120, check=False
    )


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if ": error " in line]


def test_the_committed_document_is_valid_asyncapi():
    result = _validate(COMMITTED)
    assert (result.returncode, _error_lines(result)) == (0, []), result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"{COMMITTED}: valid")


def _without_info_version(doc: dict[str, Any]) -> None:
    del doc["info"]["version"]


def _operation_sends_another_channels_message(doc: dict[str, Any]) -> None:
    first, second = list(doc["operations"].values())[:2]
    first["messages"] = second["messages"]


@pytest.mark.parametrize(
    ("breakage", "reported_at"),
    [
        (_without_info_version, "at info:"),
        (_operation_sends_another_channels_message, "at operations.sendConversationCreated"),
    ],
)
def test_the_validator_rejects_a_broken_document(tmp_path, breakage, reported_at):
    doc = orjson.loads(COMMITTED.read_bytes())
    breakage(doc)
    broken = tmp_path / "asyncapi.json"
    broken.write_bytes(orjson.dumps(doc))
    result = _validate(broken)
    assert result.returncode == 1
    assert any(reported_at in line for line in _error_lines(result)), result.stdout
