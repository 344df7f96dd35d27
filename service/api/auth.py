"""Bearer tokens: verify a JWT into the account and scopes it speaks for; mint dev tokens."""

import time
from dataclasses import dataclass

import jwt

from service.settings import AuthSettings, ConfigError, parse_public_key

READ_SCOPE = "conversations:read"
WRITE_SCOPE = "conversations:write"
# Verified tokens remembered per process; bounded so that a flood of distinct tokens cannot
# grow memory (about 1 KiB each).
TOKEN_CACHE_SIZE = 10_000
# Account ids come from another service; bound them so they cannot bloat rows or logs.
MAX_ACCOUNT_ID_LENGTH = 128


class InvalidToken(Exception):
    """The token cannot be trusted; the message is safe to show (it never contains the token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for: one account, with some scopes."""

    account_id: str
    scopes: frozenset[str]


class TokenVerifier:
    """Verifies HS256 tokens against every configured secret and RS256/ES256 ones against keys.

    Several keys per algorithm let keys rotate: a token is good if any key of its `alg` verifies.
    A key is only ever tried with its own algorithm, so `none` and algorithm confusion are out.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._keys: dict[str, list[object]] = {}
        if settings.hs256_secrets:
            self._keys["HS256"] = list(settings.hs256_secrets)
        for pem in settings.public_keys_pem:
            algorithm, key = parse_public_key(pem)
            self._keys.setdefault(algorithm, []).append(key)
        self._options = {"require": ["exp", "sub"], "verify_aud": settings.audience is not None}
        self._cache: dict[str, tuple[Principal, float]] = {}

    def verify(self, token: str) -> Principal:
        """The principal a valid token names; InvalidToken otherwise.

        A verified token is remembered until it expires: callers reuse a token for many
        requests, and checking a signature costs more than the rest of a cached read.
        """
        cached = self._cache.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._cache[token]
        principal, expires = self._verify(token)
        if len(self._cache) >= TOKEN_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry: insertion order
        self._cache[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError:
            raise InvalidToken("The bearer token is malformed.") from None
        keys = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if not keys:
            raise InvalidToken("The bearer token is signed with an algorithm that is not accepted.")
        claims = self._decode(token, algorithm, keys)
        subject = claims.get("sub")
        if (
            not isinstance(subject, str)
            or not 0 < len(subject) <= MAX_ACCOUNT_ID_LENGTH
            or not subject.isprintable()  # NUL or a lone surrogate cannot even be stored
        ):
            raise InvalidToken("The bearer token has no valid subject.")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise InvalidToken("The bearer token's scope claim is not a string.")
        # As PyJWT counts: the whole seconds of exp, plus the leeway.
        expires = int(claims["exp"]) + self._settings.leeway_seconds  # type: ignore[call-overload]
        return Principal(account_id=subject, scopes=frozenset(scope.split())), expires

    def _decode(self, token: str, algorithm: str, keys: list[object]) -> dict[str, object]:
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,  # type: ignore[arg-type]
                    algorithms=[algorithm],
                    audience=self._settings.audience,
                    issuer=self._settings.issuer,
                    leeway=self._settings.leeway_seconds,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                continue  # maybe signed with another of the rotating keys
            except jwt.ExpiredSignatureError:
                raise InvalidToken("The bearer token has expired.") from None
            except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
                raise InvalidToken("The bearer token is not meant for this service.") from None
            except jwt.MissingRequiredClaimError as error:
                raise InvalidToken(f"The bearer token lacks the {error.claim} claim.") from None
            except jwt.InvalidTokenError:
                raise InvalidToken("The bearer token is invalid.") from None
        raise InvalidToken("The bearer token's signature does not verify.")


def mint_token(settings: AuthSettings, account_id: str, scopes: list[str], ttl_seconds: int) -> str:
    """A development token signed with the first HS256 secret."""
    if not settings.hs256_secrets:
        raise ConfigError(
            "invalid configuration:\n  JWT_HS256_SECRETS: dev tokens are signed with its first secret"
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
