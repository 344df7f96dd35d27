"""Tokens verified with keys from a JWKS endpoint (service/api/jwks.py), against a real local HTTP
server that serves a key set and an OpenID discovery document from state each test changes:
rotation, the unknown-kid refetch and its cooldown, the provider down, malformed documents."""

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections import Counter

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from service.api.app import create_app
from service.api.auth import InvalidToken, Principal, TokenVerifier
from service.api.jwks import SigningKeysUnavailable, UnusableDocument, parse_key_set
from service.metrics import Metrics
from service.settings import AuthSettings, ConfigError, load_settings
from tests.conftest import ALL_SCOPES, TEST_SECRET
from tests.error_bodies import error_body
from tests.events_support import wait_until

AUDIENCE = "conversations"
URL = "/v1/conversations"
JWKS_PATH = "/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"


# --- keys, tokens and the provider --------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    """One private key per accepted algorithm, and spares for rotation."""
    return {
        "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec-1": ec.generate_private_key(ec.SECP256R1()),
        "ed-1": ed25519.Ed25519PrivateKey.generate(),
    }


ALGORITHM_OF = {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA"}


def algorithm_of(kid: str) -> str:
    return ALGORITHM_OF[kid.split("-")[0]]


def jwk(kid: str | None, private_key, **extra) -> dict:
    """The public JWK of `private_key`, as a provider publishes it."""
    public = private_key.public_key()
    codec = {
        rsa.RSAPublicKey: RSAAlgorithm,
        ec.EllipticCurvePublicKey: ECAlgorithm,
        ed25519.Ed25519PublicKey: OKPAlgorithm,
    }
    [algorithm] = [a for kind, a in codec.items() if isinstance(public, kind)]
    entry = algorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        entry["kid"] = kid
    return {**entry, **extra}


def claims(sub: str = "acct_1", **extra) -> dict:
    now = int(time.time())
    return {
        "sub": sub,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "scope": " ".join(ALL_SCOPES),
        **extra,
    }


def sign(keys: dict, name: str, payload: dict | None = None, *, kid: str | None = None) -> str:
    """A token signed by key `name`, naming it (or `kid`) in its header."""
    return jwt.encode(
        payload or claims(),
        keys[name],
        algorithm=algorithm_of(name),
        headers={"kid": kid or name},
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_token(header: dict, payload: dict, secret: bytes | None) -> str:
    """A token built by hand: HMAC-SHA256 signed with `secret`, or unsigned."""
    segments = [b64url(json.dumps(part).encode()) for part in (header, payload)]
    signing_input = ".".join(segments)
    if secret is None:
        return signing_input + "."
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


class Provider:
    """An identity provider on 127.0.0.1: a JWKS and a discovery document, both changeable."""

    def __init__(self) -> None:
        self.jwks: dict = {"keys": []}
        self.raw: bytes | None = None  # served instead of `jwks` when set (a broken document)
        self.issuer_claimed: str | None = None  # what discovery names as issuer (default: itself)
        self.requests: Counter[str] = Counter()
        self.server: TestServer | None = None
        self.issuer = ""

    @property
    def url(self) -> str:
        return self.issuer + JWKS_PATH

    def publish(self, keys: dict, *kids: str) -> None:
        self.raw = None
        self.jwks = {"keys": [jwk(kid, keys[kid]) for kid in kids]}

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        app.router.add_get(DISCOVERY_PATH, self._discovery)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.issuer = f"http://127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.close()

    async def _jwks(self, request: web.Request) -> web.Response:
        self.requests[JWKS_PATH] += 1
        body = self.raw if self.raw is not None else json.dumps(self.jwks).encode()
        return web.Response(body=body, content_type="application/json")

    async def _discovery(self, request: web.Request) -> web.Response:
        self.requests[DISCOVERY_PATH] += 1
        issuer = self.issuer_claimed or self.issuer
        return web.json_response({"issuer": issuer, "jwks_uri": self.url})


@pytest.fixture
async def provider(keys):
    provider = Provider()
    provider.publish(keys, "rsa-1", "ec-1", "ed-1")
    await provider.start()
    yield provider
    await provider.stop()


class Clock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def auth_settings(provider: Provider, **changes) -> AuthSettings:
    base = AuthSettings(
        hs256_secrets=(),
        public_keys_pem=(),
        audience=AUDIENCE,
        issuer=None,
        leeway_seconds=0,
        jwks_urls=(provider.url,),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_verifier(provider, clock):
    """A verifier on the provider (settings changed by keyword), started: its first fetch done."""
    started: list[TokenVerifier] = []

    async def make(**changes) -> TokenVerifier:
        verifier = TokenVerifier(
            auth_settings(provider, **changes), metrics=Metrics(), monotonic=clock
        )
        assert verifier.jwks is not None
        await verifier.jwks.start()
        await verifier.jwks.refresh()  # waits for the fetch that start() began
        started.append(verifier)
        return verifier

    yield make
    for verifier in started:
        await verifier.jwks.close()  # type: ignore[union-attr]


def fetches(verifier: TokenVerifier, outcome: str) -> float:
    return verifier.jwks._metrics.jwks_fetches.labels(outcome)._value.get()  # type: ignore[union-attr]


# --- verification -------------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
async def test_tokens_of_each_algorithm_verify_with_one_fetch(provider, keys, make_verifier, kid):
    verifier = await make_verifier()
    token = sign(keys, kid, claims("acct_" + kid))
    assert await verifier.authenticate(token) == Principal("acct_" + kid, frozenset(ALL_SCOPES))
    assert provider.requests[JWKS_PATH] == 1
    assert fetches(verifier, "ok") == 1


async def test_rotation_new_key_published_old_tokens_valid_until_removed(
    provider, keys, make_verifier, clock
):
    provider.publish(keys, "rsa-1")
    verifier = await make_verifier()
    old = sign(keys, "rsa-1")
    assert (await verifier.authenticate(old)).account_id == "acct_1"

    # The provider publishes a second key: its first token makes the service refetch.
    provider.publish(keys, "rsa-1", "rsa-2")
    clock.advance(30)  # the cooldown (default 30 s) since the start-up fetch
    new = sign(keys, "rsa-2", claims("acct_2"))
    assert (await verifier.authenticate(new)).account_id == "acct_2"
    assert provider.requests[JWKS_PATH] == 2
    assert (await verifier.authenticate(sign(keys, "rsa-1"))).account_id == "acct_1"

    # The old key is withdrawn: after the TTL the refresh (in the background) drops it, and
    # tokens it signed fail, the ones verified before included.
    provider.publish(keys, "rsa-2")
    clock.advance(300)
    assert (await verifier.authenticate(new)).account_id == "acct_2"  # starts the refresh
    await wait_until(lambda: _is(provider.requests[JWKS_PATH] == 3), timeout=5)
    await verifier.jwks.refresh()  # type: ignore[union-attr]  # its end (within the cooldown)
    for token in (old, sign(keys, "rsa-1")):
        with pytest.raises(InvalidToken, match="does not know"):
            await verifier.authenticate(token)
    assert (await verifier.authenticate(new)).account_id == "acct_2"
    assert provider.requests[JWKS_PATH] == 3


async def _is(value: bool) -> bool:
    return value


async def test_a_flood_of_unknown_kids_fetches_once_per_cooldown(
    provider, keys, make_verifier, clock
):
    verifier = await make_verifier()
    assert provider.requests[JWKS_PATH] == 1
    clock.advance(31)
    forged = [sign(keys, "rsa-1", kid=f"made-up-{n}") for n in range(50)]
    results = await asyncio.gather(
        *(verifier.authenticate(token) for token in forged), return_exceptions=True
    )
    assert all(isinstance(result, InvalidToken) for result in results), results
    assert provider.requests[JWKS_PATH] == 2  # one fetch for the fifty

    clock.advance(29)  # still inside the cooldown of that fetch
    with pytest.raises(InvalidToken):
        await verifier.authenticate(sign(keys, "rsa-1", kid="made-up-again"))
    assert provider.requests[JWKS_PATH] == 2
    clock.advance(1)
    with pytest.raises(InvalidToken):
        await verifier.authenticate(sign(keys, "rsa-1", kid="made-up-later"))
    assert provider.requests[JWKS_PATH] == 3
    # Known keys never cause a fetch.
    for kid in ("rsa-1", "ec-1", "ed-1"):
        await verifier.authenticate(sign(keys, kid, claims(f"acct_{kid}")))
    assert provider.requests[JWKS_PATH] == 3


async def test_audience_and_issuer_mismatch_are_401(provider, keys, make_verifier):
    verifier = await make_verifier(issuer="https://id.example.test")
    good = {"iss": "https://id.example.test"}
    assert await verifier.authenticate(sign(keys, "rsa-1", claims(**good)))
    refused = [
        claims(**good, aud="billing"),
        {k: v for k, v in claims(**good).items() if k != "aud"},
        claims(iss="https://evil.example.test"),
        claims(),  # no iss
    ]
    for payload in refused:
        with pytest.raises(InvalidToken, match=r"not meant for this service|lacks the"):
            await verifier.authenticate(sign(keys, "rsa-1", payload))


async def test_alg_none_and_hmac_with_the_public_key_are_refused(provider, keys, make_verifier):
    verifier = await make_verifier(hs256_secrets=(TEST_SECRET,))
    public = keys["rsa-1"].public_key()
    pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    jwk_text = json.dumps(jwk("rsa-1", keys["rsa-1"])).encode()
    tokens = [
        hmac_token({"alg": "none", "kid": "rsa-1"}, claims(), None),
        hmac_token({"alg": "none"}, claims(), None),
    ]
    for secret in (pem, jwk_text):
        for alg in ("HS256", "RS256"):
            tokens.append(hmac_token({"alg": alg, "kid": "rsa-1"}, claims(), secret))
    # A key used with an algorithm it was not made for: the EdDSA key's kid under RS256.
    tokens.append(sign(keys, "rsa-1", kid="ed-1"))
    # A kid that is not a string (a list cannot even be looked up).
    rs256 = sign(keys, "rsa-1")
    header = b64url(json.dumps({"alg": "RS256", "kid": ["rsa-1"]}).encode())
    tokens.append(".".join([header, *rs256.split(".")[1:]]))
    for token in tokens:
        with pytest.raises(InvalidToken):
            await verifier.authenticate(token)
    assert provider.requests[JWKS_PATH] == 1  # a known kid needs no refetch


async def test_a_symmetric_key_in_the_set_is_never_used(provider, keys, make_verifier):
    secret = b"a-shared-secret-published-by-mistake-0123"
    provider.jwks["keys"].append({"kty": "oct", "kid": "oct-1", "k": b64url(secret)})
    verifier = await make_verifier()
    with pytest.raises(InvalidToken):
        await verifier.authenticate(hmac_token({"alg": "HS256", "kid": "oct-1"}, claims(), secret))


async def test_kid_is_required_when_the_set_has_several_keys(provider, keys, make_verifier, clock):
    no_kid = jwt.encode(claims(), keys["rsa-1"], algorithm="RS256")
    verifier = await make_verifier()
    with pytest.raises(InvalidToken, match="signature"):
        await verifier.authenticate(no_kid)
    provider.jwks = {"keys": [jwk(None, keys["rsa-1"])]}  # one key: no kid needed
    clock.advance(300)
    await verifier.jwks.refresh()  # type: ignore[union-attr]
    assert (await verifier.authenticate(no_kid)).account_id == "acct_1"


async def test_account_claim_and_default_scopes_for_service_account_tokens(
    provider, keys, make_verifier
):
    """A Kubernetes service account token: no `scope`, the account in a claim of our choice."""
    verifier = await make_verifier(account_claim="sub", default_scopes=("conversations:read",))
    payload = {k: v for k, v in claims("system:serviceaccount:billing:invoicer").items()}
    del payload["scope"]
    principal = await verifier.authenticate(sign(keys, "rsa-1", payload))
    assert principal == Principal(
        "system:serviceaccount:billing:invoicer", frozenset({"conversations:read"})
    )
    other = await make_verifier(account_claim="account")
    token = sign(keys, "ec-1", claims(account="acct_7"))
    assert (await other.authenticate(token)).account_id == "acct_7"
    with pytest.raises(InvalidToken, match="account"):
        await other.authenticate(sign(keys, "ec-1", claims()))


async def test_verify_uses_the_cached_keys_and_never_fetches(provider, keys, make_verifier, clock):
    verifier = await make_verifier()
    clock.advance(300)
    assert verifier.verify(sign(keys, "ec-1")).account_id == "acct_1"
    with pytest.raises(InvalidToken, match="does not know"):
        verifier.verify(sign(keys, "rsa-2"))
    assert provider.requests[JWKS_PATH] == 1


# --- discovery ----------------------------------------------------------------------------------


async def test_oidc_discovery_finds_the_key_set(provider, keys, make_verifier):
    verifier = await make_verifier(jwks_urls=(), issuer=provider.issuer, oidc_discovery=True)
    token = sign(keys, "ed-1", claims(iss=provider.issuer))
    assert (await verifier.authenticate(token)).account_id == "acct_1"
    assert provider.requests == Counter({DISCOVERY_PATH: 1, JWKS_PATH: 1})


async def test_a_discovery_document_for_another_issuer_is_refused(
    provider, keys, make_verifier, caplog
):
    provider.issuer_claimed = "https://evil.example.test"
    verifier = await make_verifier(jwks_urls=(), issuer=provider.issuer, oidc_discovery=True)
    assert provider.requests[JWKS_PATH] == 0
    assert "names another issuer" in caplog.text
    with pytest.raises(SigningKeysUnavailable):
        await verifier.authenticate(sign(keys, "ed-1", claims(iss=provider.issuer)))


# --- the provider down --------------------------------------------------------------------------


async def test_provider_down_cached_keys_work_unknown_kid_is_unavailable(
    provider, keys, make_verifier, clock, caplog
):
    verifier = await make_verifier()
    await provider.stop()
    caplog.set_level(logging.WARNING, logger="service.api.jwks")
    for _ in range(3):  # three refreshes past the TTL, all failing
        clock.advance(300)
        await verifier.jwks.refresh()  # type: ignore[union-attr]
        # A token never seen before, signed by a cached key: still good.
        fresh = sign(keys, "rsa-1", claims(f"acct_{clock.now}"))
        assert (await verifier.authenticate(fresh)).account_id == f"acct_{clock.now}"
    assert fetches(verifier, "unreachable") == 3
    lines = [r for r in caplog.records if r.name == "service.api.jwks"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # one line per interval
    assert "keeping the 3 key(s)" in lines[0].getMessage()

    clock.advance(10)
    with pytest.raises(SigningKeysUnavailable) as raised:
        await verifier.authenticate(sign(keys, "rsa-2"))
    assert raised.value.retry_after == 20  # the rest of the cooldown
    clock.advance(20)
    with pytest.raises(SigningKeysUnavailable) as raised:
        await verifier.authenticate(sign(keys, "rsa-2"))
    assert raised.value.retry_after == 30  # it tried again (and failed) just now
    assert fetches(verifier, "unreachable") == 4


async def test_a_provider_back_up_serves_the_new_key(provider, keys, make_verifier, clock):
    verifier = await make_verifier()
    await provider.stop()
    clock.advance(30)
    with pytest.raises(SigningKeysUnavailable):
        await verifier.authenticate(sign(keys, "rsa-2"))
    provider.publish(keys, "rsa-1", "rsa-2")
    await provider.start()
    verifier.jwks._sources[0].url = provider.url  # type: ignore[union-attr]  # a new port
    clock.advance(30)
    assert (await verifier.authenticate(sign(keys, "rsa-2"))).account_id == "acct_1"


# --- malformed documents ------------------------------------------------------------------------

BROKEN_DOCUMENTS = {
    "not-json": (b"<html>oops</html>", "not JSON"),
    "no-keys": (b'{"kty": "RSA"}', "`keys` list"),
    "keys-not-a-list": (b'{"keys": {"kid": "a"}}', "`keys` list"),
    "empty": (b'{"keys": []}', "empty"),
    "only-junk": (b'{"keys": [1, "x", {"kty": "RSA", "n": "AQAB"}]}', "no usable key"),
    "only-symmetric": (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "symmetric"),
}


@pytest.mark.parametrize(("body", "reason"), BROKEN_DOCUMENTS.values(), ids=BROKEN_DOCUMENTS.keys())
async def test_malformed_documents_are_refused_with_a_clear_line(
    provider, keys, make_verifier, clock, caplog, body, reason
):
    verifier = await make_verifier()
    provider.raw = body
    clock.advance(300)
    caplog.set_level(logging.WARNING, logger="service.api.jwks")
    await verifier.jwks.refresh()  # type: ignore[union-attr]
    [line] = [r.getMessage() for r in caplog.records if r.name == "service.api.jwks"]
    assert "document refused" in line
    assert reason in line
    assert provider.url in line
    assert fetches(verifier, "invalid") == 1
    # The keys fetched before keep working; an unknown kid cannot be looked up: 503.
    assert (await verifier.authenticate(sign(keys, "ec-1"))).account_id == "acct_1"
    with pytest.raises(SigningKeysUnavailable):
        await verifier.authenticate(sign(keys, "rsa-2"))


def test_parse_key_set_skips_what_cannot_sign_for_us(keys):
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505  # refused, as it should be
    entries = [
        jwk("good", keys["rsa-1"]),
        jwk("enc", keys["rsa-2"], use="enc"),
        jwk("rs512", keys["rsa-2"], alg="RS512"),
        jwk("p384", ec.generate_private_key(ec.SECP384R1())),
        jwk("small", small_rsa),
        jwk(None, keys["ec-1"]),
        {**ECAlgorithm.to_jwk(keys["ec-1"], as_dict=True), "kid": "private"},
        jwk("mislabelled", keys["ec-1"], alg="RS256"),
        # Members of the wrong JSON type: PyJWT raises TypeError for some, not its own errors.
        {**jwk(None, keys["rsa-1"]), "kid": "alg-list", "alg": ["RS256"]},
        {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
    ]
    parsed = parse_key_set({"keys": entries})
    assert set(parsed.by_kid) == {"good"}
    assert parsed.unnamed is None
    reasons = "\n".join(parsed.skipped)
    for expected in (
        "'enc': not a signature key",
        "'rs512': algorithm RS512",
        "'p384': algorithm ES384",
        "'small': not an RSA public key of at least 2048",
        "#6: no `kid`",
        "'private': a private key",
        "'mislabelled': unreadable",
        "'alg-list': unreadable",
        "'no-n': unreadable",
    ):
        assert expected in reasons
    with pytest.raises(UnusableDocument, match="no usable key"):
        parse_key_set({"keys": entries[1:]})


# --- through the application --------------------------------------------------------------------


@pytest.fixture
def jwks_app_settings(settings, provider):
    auth = dataclasses.replace(
        settings.auth, hs256_secrets=(), audience=AUDIENCE, jwks_urls=(provider.url,)
    )
    return dataclasses.replace(settings, auth=auth)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_jwks_tokens_through_the_app(jwks_app_settings, aiohttp_client, provider, keys):
    client = await aiohttp_client(create_app(jwks_app_settings))
    resp = await client.post(URL, json={"contact_id": "c1"}, headers=bearer(sign(keys, "rsa-1")))
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    for kid in ("rsa-1", "ec-1", "ed-1"):
        resp = await client.get(f"{URL}/{created['id']}", headers=bearer(sign(keys, kid)))
        assert resp.status == 200, await resp.text()
        assert await resp.json() == created
    assert provider.requests[JWKS_PATH] == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'conversations_jwks_fetches_total{outcome="ok"} 1.0' in metrics
    assert "conversations_jwks_keys 3.0" in metrics
    hs = jwt.encode(claims(), TEST_SECRET, algorithm="HS256")
    await error_body(await client.get(URL, headers=bearer(hs)), 401, "authentication_error")


async def test_provider_down_at_start_the_app_is_ready_and_answers_503(
    jwks_app_settings, aiohttp_client, provider, keys, caplog
):
    await provider.stop()
    client = await aiohttp_client(create_app(jwks_app_settings))
    assert (await client.get("/readyz")).status == 200
    caplog.set_level(logging.ERROR, logger="service.api.middleware")
    for _ in range(3):
        resp = await client.get(URL, headers=bearer(sign(keys, "rsa-1")))
        await error_body(resp, 503, "api_error")
        assert 1 <= int(resp.headers["Retry-After"]) <= 30
        assert "WWW-Authenticate" not in resp.headers
    lines = [r for r in caplog.records if "JWKS provider down" in r.getMessage()]
    assert len(lines) == 1
    assert (await client.get("/readyz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'conversations_jwks_fetches_total{outcome="unreachable"} 1.0' in metrics


async def test_the_relay_role_fetches_nothing(jwks_app_settings, aiohttp_client, provider):
    client = await aiohttp_client(create_app(jwks_app_settings, role="relay"))
    assert (await client.get("/healthz")).status == 200
    assert provider.requests[JWKS_PATH] == 0


# --- configuration ------------------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch):
    """A serve environment without token settings; returns a setter."""
    for name in list(__import__("os").environ):
        if name.startswith("JWT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example.test/conversations")
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@mq.example.test/")

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({}, "JWT_JWKS_URL"),
        ({"JWT_JWKS_URL": "ftp://id.example.test/jwks"}, "JWT_JWKS_URL"),
        ({"JWT_JWKS_URL": "https://id.example.test/jwks.json"}, "JWT_AUDIENCE"),
        ({"JWT_OIDC_DISCOVERY": "true", "JWT_AUDIENCE": AUDIENCE}, "JWT_ISSUER"),
        ({"JWT_OIDC_DISCOVERY": "maybe"}, "JWT_OIDC_DISCOVERY"),
        ({"JWT_JWKS_TTL_SECONDS": "1"}, "JWT_JWKS_TTL_SECONDS"),
        ({"JWT_JWKS_COOLDOWN_SECONDS": "0"}, "JWT_JWKS_COOLDOWN_SECONDS"),
        ({"JWT_ACCOUNT_CLAIM": "a b"}, "JWT_ACCOUNT_CLAIM"),
        ({"JWT_DEFAULT_SCOPES": "conversations:admin"}, "JWT_DEFAULT_SCOPES"),
        (
            {
                "JWT_JWKS_URL": "https://id.example.test/jwks.json",
                "JWT_JWKS_CA_FILE": "/nonexistent",
            },
            "JWT_JWKS_CA_FILE",
        ),
    ],
)
def test_bad_token_settings_name_the_variable(environment, variables, named):
    environment(**variables)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value).startswith("invalid configuration:\n  ")
    assert named in str(raised.value)


def test_jwks_settings_are_read(environment):
    environment(
        JWT_JWKS_URL="https://id.example.test/jwks.json, https://other.example.test/keys",
        JWT_AUDIENCE=AUDIENCE,
        JWT_ISSUER="https://kubernetes.default.svc.cluster.local",
        JWT_OIDC_DISCOVERY="true",
        JWT_JWKS_TTL_SECONDS="600",
        JWT_JWKS_COOLDOWN_SECONDS="10",
        JWT_ACCOUNT_CLAIM="sub",
        JWT_DEFAULT_SCOPES="conversations:read conversations:write",
    )
    auth = load_settings().auth
    assert auth.jwks_urls == (
        "https://id.example.test/jwks.json",
        "https://other.example.test/keys",
    )
    assert auth.oidc_discovery
    assert (auth.jwks_ttl_seconds, auth.jwks_cooldown_seconds) == (600, 10)
    assert auth.default_scopes == ("conversations:read", "conversations:write")
    assert auth.hs256_secrets == ()
