"""A bounded fuzz run over the OpenAPI document on every `make test`: schemathesis sends valid and
invalid requests to each operation, then chains them along the links it infers (create, then
read, update and delete what was created), and applies every check it has (no 5xx, answers as
documented, invalid input refused, valid input accepted, authentication enforced...).

Seeded and bounded, so that a run is repeatable and takes seconds; a defect of the kind a long
fuzzing session finds should show up here first."""

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings

from service.api.app import create_app
from service.api.auth import mint_token
from service.api.openapi import build_openapi
from service.api.server import ServiceRunner
from tests.conftest import (
    ALL_SCOPES,
    _admin,
    database_url,
    make_auth_settings,
    make_settings,
)
from tests.proxy import free_port

SEED = 20261130
EXAMPLES = 15  # per operation; the whole file runs in well under a minute


@pytest.fixture(scope="module")
def fuzzed_server(template_database: str) -> Iterator[str]:
    """The service on a loopback port, in a thread with its own event loop (schemathesis calls it
    synchronously), over a database of its own."""
    name = f"conversations_fuzz_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    port = free_port()
    runner = ServiceRunner(create_app(make_settings(database_url(name), make_auth_settings())))

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=60)
    loop.close()
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


schema = schemathesis.openapi.from_dict(
    build_openapi(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True},
            "operations": [
                {
                    # Both cursors at once is a documented 400, a rule OpenAPI 3.0 cannot
                    # express between two query parameters; and a cursor is opaque: a string
                    # that the service did not issue (or issued for the other order) is a
                    # documented 422, which no schema of a string can tell apart.
                    "include-name": "GET /v1/conversations",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "400", "401", "403", "404", "422", "429"]
                        }
                    },
                },
                {
                    # The sync token is opaque too: one the service did not issue is a 422.
                    "include-name": "GET /v1/conversations/changes",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "403", "410", "422", "429"]
                        }
                    },
                },
                {
                    # Metadata keys are 1 to 40 characters of [A-Za-z0-9_.:-] and values hold no
                    # NUL: OpenAPI 3.0 has no `propertyNames` to say so (the document says it in
                    # words), so a body the schema allows may be a documented 422.
                    "include-name": "POST /v1/conversations",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "403", "409", "422", "429"]
                        }
                    },
                },
                {
                    # An If-Match naming another version is a documented 412, whatever it holds;
                    # metadata keys as above.
                    "include-path": "/v1/conversations/{id}",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "403", "404", "412", "422", "429"]
                        }
                    },
                },
            ],
        }
    ),
)


def new_account() -> str:
    return f"acct_fuzz_{uuid.uuid4().hex[:10]}"


class Fuzzing:
    """The account the requests act for: each stateful scenario starts with an empty one, so
    that what an earlier scenario created cannot change what a replay of this one sees."""

    account = new_account()


@schema.auth(refresh_interval=None)
class Bearer:
    """The fuzzing account's token, applied the way the security scheme says, so that the
    authentication checks can also try the operations without it or with a broken one."""

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return mint_token(make_auth_settings(), Fuzzing.account, ALL_SCOPES, 3600)

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation(case: schemathesis.Case, fuzzed_server: str) -> None:
    case.call_and_validate(base_url=fuzzed_server)


def test_operations_chained_along_their_links(fuzzed_server: str) -> None:
    class Chains(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            Fuzzing.account = new_account()

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, str]:
            return {"base_url": fuzzed_server}

    Chains.run(
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )
