"""Configuration: environment variables only, parsed and validated once at start-up."""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from environs import Env, EnvValidationError
from marshmallow import validate

# HS256 secrets shorter than this are guessable by brute force (RFC 7518 §3.2 asks for >= 256 bits).
MIN_SECRET_LENGTH = 32


class ConfigError(Exception):
    """The environment does not describe a runnable service; the message says what to fix."""


def invalid_configuration(problems: Mapping[str, str]) -> ConfigError:
    """The one shape of a configuration error: a line per variable (or `A / B` for a choice
    between several) with what is wrong with it."""
    lines = [f"  {variable}: {reason}" for variable, reason in problems.items()]
    return ConfigError("invalid configuration:\n" + "\n".join(lines))


# The scopes a token may be granted without carrying them (JWT_DEFAULT_SCOPES).
KNOWN_SCOPES = ("conversations:read", "conversations:write")


@dataclass(frozen=True)
class AuthSettings:
    """How bearer tokens are verified (and, for development, minted)."""

    hs256_secrets: tuple[str, ...]
    public_keys_pem: tuple[str, ...]
    audience: str | None
    issuer: str | None
    leeway_seconds: int
    # Keys published by an identity provider (service/api/jwks.py).
    jwks_urls: tuple[str, ...] = ()
    oidc_discovery: bool = False  # find the JWKS through the issuer's openid-configuration
    jwks_ttl_seconds: float = 300.0
    jwks_cooldown_seconds: float = 30.0  # at most one fetch this often, whatever asks for it
    jwks_ca_file: str | None = None  # CA bundle for the provider's TLS (a cluster's own CA)
    account_claim: str = "sub"  # the claim that names the account
    default_scopes: tuple[str, ...] = ()  # granted to a token without a `scope` claim

    @property
    def uses_jwks(self) -> bool:
        """Whether keys come from an identity provider."""
        return bool(self.jwks_urls) or self.oidc_discovery


@dataclass(frozen=True)
class EventSettings:
    """Where events go and how the outbox relay drains them."""

    amqp_url: str
    exchange: str
    relay_enabled: bool
    relay_batch_size: int
    relay_poll_interval_seconds: float
    outbox_retention_hours: float
    relay_linger_seconds: float  # how long a read started by a NOTIFY waits (relay.py)


@dataclass(frozen=True)
class RateLimitSettings:
    """Per-account request budgets over a sliding window, and where they are counted."""

    reads: int  # per window; 0 turns the read budget off
    writes: int  # per window; 0 turns the write budget off
    window_seconds: int
    redis_url: str | None  # None: each process counts on its own


# OTEL_TRACES_SAMPLER values the service accepts (the OpenTelemetry spec's built-in samplers).
TRACE_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry tracing, from the standard OTEL_* variables; off unless an endpoint is set."""

    endpoint: str | None = None  # where spans go (OTLP over HTTP/protobuf); None: tracing off
    service_name: str = "conversations"
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0  # OTEL_TRACES_SAMPLER_ARG, for the traceidratio samplers

    @property
    def enabled(self) -> bool:
        """Whether the process exports spans at all."""
        return self.endpoint is not None


@dataclass(frozen=True)
class Settings:
    """Everything the service's processes need."""

    database_url: str
    host: str
    port: int
    db_pool_min: int
    db_pool_max: int
    db_statement_timeout_ms: int
    error_docs_url: str
    log_level: str
    log_format: str
    shutdown_timeout_seconds: float
    workers: int
    relay_http_port: int
    metrics_token: str | None
    sync_retention_days: int
    auth: AuthSettings
    events: EventSettings
    rate_limits: RateLimitSettings
    # How long a keyed write's answer is replayed (the contract's IDEMPOTENCY_TTL_HOURS).
    idempotency_ttl_hours: int = 24
    tracing: TracingSettings = TracingSettings()

    @property
    def sync_retention_seconds(self) -> int:
        """How long deletions are remembered for delta sync."""
        return self.sync_retention_days * 86_400


