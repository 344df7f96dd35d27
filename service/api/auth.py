"""Bearer tokens: verify a JWT into the account and scopes it speaks for; mint dev tokens."""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from cachetools import TLRUCache

from service.api.jwks import JWKS_ALGORITHMS, JwksKeys, SigningKeysUnavailable
from service.metrics import Metrics
from service.settings import AuthSettings, invalid_configuration, parse_public_key

READ_SCOPE = "conversations:read"
WRITE_SCOPE = "conversations:write"
# Verified tokens remembered per process; bounded so that a flood of distinct tokens cannot
# grow memory (about 1 KiB each).
TOKEN_CACHE_SIZE = 10_000
# Account ids come from another service; bound them so they cannot bloat rows or logs.
MAX_ACCOUNT_ID_LENGTH = 128


class InvalidToken(Exception):
    """The token cannot be trusted; the message is safe to show (it never contains the token)."""


_UNKNOWN_KEY = "The bearer token is signed with a key this service does not know."


class _UnknownSigningKey(Exception):
    """The token names a JWKS `kid` that is not cached: a refresh may find it."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for: one account, with some scopes."""

    account_id: str
    scopes: frozenset[str]


class TokenVerifier:
    """Verifies HS256 tokens against every configured secret, RS256/ES256 ones against the PEM
    keys, and RS256/ES256/EdDSA ones against the keys of the JWKS sources (by `kid`).

    Several keys per algorithm let keys rotate: a token is good if any key of its `alg` verifies.
    A key is only ever tried with its own algorithm, so `none` and algorithm confusion are out.
    `clock` is the Unix time the token's exp, nbf and iat are checked against.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._keys: dict[str, list[object]] = {}
        if settings.hs256_secrets:
            self._keys["HS256"] = list(settings.hs256_secrets)
        for pem in settings.public_keys_pem:
            algorithm, key = parse_public_key(pem)
            self._keys.setdefault(algorithm, []).append(key)
        self.jwks: JwksKeys | None = None
        if settings.uses_jwks:
            self.jwks = JwksKeys(
                settings, metrics=metrics, clock=monotonic, on_keys_removed=self._forget_verified
            )
        self._options = {
            "require": ["exp", settings.account_claim],
            "verify_aud": settings.audience is not None,
            # Checked against `clock` in _check_times: PyJWT would read the system clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        # Per token, until its exp (the TTL of each entry), least recently used out first.
        self._cache: TLRUCache[str, tuple[Principal, float]] = TLRUCache(
            maxsize=TOKEN_CACHE_SIZE, ttu=lambda _token, entry, _now: entry[1], timer=clock
        )

    async def authenticate(self, token: str) -> Principal:
        """`verify`, and for a token signed by a JWKS key not cached yet, a refresh of the keys
        first (at most one fetch per cooldown). SigningKeysUnavailable when the key is unknown
        and the provider could not be reached."""
        if self.jwks is None:
            return self._principal(token)
        self.jwks.refresh_if_stale()
        try:
            return self._principal(token)
        except _UnknownSigningKey:
            await self.jwks.refresh()
        try:
            return self._principal(token)
        except _UnknownSigningKey:
            if not self.jwks.reachable:
                raise SigningKeysUnavailable(self.jwks.retry_after()) from None
            raise InvalidToken(_UNKNOWN_KEY) from None

    def verify(self, token: str) -> Principal:
        """The principal a valid token names, with the keys cached now; InvalidToken otherwise."""
        try:
            return self._principal(token)
        except _UnknownSigningKey:
            raise InvalidToken(_UNKNOWN_KEY) from None

    def _principal(self, token: str) -> Principal:
        """A verified token is remembered until it expires: callers reuse a token for many
        requests, and checking a signature costs more than the rest of a cached read."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached[0]
        principal, expires = self._verify(token)
        if expires > self._clock():
            self._cache[token] = (principal, expires)
        return principal

    def _forget_verified(self) -> None:
        """A key was withdrawn: tokens it verified must be checked again."""
        self._cache.clear()

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("The bearer token is malformed.") from None
        algorithm, kid = header.get("alg"), header.get("kid")  # PyJWT refuses a non-string kid
        if not isinstance(algorithm, str):
            raise InvalidToken("The bearer token is signed with an algorithm that is not accepted.")
        keys = list(self._keys.get(algorithm, ()))
        from_jwks = self.jwks is not None and algorithm in JWKS_ALGORITHMS
        if from_jwks:
            keys += [key.key for key in self.jwks.candidates(algorithm, kid)]  # type: ignore[union-attr]
        claims = self._decode(token, algorithm, keys) if keys else None
        if claims is None:
            if from_jwks and not self.jwks.knows(kid):  # type: ignore[union-attr]
                raise _UnknownSigningKey
            if not keys and not from_jwks:
                raise InvalidToken(
                    "The bearer token is signed with an algorithm that is not accepted."
                )
            raise InvalidToken("The bearer token's signature does not verify.")
        expires = self._check_times(claims)
        account = claims.get(self._settings.account_claim)
        if (
            not isinstance(account, str)
            or not 0 < len(account) <= MAX_ACCOUNT_ID_LENGTH
            or not account.isprintable()  # NUL or a lone surrogate cannot even be stored
        ):
            raise InvalidToken(f"The bearer token has no valid {self._settings.account_claim}.")
        scope = claims.get("scope")
        if scope is None:
            scopes = frozenset(self._settings.default_scopes)
        elif isinstance(scope, str):
            scopes = frozenset(scope.split())
        else:
            raise InvalidToken("The bearer token's scope claim is not a string.")
        return Principal(account_id=account, scopes=scopes), expires

    def _check_times(self, claims: dict[str, object]) -> float:
        """exp, nbf and iat as PyJWT checks them, against our clock; the cache's expiry."""
        now, leeway = self._clock(), self._settings.leeway_seconds
        times = {}
        for claim in ("exp", "nbf", "iat"):
            if claim in claims:
                try:
                    times[claim] = int(claims[claim])  # type: ignore[call-overload]
                except (TypeError, ValueError, OverflowError):  # 1e999 is inf
                    raise InvalidToken(
                        f"The bearer token's {claim} claim is not a number."
                    ) from None
        if times["exp"] <= now - leeway:
            raise InvalidToken("The bearer token has expired.")
        if times.get("nbf", -math.inf) > now + leeway or times.get("iat", -math.inf) > now + leeway:
            raise InvalidToken("The bearer token is not valid yet.")
        return times["exp"] + leeway

    def _decode(self, token: str, algorithm: str, keys: list[object]) -> dict[str, object] | None:
        """The claims, checked by the first key whose signature verifies; None if none does."""
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,  # type: ignore[arg-type]
                    algorithms=[algorithm],
                    audience=self._settings.audience,
                    issuer=self._settings.issuer,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                continue  # maybe signed with another of the rotating keys
            except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
                raise InvalidToken("The bearer token is not meant for this service.") from None
            except jwt.MissingRequiredClaimError as error:
                raise InvalidToken(f"The bearer token lacks the {error.claim} claim.") from None
            except jwt.InvalidTokenError:
                raise InvalidToken("The bearer token is invalid.") from None
        return None


def mint_token(settings: AuthSettings, account_id: str, scopes: list[str], ttl_seconds: int) -> str:
    """A development token signed with the first HS256 secret."""
    if not settings.hs256_secrets:
        raise invalid_configuration(
            {"JWT_HS256_SECRETS": "dev tokens are signed with its first secret"}
        )
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": account_id,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.audience:
        claims["aud"] = settings.audience
    if settings.issuer:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, settings.hs256_secrets[0], algorithm="HS256")
