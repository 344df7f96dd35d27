"""Serving the app: aiohttp's connection protocol with the contract's error body, and the run loop.

aiohttp answers a request its HTTP parser refuses (a bad request line, an oversized or invalid
header, a bad chunk, Transfer-Encoding with Content-Length...) before any middleware runs, in
plain text that repeats the offending line, a bearer token included. `ContractRequestHandler`
answers those with the contract's JSON body instead, echoing nothing of the request; aiohttp has
no public hook for it (aio-libs/aiohttp#3287), so the runner builds its server with this
protocol class.
"""

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from service.api.keys import MALFORMED_BODY, REQUEST_ID, SETTINGS
from service.api.middleware import new_request_id, render_error
from service.errors import ApiError
from service.logs import AccessLogger, describe_exception

log = logging.getLogger(__name__)

# Header limits, sized for real bearer tokens: a JWT with many claims, or an RS256 one with an
# embedded chain, passes aiohttp's 8 KiB default. docs/architecture.md explains the numbers.
MAX_LINE_SIZE = 8 * 1024  # the request line: method, path and query string
MAX_FIELD_SIZE = 32 * 1024  # one header line, name and value
MAX_HEADERS = 128  # header lines per request

PARSER_REFUSED = "The request is not valid HTTP/1.1; nothing was done."
TOO_LONG = (
    f"A header is longer than {MAX_FIELD_SIZE} bytes, or the request line longer than "
    f"{MAX_LINE_SIZE}; nothing was done."
)


class ContractRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol, but what it refuses gets the contract's error body."""

    def __init__(self, manager: web.Server, *, error_docs_url: str, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.error_docs_url = error_docs_url

    def data_received(self, data: bytes) -> None:
        """Parse `data`; if the parser fails inside the body of the request being handled (a bad
        chunk), that body ends there, marked malformed, and the connection closes after the
        answer. aiohttp would leave the handler waiting for the rest of a body that never comes.
        """
        reading = self._current_request
        queued = len(self._messages)
        super().data_received(data)
        if reading is not None and len(self._messages) > queued and not reading.content.is_eof():
            # While a body is incomplete the parser queues nothing but its own failure.
            reading[MALFORMED_BODY] = True
            reading.content.feed_eof()
            self.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The error body for a request the parser refused (400) or that escaped the app (5xx).

        Never the parser's message: it quotes the raw line, which may hold a token.
        """
        if request.writer.output_size > 0:  # an answer has begun: only closing is left
            raise ConnectionError("the response was already started")
        request_id = request.get(REQUEST_ID) or new_request_id()
        if status < 500:
            # The access log records the 400; the exception type is enough for a closer look.
            log.debug("HTTP parser refused a request: %s", type(exc).__name__)
            error = ApiError(status, TOO_LONG if isinstance(exc, LineTooLong) else PARSER_REFUSED)
        else:
            log.error(
                "unexpected error outside the app: %s",
                describe_exception(exc),
                extra={"request_id": request_id},
            )
            error = ApiError(status, "An unexpected error occurred.")
        response = render_error(error, request_id, self.error_docs_url)
        response.headers["X-Request-ID"] = request_id
        response.force_close()  # the parser's state is unknown: this connection is done
        return response


class ContractServer(web.Server):
    """aiohttp's server for an app, making `ContractRequestHandler` connections."""

    def __init__(self, server: web.Server, error_docs_url: str) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        self.error_docs_url = error_docs_url

    def __call__(self) -> web.RequestHandler:
        return ContractRequestHandler(
            self, loop=self._loop, error_docs_url=self.error_docs_url, **self._kwargs
        )


class ServiceRunner(web.AppRunner):
    """`web.AppRunner` with the service's header limits, access log and error bodies."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(
            app,
            access_log_class=AccessLogger,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            **kwargs,
        )

    async def _make_server(self) -> web.Server:
        return ContractServer(await super()._make_server(), self.app[SETTINGS].error_docs_url)


async def _serve(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float, reuse_port: bool
) -> None:
    runner = ServiceRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        log.info("serving on http://%s:%d", host, port)
        await asyncio.Event().wait()  # until SIGTERM or SIGINT raises GracefulExit
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    loop: asyncio.AbstractEventLoop,
    reuse_port: bool = False,
) -> None:
    """Serve `app` on `loop` until SIGTERM or SIGINT, then shut down gracefully.

    What `web.run_app` does, with `ServiceRunner`: on the signal the listener closes, in-flight
    requests get `shutdown_timeout` seconds, the app's cleanup runs, leftover tasks are cancelled.
    """
    asyncio.set_event_loop(loop)
    main = loop.create_task(
        _serve(app, host, port, shutdown_timeout=shutdown_timeout, reuse_port=reuse_port)
    )
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
