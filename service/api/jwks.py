"""Signing keys published by an identity provider (JWKS), fetched in the background and cached.

Sources are the `JWT_JWKS_URL` list and, with `JWT_OIDC_DISCOVERY`, the `jwks_uri` of the
issuer's `/.well-known/openid-configuration` (how a Kubernetes API server publishes its service
account keys). Keys are looked up by `kid` in a dict on the request path; fetches run with
aiohttp, one at a time (a lock), at most one per cooldown, so a flood of made-up `kid`s costs the
provider one request per cooldown. A source that cannot be fetched keeps its last good keys.
"""

import asyncio
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.logs import Throttle
from service.metrics import Metrics
from service.settings import AuthSettings

log = logging.getLogger(__name__)

# What a JWKS key may sign with; its kty/crv/alg decide which one. HS256 never comes from a JWKS.
JWKS_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
MIN_RSA_BITS = 2048
# A key set is a few KiB; a provider answering megabytes is broken or hostile.
MAX_DOCUMENT_BYTES = 1 << 20
FETCH_TIMEOUT_SECONDS = 5.0
# Fetch failures of one kind: one WARNING line per source this often, with the count held back.
FAILURE_LOG_INTERVAL_SECONDS = 60.0
DISCOVERY_PATH = "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A public key and the one algorithm it verifies; equal keys have equal fingerprints."""

    algorithm: str
    fingerprint: bytes  # SHA-256 of the key's DER form: tells a removed key from a re-read one
    key: Any = field(compare=False)  # a cryptography public key object, as PyJWT takes it


@dataclass(frozen=True)
class KeySet:
    """The usable keys of one JWKS document."""

    by_kid: dict[str, tuple[SigningKey, ...]]
    unnamed: SigningKey | None  # the key of a one-key set without a `kid`
    skipped: tuple[str, ...]  # why the other entries were left out, for the log


class UnusableDocument(Exception):
    """A discovery or JWKS document that cannot be used; the message says why (no key data)."""


class SourceUnreachable(Exception):
    """The provider did not answer with a document (network error, timeout, HTTP status)."""


class SigningKeysUnavailable(Exception):
    """A token names a key this service does not have, and the provider cannot be asked now."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the JWKS provider is unreachable")
        self.retry_after = retry_after


def parse_key_set(document: object) -> KeySet:
    """The verification keys of a JWKS document; UnusableDocument when there are none.

    Entries that are not public signature keys of an accepted algorithm are skipped, each with a
    reason: symmetric keys (`oct`), `use` other than `sig`, other algorithms or curves, RSA under
    2048 bits, and, in a set of several keys, a key without a `kid` (no token could name it).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise UnusableDocument("not a JSON object with a `keys` list")
    entries = document["keys"]
    if not entries:
        raise UnusableDocument("the `keys` list is empty")
    by_kid: dict[str, tuple[SigningKey, ...]] = {}
    unnamed: SigningKey | None = None
    skipped = []
    for number, entry in enumerate(entries, start=1):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        name = f"key {kid!r}" if isinstance(kid, str) else f"key #{number}"
        try:
            key = _signing_key(entry)
            if kid is None and len(entries) > 1:
                raise UnusableDocument("no `kid` in a set of several keys")
            if kid is not None and not isinstance(kid, str):
                raise UnusableDocument("`kid` is not a string")
        except UnusableDocument as error:
            skipped.append(f"{name}: {error}")
            continue
        if kid is None:
            unnamed = key
        else:
            by_kid[kid] = (*by_kid.get(kid, ()), key)
    if not by_kid and unnamed is None:
        raise UnusableDocument("no usable key (" + "; ".join(skipped) + ")")
    return KeySet(by_kid=by_kid, unnamed=unnamed, skipped=tuple(skipped))