def _split_pem_blocks(text: str) -> tuple[str, ...]:
    """Several PEM public keys in one variable, one after the other (for key rotation)."""
    end = "-----END PUBLIC KEY-----"
    blocks = [block.strip() + "\n" + end for block in text.split(end) if block.strip()]
    return tuple(blocks)


def parse_public_key(pem: str) -> tuple[str, rsa.RSAPublicKey | ec.EllipticCurvePublicKey]:
    """The JWT algorithm a PEM public key verifies, and the key: RSA is RS256, EC P-256 ES256."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise invalid_configuration(
            {"JWT_PUBLIC_KEYS": "a key is not a readable PEM public key"}
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return "ES256", key
    raise invalid_configuration(
        {"JWT_PUBLIC_KEYS": "only RSA and EC P-256 public keys are accepted"}
    )


def _seal(env: Env) -> None:
    """Raise one ConfigError naming every invalid variable."""
    try:
        env.seal()
    except EnvValidationError as error:
        raise invalid_configuration(
            {name: "; ".join(messages) for name, messages in error.error_messages.items()}
        ) from None


def _auth_settings(env: Env) -> AuthSettings:
    secrets = env.list("JWT_HS256_SECRETS", [], subcast=str)
    public_keys = env.str("JWT_PUBLIC_KEYS", "")
    return AuthSettings(
        hs256_secrets=tuple(secret.strip() for secret in secrets if secret.strip()),
        public_keys_pem=_split_pem_blocks(public_keys),
        audience=env.str("JWT_AUDIENCE", None) or None,
        issuer=env.str("JWT_ISSUER", None) or None,
        leeway_seconds=env.int("JWT_LEEWAY_SECONDS", 30, validate=validate.Range(0, 300)),
        jwks_urls=tuple(url.strip() for url in env.list("JWT_JWKS_URL", []) if url.strip()),
        oidc_discovery=env.bool("JWT_OIDC_DISCOVERY", False),
        jwks_ttl_seconds=env.float(
            "JWT_JWKS_TTL_SECONDS", 300.0, validate=validate.Range(10, 86_400)
        ),
        jwks_cooldown_seconds=env.float(
            "JWT_JWKS_COOLDOWN_SECONDS", 30.0, validate=validate.Range(1, 3600)
        ),
        jwks_ca_file=env.str("JWT_JWKS_CA_FILE", None) or None,
        account_claim=env.str(
            "JWT_ACCOUNT_CLAIM", "sub", validate=validate.Regexp(r"^[A-Za-z0-9_.:/-]{1,100}$")
        ),
        # `or ()`: an invalid value reads as None until seal() reports it.
        default_scopes=tuple(
            env.list(
                "JWT_DEFAULT_SCOPES",
                [],
                delimiter=" ",
                validate=validate.ContainsOnly(KNOWN_SCOPES),
            )
            or ()
        ),
    )


def _http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("https", "http") and bool(parts.hostname)


def _check_auth(auth: AuthSettings) -> None:
    if not (auth.hs256_secrets or auth.public_keys_pem or auth.uses_jwks):
        raise invalid_configuration(
            {
                "JWT_HS256_SECRETS / JWT_PUBLIC_KEYS / JWT_JWKS_URL / JWT_OIDC_DISCOVERY": (
                    "set at least one, or no token could ever be verified"
                )
            }
        )
    for pem in auth.public_keys_pem:
        parse_public_key(pem)
    short = [i for i, secret in enumerate(auth.hs256_secrets) if len(secret) < MIN_SECRET_LENGTH]
    if short:
        raise invalid_configuration(
            {
                "JWT_HS256_SECRETS": f"every secret needs at least {MIN_SECRET_LENGTH} characters "
                f"(secret number {short[0] + 1} is shorter)"
            }
        )
    if not all(map(_http_url, auth.jwks_urls)):
        raise invalid_configuration({"JWT_JWKS_URL": "every URL must be http(s)://host/..."})
    if auth.jwks_ca_file and not os.path.isfile(auth.jwks_ca_file):
        raise invalid_configuration({"JWT_JWKS_CA_FILE": "no such file"})
    if auth.oidc_discovery and not (auth.issuer and _http_url(auth.issuer)):
        raise invalid_configuration(
            {"JWT_ISSUER": "JWT_OIDC_DISCOVERY needs the issuer's http(s) URL here"}
        )


def _check_audience(auth: AuthSettings) -> None:
    """A provider's public keys sign tokens for many services: only the audience tells ours."""
    if (auth.public_keys_pem or auth.uses_jwks) and not auth.audience:
        raise invalid_configuration(
            {
                "JWT_AUDIENCE": "required when tokens are verified with public keys "
                "(JWT_PUBLIC_KEYS, JWT_JWKS_URL or JWT_OIDC_DISCOVERY)"
            }
        )


