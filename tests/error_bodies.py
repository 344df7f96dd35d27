"""The contract's error body, checked the same way by every test module that expects one."""

from aiohttp import ClientResponse

# What every error body carries; `errors` and `param` only where they apply.
ERROR_KEYS = {"type", "message", "request_id", "documentation_url"}
# The `error_docs_url` of conftest's `settings`.
ERROR_DOCS_URL = "https://docs.example.test/errors"


async def error_body(
    resp: ClientResponse,
    status: int,
    error_type: str,
    *,
    param: str | None = None,
    errors: bool | None = None,
) -> dict:
    """The body of an error response, after checking it has exactly the contract's keys.

    `param`: the expected `param` (None: the body must have none). `errors`: whether the body has
    `errors` (default: it does exactly when it is a 422). A 429 also has `retry_after`.
    """
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json"
    body = await resp.json()
    with_errors = status == 422 if errors is None else errors
    expected = ERROR_KEYS | ({"param"} if param is not None else set())
    expected |= {"errors"} if with_errors else set()
    expected |= {"retry_after"} if status == 429 else set()
    assert set(body) == expected, body
    assert body["type"] == error_type
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["request_id"]
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert body["documentation_url"] == f"{ERROR_DOCS_URL}#{error_type}"
    if param is not None:
        assert body["param"] == param
    if with_errors:
        assert isinstance(body["errors"], dict)
        assert body["errors"]
        if param is not None:
            assert param in body["errors"]
    for leak in ("Traceback", 'File "', "asyncpg", "SELECT ", "INSERT ", "UPDATE "):
        assert leak not in text
    return body