def _signing_key(entry: object) -> SigningKey:
    if not isinstance(entry, dict):
        raise UnusableDocument("not a JSON object")
    if entry.get("kty") == "oct":
        raise UnusableDocument("a symmetric key (kty oct) is never taken from a key set")
    if "d" in entry:  # the private part of an RSA, EC or OKP key: a leak, not a key to trust
        raise UnusableDocument("a private key is never taken from a key set")
    if entry.get("use", "sig") != "sig":
        raise UnusableDocument("not a signature key (`use` is not `sig`)")
    try:
        jwk = jwt.PyJWK(entry)  # kty, crv and alg decide the algorithm
    # PyJWT raises its own errors for what it checks, and KeyError, TypeError or ValueError
    # (binascii's and cryptography's included) for a missing or undecodable member.
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        # PyJWT's message quotes the whole key: ours names the fields that decide.
        raise UnusableDocument(
            f"unreadable (kty {entry.get('kty')!r}, crv {entry.get('crv')!r}, "
            f"alg {entry.get('alg')!r})"
        ) from None
    algorithm = jwk.algorithm_name
    if algorithm not in JWKS_ALGORITHMS:
        raise UnusableDocument(f"algorithm {algorithm} is not accepted")
    if algorithm == "RS256" and (
        not isinstance(jwk.key, rsa.RSAPublicKey) or jwk.key.key_size < MIN_RSA_BITS
    ):
        raise UnusableDocument(f"not an RSA public key of at least {MIN_RSA_BITS} bits")
    if algorithm == "ES256" and (
        not isinstance(jwk.key, ec.EllipticCurvePublicKey) or jwk.key.curve.name != "secp256r1"
    ):
        raise UnusableDocument("ES256 needs an EC P-256 public key")
    der = jwk.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(algorithm, hashlib.sha256(der).digest(), jwk.key)


@dataclass
class _Source:
    """One JWKS URL (or an issuer to discover it from) and what it last gave."""

    url: str  # the JWKS URL, or the issuer for discovery
    discovery: bool
    keys: KeySet | None = None
    digest: bytes = b""  # of the last document parsed: an unchanged one is not parsed again
    reachable: bool = True  # the last fetch gave a usable document