def load_auth_settings() -> AuthSettings:
    """Only the token settings: what `conversations token` needs."""
    env = Env(eager=False)  # eager=False: report every bad variable at once, at seal()
    auth = _auth_settings(env)
    _seal(env)
    _check_auth(auth)
    return auth


@dataclass(frozen=True)
class MigrateSettings:
    """What `conversations migrate` needs: the database, and how to log. No secrets beyond it."""

    database_url: str
    log_level: str
    log_format: str


def _database_url(env: Env) -> str:
    return env.str("DATABASE_URL", validate=validate.Regexp(r"^postgres(ql)?://"))


def _log_level(env: Env) -> str:
    return env.str(
        "LOG_LEVEL", "INFO", validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])
    )


def _log_format(env: Env) -> str:
    return env.str("LOG_FORMAT", "json", validate=validate.OneOf(["json", "console"]))


def _event_settings(env: Env) -> EventSettings:
    return EventSettings(
        amqp_url=env.str("AMQP_URL", validate=validate.Regexp(r"^amqps?://")),
        exchange=env.str("EVENTS_EXCHANGE", "conversations", validate=validate.Length(1, 200)),
        relay_enabled=env.bool("RELAY_ENABLED", True),
        relay_batch_size=env.int("RELAY_BATCH_SIZE", 500, validate=validate.Range(1, 10_000)),
        relay_poll_interval_seconds=env.float(
            "RELAY_POLL_INTERVAL_SECONDS", 1.0, validate=validate.Range(0.05, 60)
        ),
        outbox_retention_hours=env.float(
            "OUTBOX_RETENTION_HOURS", 72.0, validate=validate.Range(0, 24 * 365)
        ),
        relay_linger_seconds=env.float(
            "RELAY_LINGER_SECONDS", 0.003, validate=validate.Range(0, 1)
        ),
    )


def _rate_limit_settings(env: Env) -> RateLimitSettings:
    budget = validate.Range(0, 1_000_000_000)
    return RateLimitSettings(
        reads=env.int("RATE_LIMIT_READS", 6000, validate=budget),
        writes=env.int("RATE_LIMIT_WRITES", 1200, validate=budget),
        window_seconds=env.int("RATE_LIMIT_WINDOW_SECONDS", 60, validate=validate.Range(1, 86_400)),
        # Empty counts as unset, so that an optional Secret key may be left blank.
        redis_url=env.str(
            "RATE_LIMIT_REDIS_URL", "", validate=validate.Regexp(r"^(rediss?://.+)?$")
        )
        or None,
    )


_OTLP_URL = validate.URL(schemes={"http", "https"}, require_tld=False)


