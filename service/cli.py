"""The `conversations` command: serve, relay, migrate, token, events tail, openapi, asyncapi."""

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import Literal

import asyncpg

from service.logs import configure_logging
from service.settings import (
    ConfigError,
    Settings,
    load_auth_settings,
    load_event_settings,
    load_migrate_settings,
    load_settings,
)

DEV_SCOPES = ["conversations:read", "conversations:write"]


def _run(role: Literal["api", "relay"]) -> int:
    """Serve the app of `role` until SIGTERM/SIGINT, then shut down gracefully (exit 0)."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if role == "api" and settings.workers > 1:
        return _run_workers(settings)
    return _run_one(settings, role)


def _run_workers(settings: Settings) -> int:
    """WORKERS processes sharing the port (SO_REUSEPORT): one event loop per core.

    The parent only forwards SIGTERM/SIGINT and waits; if a worker dies, the others are
    stopped too and its exit code is returned, so the supervisor (systemd, Kubernetes) restarts
    the whole set.
    """
    children = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # a worker: signals back to their defaults, then serve
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os._exit(_run_one(settings, "api", reuse_port=True))
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    remaining = set(children)
    while remaining:
        pid, wait_status = os.wait()
        remaining.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 1
            forward(signal.SIGTERM, None)
    return status


def _run_one(settings: Settings, role: Literal["api", "relay"], *, reuse_port: bool = False) -> int:
    import uvloop

    from service.api.app import create_app
    from service.api.server import run

    run(
        create_app(settings, role=role),
        host=settings.host,
        port=settings.port if role == "api" else settings.relay_http_port,
        # In-flight requests get this long to finish after SIGTERM; then connections close.
        shutdown_timeout=settings.shutdown_timeout_seconds,
        loop=uvloop.new_event_loop(),
        reuse_port=reuse_port,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    return _run("api")


def _migrate(args: argparse.Namespace) -> int:
    from service.migrations import MigrationError, migrate

    settings = load_migrate_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> list[str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    try:
        applied = asyncio.run(run())
    except MigrationError as error:
        print(f"conversations migrate: {error}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def _relay(args: argparse.Namespace) -> int:
    return _run("relay")


def _events_tail(args: argparse.Namespace) -> int:
    from service.events.tail import tail

    events = load_event_settings()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a tail ends
        asyncio.run(tail(events.amqp_url, events.exchange, args.type, count=args.count))
    return 0


def _token(args: argparse.Namespace) -> int:
    from service.api.auth import mint_token

    auth = load_auth_settings()
    scopes = args.scope.split() if args.scope else DEV_SCOPES
    print(mint_token(auth, args.account, scopes, args.ttl))
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from service.api.openapi import render_openapi

    sys.stdout.buffer.write(render_openapi())
    return 0


def _asyncapi(args: argparse.Namespace) -> int:
    from service.events.asyncapi import render_asyncapi

    sys.stdout.buffer.write(render_asyncapi())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line, one subcommand per process or tool."""
    parser = argparse.ArgumentParser(
        prog="conversations", description="DigiVault Conversations service."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the HTTP API").set_defaults(run=_serve)
    commands.add_parser("migrate", help="apply pending database migrations").set_defaults(
        run=_migrate
    )
    commands.add_parser(
        "relay", help="publish the outbox's events to RabbitMQ (replicas share the partitions)"
    ).set_defaults(run=_relay)
    events = commands.add_parser("events", help="look at the published events")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    tail = events_commands.add_parser("tail", help="print events as they arrive, one per line")
    tail.add_argument(
        "--type",
        action="append",
        default=[],
        help="an event type or routing pattern, e.g. conversation.archived (repeatable; default: all)",
    )
    tail.add_argument("--count", type=int, help="stop after this many events")
    tail.set_defaults(run=_events_tail)
    token = commands.add_parser("token", help="print a development bearer token")
    token.add_argument("--account", required=True, help="the account id (the token's sub)")
    token.add_argument(
        "--scope", help='space-separated scopes (default: "conversations:read conversations:write")'
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(run=_token)
    commands.add_parser("openapi", help="print the OpenAPI document").set_defaults(run=_openapi)
    commands.add_parser("asyncapi", help="print the AsyncAPI document").set_defaults(run=_asyncapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"conversations {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