class JwksKeys:
    """The keys of every configured JWKS source, refreshed every TTL and on an unknown `kid`.

    `clock` is monotonic seconds; tests pass their own to step past the TTL and the cooldown.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_keys_removed: Callable[[], None] = lambda: None,
    ) -> None:
        self._ttl = settings.jwks_ttl_seconds
        self._cooldown = settings.jwks_cooldown_seconds
        self._ca_file = settings.jwks_ca_file
        self._metrics = metrics
        self._clock = clock
        self._on_keys_removed = on_keys_removed
        self._sources = [_Source(url, discovery=False) for url in settings.jwks_urls]
        if settings.oidc_discovery and settings.issuer:
            self._sources.append(_Source(settings.issuer, discovery=True))
        self._by_kid: dict[str, tuple[SigningKey, ...]] = {}
        self._unnamed: tuple[SigningKey, ...] = ()
        self._fetched_at = -math.inf  # the last refresh that reached every source
        self._attempted_at = -math.inf  # the last refresh, whatever came of it
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = Throttle(FAILURE_LOG_INTERVAL_SECONDS)

    # --- the request path: dict lookups only ----------------------------------------------------

    def candidates(self, algorithm: str, kid: str | None) -> tuple[SigningKey, ...]:
        """The cached keys a token with this header may be signed with (none: unknown or wrong
        algorithm)."""
        keys = self._unnamed if kid is None else self._by_kid.get(kid, ())
        return tuple(key for key in keys if key.algorithm == algorithm)

    def knows(self, kid: str | None) -> bool:
        """Whether a refresh could not help this `kid`: it is cached, or the token names none."""
        return kid is None or kid in self._by_kid

    @property
    def reachable(self) -> bool:
        """Whether the last fetch of every source gave a usable document."""
        return all(source.reachable for source in self._sources)

    def retry_after(self) -> int:
        """Whole seconds until the next fetch may be tried (at least 1)."""
        left = self._attempted_at + self._cooldown - self._clock()
        return max(1, math.ceil(left))

    def refresh_if_stale(self) -> None:
        """Past the TTL, start a refresh in the background; the cached keys serve meanwhile."""
        now = self._clock()
        if (
            now - self._fetched_at >= self._ttl
            and now - self._attempted_at >= self._cooldown
            and (self._task is None or self._task.done())
            and self._session is not None
        ):
            self._task = asyncio.get_running_loop().create_task(self.refresh())

    # --- fetching -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and start the first fetch; a provider that is down does not
        hold up the start (its keys come with the next refresh)."""
        ssl_context = ssl.create_default_context(cafile=self._ca_file) if self._ca_file else True
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4),
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS),
            headers={"Accept": "application/json"},
        )
        self._task = asyncio.get_running_loop().create_task(self.refresh())

    async def close(self) -> None:
        """Stop a fetch in flight and close the session."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def refresh(self) -> None:
        """Fetch every source, unless one was fetched less than a cooldown ago.

        One at a time: callers that arrive while a fetch runs wait for it and then use its keys.
        """
        async with self._lock:
            now = self._clock()
            if now - self._attempted_at < self._cooldown:
                return
            self._attempted_at = now
            results = await asyncio.gather(*(self._fetch(source) for source in self._sources))
            if all(results):
                self._fetched_at = self._clock()
            self._rebuild()

    async def _fetch(self, source: _Source) -> bool:
        try:
            jwks_url = await self._discover(source.url) if source.discovery else source.url
            body = await self._get(jwks_url)
            digest = hashlib.sha256(body).digest()
            if digest != source.digest:
                keys = parse_key_set(_json(body))
                for reason in keys.skipped:
                    log.warning("JWKS %s: %s skipped", jwks_url, reason)
                source.keys, source.digest = keys, digest
        except SourceUnreachable as error:
            return self._failed(source, "unreachable", str(error))
        except UnusableDocument as error:
            return self._failed(source, "invalid", f"document refused: {error}")
        source.reachable = True
        self._count("ok")
        return True

    def _failed(self, source: _Source, outcome: str, reason: str) -> bool:
        source.reachable = False
        self._count(outcome)
        held_back = self._failures.admit((source.url, outcome))
        if held_back is not None:
            log.warning(
                "JWKS %s: %s; keeping the %d key(s) fetched before%s",
                source.url,
                reason,
                _key_count(source.keys),
                f" ({held_back} more failures like it since the last line)" if held_back else "",
                extra={"held_back": held_back or None},
            )
        return False

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.jwks_fetches.labels(outcome).inc()

    async def _discover(self, issuer: str) -> str:
        document = _json(await self._get(issuer.rstrip("/") + DISCOVERY_PATH))
        if not isinstance(document, dict):
            raise UnusableDocument("the discovery document is not a JSON object")
        # OpenID Connect Discovery 1.0, 4.3: the document must name the issuer it was asked for.
        if document.get("issuer") != issuer:
            raise UnusableDocument("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise UnusableDocument("the discovery document has no http(s) `jwks_uri`")
        return jwks_uri

    async def _get(self, url: str) -> bytes:
        assert self._session is not None, "start() opens the session"
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise SourceUnreachable(f"HTTP {response.status}")
                body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise SourceUnreachable(type(error).__name__) from None
        if len(body) > MAX_DOCUMENT_BYTES:
            raise UnusableDocument(f"larger than {MAX_DOCUMENT_BYTES} bytes")
        return body

    def _rebuild(self) -> None:
        """One dict over every source's last good keys (a kid may appear in two sources)."""
        by_kid: dict[str, tuple[SigningKey, ...]] = {}
        unnamed: list[SigningKey] = []
        for source in self._sources:
            if source.keys is None:
                continue
            for kid, keys in source.keys.by_kid.items():
                by_kid[kid] = (*by_kid.get(kid, ()), *keys)
            if source.keys.unnamed is not None:
                unnamed.append(source.keys.unnamed)
        removed = _all_keys(self._by_kid.values(), self._unnamed) - _all_keys(
            by_kid.values(), unnamed
        )
        self._by_kid, self._unnamed = by_kid, tuple(unnamed)
        if self._metrics is not None:
            self._metrics.jwks_keys.set(len(_all_keys(by_kid.values(), unnamed)))
        if removed:
            self._on_keys_removed()


def _json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UnusableDocument("not JSON") from None


def _key_count(keys: KeySet | None) -> int:
    if keys is None:
        return 0
    return sum(map(len, keys.by_kid.values())) + (keys.unnamed is not None)


def _all_keys(
    named: Iterable[tuple[SigningKey, ...]], unnamed: Iterable[SigningKey]
) -> set[SigningKey]:
    return {key for keys in named for key in keys} | set(unnamed)