def _tracing_settings(env: Env) -> TracingSettings:
    """The OTEL_* variables the SDK would read, validated here so that a bad one stops start-up.

    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the URL spans are posted to as it is;
    OTEL_EXPORTER_OTLP_ENDPOINT is a base URL that `v1/traces` is appended to (the spec's rule).
    """
    traces_endpoint = env.str(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", validate=_optional(_OTLP_URL)
    )
    base_endpoint = env.str("OTEL_EXPORTER_OTLP_ENDPOINT", "", validate=_optional(_OTLP_URL))
    protocol = validate.OneOf(["http/protobuf"], error="only http/protobuf is supported")
    env.str("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", validate=protocol)
    env.str("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf", validate=protocol)
    exporter = env.str("OTEL_TRACES_EXPORTER", "otlp", validate=validate.OneOf(["otlp", "none"]))
    disabled = env.bool("OTEL_SDK_DISABLED", False)
    sampler = env.str(
        "OTEL_TRACES_SAMPLER", "parentbased_always_on", validate=validate.OneOf(TRACE_SAMPLERS)
    )
    ratio = env.float(
        "OTEL_TRACES_SAMPLER_ARG",
        1.0,
        validate=validate.Range(0, 1, error="must be a number from 0 to 1"),
    )
    if traces_endpoint:
        endpoint: str | None = traces_endpoint
    elif base_endpoint:
        endpoint = base_endpoint.rstrip("/") + "/v1/traces"
    else:
        endpoint = None
    return TracingSettings(
        endpoint=None if disabled or exporter == "none" else endpoint,
        service_name=env.str(
            "OTEL_SERVICE_NAME", "conversations", validate=validate.Length(1, 200)
        ),
        sampler=sampler,
        ratio=ratio,
    )


def _optional(validator: validate.Validator) -> Callable[[str], object]:
    """`validator`, but an empty value (unset in a ConfigMap) passes."""
    return lambda value: value == "" or validator(value)


def load_migrate_settings() -> MigrateSettings:
    """Only what migrations need, so the migration Job is given the database URL alone."""
    env = Env(eager=False)
    settings = MigrateSettings(
        database_url=_database_url(env), log_level=_log_level(env), log_format=_log_format(env)
    )
    _seal(env)
    return settings


def load_event_settings() -> EventSettings:
    """Only the broker settings: what `conversations events tail` needs."""
    env = Env(eager=False)
    events = _event_settings(env)
    _seal(env)
    return events


def load_settings() -> Settings:
    """All settings, from the process environment; ConfigError says what is wrong."""
    env = Env(eager=False)
    settings = Settings(
        database_url=_database_url(env),
        host=env.str("HOST", "127.0.0.1"),
        port=env.int("PORT", 8080, validate=validate.Range(1, 65535)),
        db_pool_min=env.int("DB_POOL_MIN", 2, validate=validate.Range(0, 1000)),
        db_pool_max=env.int("DB_POOL_MAX", 10, validate=validate.Range(1, 1000)),
        db_statement_timeout_ms=env.int(
            "DB_STATEMENT_TIMEOUT_MS", 5000, validate=validate.Range(1, 600_000)
        ),
        error_docs_url=env.str("ERROR_DOCS_URL", "https://docs.digivault.com/api/errors"),
        log_level=_log_level(env),
        log_format=_log_format(env),
        shutdown_timeout_seconds=env.float(
            "SHUTDOWN_TIMEOUT_SECONDS", 20.0, validate=validate.Range(0, 600)
        ),
        workers=env.int("WORKERS", 1, validate=validate.Range(1, 64)),
        relay_http_port=env.int("RELAY_HTTP_PORT", 9090, validate=validate.Range(1, 65535)),
        metrics_token=env.str("METRICS_TOKEN", None) or None,
        sync_retention_days=env.int("SYNC_RETENTION_DAYS", 30, validate=validate.Range(1, 3650)),
        auth=_auth_settings(env),
        events=_event_settings(env),
        rate_limits=_rate_limit_settings(env),
        idempotency_ttl_hours=env.int(
            "IDEMPOTENCY_TTL_HOURS", 24, validate=validate.Range(1, 24 * 30)
        ),
        tracing=_tracing_settings(env),
    )
    _seal(env)
    if settings.db_pool_min > settings.db_pool_max:
        raise invalid_configuration({"DB_POOL_MIN": "must not exceed DB_POOL_MAX"})
    _check_auth(settings.auth)
    _check_audience(settings.auth)
    return settings
