"""The route table: each operation described once, beside its handler; the router (`app.py`)
and the OpenAPI document's paths (`openapi.py`) are both built from it.

A module declares its operations with a `RouteTable`, as aiohttp's own `RouteTableDef` does:

    routes = RouteTable()

    @routes.operation("GET", "/v1/conversations/{id}", summary="Retrieve a conversation", ...)
    async def retrieve_conversation(request: web.Request) -> web.Response: ...

What an operation can answer besides its own answers and errors follows from its traits, by
the rules in `openapi.py`: under `API_PREFIX` it is served by the authenticated sub-application
(401, 403, 429, 503); a write takes an Idempotency-Key; a body can be too large or of another
type; `if_match` can fail (412).
"""

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from marshmallow import Schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The API's operations live under this prefix, in a sub-application of their own whose
# middlewares authenticate, limit and check scopes; everything else (probes, metrics, the
# document) is served by the root application without a token.
API_PREFIX = "/v1"

# A path variable with its own pattern, as aiohttp spells it: {id:(?!changes$)[^/]+}.
_PATTERNED_VARIABLE = re.compile(r"\{(\w+):[^{}]*\}")


@dataclass(frozen=True)
class Answer:
    """A success answer as the document describes it."""

    description: str
    # The body: a marshmallow schema (a component of the document), or a JSON schema.
    schema: type[Schema] | dict[str, Any]
    headers: tuple[str, ...] = ()  # component headers of the document: "ETag", "Location"
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    """One method on one path: its handler and what the document says of it."""

    method: str
    path: str  # as the router takes it, from the root: a variable may carry its own pattern
    handler: Handler
    summary: str
    answers: Mapping[int, Answer]
    operation_id: str | None = None
    description: str | None = None
    query: type[Schema] | None = None
    body: type[Schema] | None = None
    if_match: bool = False  # takes If-Match, so may answer 412
    # Its own refusals, status: a sentence; those its traits imply are added by the rules.
    errors: Mapping[int, str] = field(default_factory=dict)
    name: str | None = None  # the route's name, for `url_for`

    @property
    def template(self) -> str:
        """The path as the document and the route's canonical form spell it: `/v1/x/{id}`."""
        return _PATTERNED_VARIABLE.sub(r"{\1}", self.path)

    @property
    def authenticated(self) -> bool:
        """Served by the API's sub-application: a token, a budget and a scope are needed."""
        return self.path.startswith(API_PREFIX + "/")


class RouteTable:
    """A module's operations, declared with the `operation` decorator, in declaration order."""

    def __init__(self) -> None:
        self._operations: list[Operation] = []

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._operations)

    def operation(
        self, method: str, path: str, *, summary: str, answers: Mapping[int, Answer], **traits: Any
    ) -> Callable[[Handler], Handler]:
        """Declare `method` on `path` as the decorated handler (returned unchanged)."""

        def register(handler: Handler) -> Handler:
            self._operations.append(
                Operation(method, path, handler, summary=summary, answers=answers, **traits)
            )
            return handler

        return register


def add_routes(
    router: web.UrlDispatcher, operations: Iterable[Operation], prefix: str = ""
) -> None:
    """Route `operations` on `router`, their paths less `prefix` (a sub-application's, which
    aiohttp adds back when it is mounted). One resource per path, so that a method it lacks is
    a 405 listing the ones it has; a GET also answers HEAD, as aiohttp's `add_get` does."""
    resources: dict[str, web.Resource] = {}
    for operation in operations:
        assert operation.path.startswith(prefix + "/"), (operation.path, prefix)
        path = operation.path.removeprefix(prefix)
        resource = resources.get(path)
        if resource is None:
            resource = resources[path] = router.add_resource(path, name=operation.name)
        assert operation.name in (None, resource.name), f"{path} has two names"
        if operation.method == "GET":
            resource.add_route("HEAD", operation.handler)
        resource.add_route(operation.method, operation.handler)
