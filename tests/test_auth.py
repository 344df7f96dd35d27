"""Authentication and tenancy: bearer JWTs, the algorithm allow-list, keys and scopes."""

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.api.app import create_app
from service.api.auth import (
    MAX_ACCOUNT_ID_LENGTH,
    READ_SCOPE,
    WRITE_SCOPE,
    InvalidToken,
    Principal,
    TokenVerifier,
    mint_token,
)
from service.settings import AuthSettings, ConfigError
from tests.conftest import ALL_SCOPES, TEST_SECRET
from tests.error_bodies import error_body

OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnop"
URL = "/v1/conversations"
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
# Some tokens here are signed with deliberately short keys; PyJWT warns when it signs them.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning")


# --- token building -----------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(sub: object = "acct_1", *, ttl: int = 600, scope: object = None, **extra) -> dict:
    now = int(time.time())
    body = {"sub": sub, "iat": now, "exp": now + ttl, **extra}
    body["scope"] = " ".join(ALL_SCOPES) if scope is None else scope
    return body


def hs256(payload: dict, secret: str = TEST_SECRET, **kwargs) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", **kwargs)


def handmade(header: dict, payload: dict, secret: bytes | None = None) -> str:
    """A JWT built by hand; HMAC-SHA256 signed with `secret`, or with an empty signature."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tampered(sub: str) -> str:
    """A token signed for acct_1 whose payload now names `sub`; the old signature kept."""
    header, _, signature = hs256(claims("acct_1")).split(".")
    return f"{header}.{segment(claims(sub))}.{signature}"


def public_pem(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def verifier(**changes) -> TokenVerifier:
    base = AuthSettings(
        hs256_secrets=(TEST_SECRET,),
        public_keys_pem=(),
        audience=None,
        issuer=None,
        leeway_seconds=0,
    )
    return TokenVerifier(dataclasses.replace(base, **changes))


@pytest.fixture
def auth_client(settings, aiohttp_client):
    """A client for an app whose token settings differ from conftest's by `changes`.

    `settings` comes first so that its database outlives the app (teardown runs in reverse).
    """

    async def make(**changes):
        auth = dataclasses.replace(settings.auth, **changes)
        return await aiohttp_client(create_app(dataclasses.replace(settings, auth=auth)))

    return make


async def assert_unauthenticated(resp, token: str | None = None) -> dict:
    body = await error_body(resp, 401, "authentication_error")
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'realm="conversations"' in challenge
    if token:
        assert token not in await resp.text()
        assert token not in challenge
    return body


# --- no usable bearer credentials ---------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer    ",
        "Basic dXNlcjpwYXNzd29yZA==",
        "Token abc.def.ghi",
        "Bearer garbage",
        "Bearer a.b.c",
        "Bearer ....",
        "Bearer " + "x" * 2000,
    ],
    ids=[
        "missing",
        "empty",
        "scheme-only",
        "blank-token",
        "basic",
        "token-scheme",
        "garbage",
        "dots",
        "only-dots",
        "long-garbage",
    ],
)
async def test_missing_or_malformed_credentials_are_401(client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await client.get(URL, headers=headers)
    await assert_unauthenticated(resp)


async def test_a_valid_token_under_another_scheme_is_401(client, make_token, account):
    token = make_token(account)
    resp = await client.get(URL, headers={"Authorization": f"Token {token}"})
    body = await assert_unauthenticated(resp, token)
    assert "Bearer" in body["message"]


@pytest.mark.parametrize("second", ["valid", "invalid", "same"])
async def test_two_authorization_headers_are_401(client, make_token, account, db, second):
    """An ambiguous credential is refused, whichever of the two would have verified."""
    token = make_token(account)
    other = {"valid": make_token("acct_other"), "invalid": "not-a-token", "same": token}[second]
    for method, body in (("GET", None), ("POST", {"contact_id": "c1"})):
        resp = await client.request(
            method,
            URL,
            json=body,
            headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {other}")],
        )
        body = await assert_unauthenticated(resp, token)
        assert "one Authorization header" in body["message"]
    assert await db.fetchval("select count(*) from conversations") == 0


async def test_a_missing_token_is_challenged_without_an_error_code(client):
    resp = await client.get(URL)
    await assert_unauthenticated(resp)
    assert "error=" not in resp.headers["WWW-Authenticate"]


async def test_the_scheme_is_case_insensitive(client, make_token, account):
    resp = await client.get(URL, headers={"Authorization": f"bearer {make_token(account)}"})
    assert resp.status == 200


async def test_writes_without_a_token_are_401_and_change_nothing(client, db):
    for method in WRITE_METHODS:
        path = URL if method == "POST" else f"{URL}/0000000000000000"
        resp = await client.request(method, path, json={"contact_id": "c1"})
        await assert_unauthenticated(resp)
    assert await db.fetchval("select count(*) from conversations") == 0
    assert await db.fetchval("select count(*) from outbox") == 0


# --- tokens that must not be trusted ------------------------------------------------------------

# Each builds a token that the default settings (one HS256 secret, no aud/iss) must refuse.
BAD_TOKENS = {
    "tampered-payload": lambda: tampered("acct_other"),
    "wrong-secret": lambda: hs256(claims(), OTHER_SECRET),
    "short-secret": lambda: hs256(claims(), "short"),
    "expired": lambda: hs256(claims(ttl=-1)),
    "expires-now": lambda: hs256(claims(ttl=0)),
    "missing-exp": lambda: hs256({k: v for k, v in claims().items() if k != "exp"}),
    "null-exp": lambda: hs256({**claims(), "exp": None}),
    "non-numeric-exp": lambda: hs256({**claims(), "exp": "tomorrow"}),
    "missing-sub": lambda: hs256({k: v for k, v in claims().items() if k != "sub"}),
    "empty-sub": lambda: hs256(claims("")),
    "numeric-sub": lambda: hs256(claims(12345)),
    "long-sub": lambda: hs256(claims("a" * (MAX_ACCOUNT_ID_LENGTH + 1))),
    "not-yet-valid": lambda: hs256(claims(nbf=int(time.time()) + 3600)),
    "scope-not-a-string": lambda: hs256(claims(scope=ALL_SCOPES)),
    "alg-none": lambda: handmade({"alg": "none", "typ": "JWT"}, claims()),
    "alg-None": lambda: handmade({"alg": "None", "typ": "JWT"}, claims()),
    "alg-NONE-signed": lambda: handmade({"alg": "NONE"}, claims(), TEST_SECRET.encode()),
    "alg-missing": lambda: handmade({"typ": "JWT"}, claims(), TEST_SECRET.encode()),
    "alg-not-a-string": lambda: handmade({"alg": ["HS256"]}, claims(), TEST_SECRET.encode()),
    "hs256-empty-signature": lambda: handmade({"alg": "HS256", "typ": "JWT"}, claims()),
    "hs512-not-allowed": lambda: jwt.encode(claims(), TEST_SECRET, algorithm="HS512"),
    "rs256-without-keys": lambda: handmade({"alg": "RS256"}, claims(), TEST_SECRET.encode()),
    "payload-not-json": lambda: f"{segment({'alg': 'HS256'})}.{b64url(b'not json')}.c2ln",
}


@pytest.mark.parametrize("make_bad_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_untrusted_tokens_are_401(client, db, make_bad_token):
    token = make_bad_token()
    for method, path in [("GET", URL), ("POST", URL)]:
        resp = await client.request(method, path, json={"contact_id": "c1"}, headers=bearer(token))
        await assert_unauthenticated(resp, token)
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert await db.fetchval("select count(*) from conversations") == 0


@pytest.mark.parametrize("make_bad_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_verifier_refuses_untrusted_tokens(make_bad_token):
    token = make_bad_token()
    with pytest.raises(InvalidToken) as raised:
        verifier().verify(token)
    assert token not in str(raised.value)


@pytest.mark.parametrize(
    "sub",
    ["acct\x00evil", "acct\ud800"],
    ids=["nul", "lone-surrogate"],
)
async def test_a_subject_the_database_cannot_hold_is_401_not_500(client, sub):
    # A signed token can still carry an account id that no text column can store.
    token = jwt.encode(claims(sub), TEST_SECRET, algorithm="HS256")
    resp = await client.get(URL, headers=bearer(token))
    await assert_unauthenticated(resp, token)


def test_verifier_messages_say_why():
    check = verifier()
    cases = {
        hs256(claims(ttl=-1)): "expired",
        hs256({k: v for k, v in claims().items() if k != "exp"}): "exp",
        hs256({k: v for k, v in claims().items() if k != "sub"}): "sub",
        hs256(claims(), OTHER_SECRET): "signature",
        handmade({"alg": "none"}, claims()): "algorithm",
        "garbage": "malformed",
    }
    for token, word in cases.items():
        with pytest.raises(InvalidToken, match=word):
            check.verify(token)


def test_verifier_returns_the_account_and_scopes():
    token = hs256(claims("acct_42", scope=f"  {READ_SCOPE}\t{WRITE_SCOPE}  extra "))
    assert verifier().verify(token) == Principal(
        "acct_42", frozenset({READ_SCOPE, WRITE_SCOPE, "extra"})
    )
    assert verifier().verify(hs256(claims("acct_42", scope=""))).scopes == frozenset()
    no_scope = {k: v for k, v in claims("acct_42").items() if k != "scope"}
    assert verifier().verify(hs256(no_scope)).scopes == frozenset()


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_time_claim_too_large_for_a_number_is_401(claim):
    # Python's JSON reads Infinity (and 1e999) as inf, which no int can hold.
    token = handmade(
        {"alg": "HS256", "typ": "JWT"}, {**claims(), claim: float("inf")}, TEST_SECRET.encode()
    )
    with pytest.raises(InvalidToken, match=f"{claim} claim is not a number"):
        verifier().verify(token)


def test_leeway_accepts_a_just_expired_token():
    token = hs256(claims(ttl=-5))
    with pytest.raises(InvalidToken, match="expired"):
        verifier().verify(token)
    assert verifier(leeway_seconds=60).verify(token).account_id == "acct_1"


# --- audience and issuer ------------------------------------------------------------------------


async def test_a_token_with_an_audience_is_accepted_when_none_is_configured(client):
    # Decided by the code: without JWT_AUDIENCE the `aud` claim is not checked at all.
    token = hs256(claims(aud="some-other-service", iss="anyone"))
    resp = await client.get(URL, headers=bearer(token))
    assert resp.status == 200
    assert token not in await resp.text()


async def test_audience_and_issuer_are_checked_when_configured(auth_client):
    client = await auth_client(audience="conversations-api", issuer="https://id.example.test")
    good = {"aud": "conversations-api", "iss": "https://id.example.test"}
    accepted = [
        hs256(claims(**good)),
        hs256(claims(**{**good, "aud": ["billing", "conversations-api"]})),
    ]
    refused = [
        hs256(claims(**{**good, "aud": "billing"})),
        hs256(claims(**{**good, "aud": ["billing", "search"]})),
        hs256(claims(iss=good["iss"])),
        hs256(claims(**{**good, "iss": "https://evil.example.test"})),
        hs256(claims(aud=good["aud"])),
        handmade({"alg": "HS256"}, claims(**{**good, "iss": 7}), TEST_SECRET.encode()),
    ]
    for token in accepted:
        resp = await client.get(URL, headers=bearer(token))
        assert resp.status == 200, await resp.text()
    for token in refused:
        resp = await client.get(URL, headers=bearer(token))
        await assert_unauthenticated(resp, token)


def test_mint_token_carries_the_configured_audience_and_issuer():
    auth = AuthSettings((TEST_SECRET,), (), "conversations-api", "https://id.example.test", 0)
    token = mint_token(auth, "acct_9", [READ_SCOPE], 60)
    assert TokenVerifier(auth).verify(token) == Principal("acct_9", frozenset({READ_SCOPE}))
    unverified = jwt.decode(token, options={"verify_signature": False})
    assert unverified["aud"] == "conversations-api"
    assert unverified["iss"] == "https://id.example.test"
    assert unverified["exp"] - unverified["iat"] == 60


def test_mint_token_needs_an_hs256_secret(rsa_key):
    auth = AuthSettings((), (public_pem(rsa_key),), None, None, 0)
    with pytest.raises(ConfigError, match="JWT_HS256_SECRETS"):
        mint_token(auth, "acct_9", [READ_SCOPE], 60)


# --- public keys, rotation and algorithm confusion ----------------------------------------------


async def test_rs256_and_es256_tokens_verify_with_configured_public_keys(
    auth_client, rsa_key, ec_key
):
    client = await auth_client(public_keys_pem=(public_pem(rsa_key), public_pem(ec_key)))
    rs = jwt.encode(claims("acct_rs"), rsa_key, algorithm="RS256")
    es = jwt.encode(claims("acct_es"), ec_key, algorithm="ES256")
    for token in (rs, es):
        resp = await client.post(URL, json={"contact_id": "c1"}, headers=bearer(token))
        assert resp.status == 201, await resp.text()
        assert token not in await resp.text()
    # Each token spoke for its own account: two accounts, one conversation each.
    for token in (rs, es):
        resp = await client.get(URL, headers=bearer(token))
        assert len((await resp.json())["data"]) == 1


async def test_tokens_from_unknown_private_keys_are_401(auth_client, rsa_key, rsa_key_2, ec_key):
    client = await auth_client(public_keys_pem=(public_pem(rsa_key), public_pem(ec_key)))
    strangers = [
        jwt.encode(claims(), rsa_key_2, algorithm="RS256"),
        jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        # A good RSA signature under a header that names an algorithm we do not take.
        jwt.encode(claims(), rsa_key, algorithm="RS512"),
        jwt.encode(claims(), rsa_key, algorithm="PS256"),
    ]
    for token in strangers:
        resp = await client.get(URL, headers=bearer(token))
        await assert_unauthenticated(resp, token)


async def test_two_hs256_secrets_both_verify(auth_client):
    client = await auth_client(hs256_secrets=(OTHER_SECRET, TEST_SECRET))
    old, new = hs256(claims("acct_r"), TEST_SECRET), hs256(claims("acct_r"), OTHER_SECRET)
    resp = await client.post(URL, json={"contact_id": "c1"}, headers=bearer(old))
    assert resp.status == 201
    created = await resp.json()
    resp = await client.get(f"{URL}/{created['id']}", headers=bearer(new))
    assert resp.status == 200
    assert await resp.json() == created
    third = hs256(claims("acct_r"), "a-third-secret-0123456789-abcdefghijk")
    await assert_unauthenticated(await client.get(URL, headers=bearer(third)), third)


async def test_an_expired_token_is_401_whichever_rotating_secret_signed_it(auth_client):
    client = await auth_client(hs256_secrets=(OTHER_SECRET, TEST_SECRET))
    token = hs256(claims(ttl=-1), TEST_SECRET)
    body = await assert_unauthenticated(await client.get(URL, headers=bearer(token)), token)
    assert "expired" in body["message"]


def test_two_rsa_public_keys_both_verify(rsa_key, rsa_key_2):
    v = verifier(hs256_secrets=(), public_keys_pem=(public_pem(rsa_key), public_pem(rsa_key_2)))
    for key in (rsa_key, rsa_key_2):
        assert v.verify(jwt.encode(claims("acct_k"), key, algorithm="RS256")).account_id == "acct_k"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken, match="signature"):
        v.verify(jwt.encode(claims(), stranger, algorithm="RS256"))


@pytest.mark.parametrize("with_hs256_secret", [True, False], ids=["with-secret", "keys-only"])
async def test_algorithm_confusion_is_401(auth_client, rsa_key, ec_key, with_hs256_secret):
    pems = (public_pem(rsa_key), public_pem(ec_key))
    client = await auth_client(
        hs256_secrets=(TEST_SECRET,) if with_hs256_secret else (), public_keys_pem=pems
    )
    for pem in pems:
        # The attacker knows the public key and uses its PEM text as an HMAC secret.
        for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "RS256"}, {"alg": "ES256"}):
            token = handmade(header, claims(), pem.encode())
            resp = await client.get(URL, headers=bearer(token))
            await assert_unauthenticated(resp, token)


def test_keys_of_other_types_are_refused_at_start_up():
    p384 = public_pem(ec.generate_private_key(ec.SECP384R1()))
    ed = public_pem(ed25519.Ed25519PrivateKey.generate())
    for pem in (p384, ed):
        with pytest.raises(ConfigError, match="only RSA and EC P-256"):
            verifier(public_keys_pem=(pem,))


# --- scopes -------------------------------------------------------------------------------------


async def assert_insufficient_scope(resp, scope: str, token: str) -> None:
    body = await error_body(resp, 403, "permission_error")
    assert scope in body["message"]
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="insufficient_scope"' in challenge
    assert f'scope="{scope}"' in challenge
    assert token not in await resp.text()


async def test_a_read_only_token_reads_but_cannot_write(client, headers, make_token, account, db):
    resp = await client.post(URL, json={"contact_id": "c1"}, headers=headers)
    created = await resp.json()
    etag = resp.headers["ETag"]
    item = f"{URL}/{created['id']}"
    reader = make_token(account, [READ_SCOPE])

    resp = await client.get(URL, headers=bearer(reader))
    assert resp.status == 200
    assert (await resp.json())["data"] == [created]
    resp = await client.get(item, headers=bearer(reader))
    assert resp.status == 200
    assert await resp.json() == created

    for method, path in [("POST", URL), ("PUT", item), ("PATCH", item), ("DELETE", item)]:
        body = {"contact_id": "c2"} if method == "POST" else {"is_muted": True}
        resp = await client.request(method, path, json=body, headers=bearer(reader))
        await assert_insufficient_scope(resp, WRITE_SCOPE, reader)

    resp = await client.get(item, headers=headers)
    assert await resp.json() == created
    assert resp.headers["ETag"] == etag
    assert await db.fetchval("select count(*) from conversations") == 1
    assert await db.fetchval("select count(*) from outbox") == 1


async def test_a_write_only_token_writes_but_cannot_read(client, make_token, account):
    writer = make_token(account, [WRITE_SCOPE])
    resp = await client.post(URL, json={"contact_id": "c1"}, headers=bearer(writer))
    assert resp.status == 201
    item = f"{URL}/{(await resp.json())['id']}"
    for path in (URL, item):
        resp = await client.get(path, headers=bearer(writer))
        await assert_insufficient_scope(resp, READ_SCOPE, writer)
    resp = await client.patch(item, json={"is_muted": True}, headers=bearer(writer))
    assert resp.status == 200
    resp = await client.delete(item, headers=bearer(writer))
    assert resp.status == 200


@pytest.mark.parametrize(
    "scopes",
    [[], ["conversations"], ["conversations:readwrite"], ["Conversations:Read", "x:write"]],
    ids=["none", "prefix", "joined", "wrong-case"],
)
async def test_scopes_must_match_exactly(client, make_token, account, scopes):
    token = make_token(account, scopes)
    await assert_insufficient_scope(await client.get(URL, headers=bearer(token)), READ_SCOPE, token)
    resp = await client.post(URL, json={"contact_id": "c1"}, headers=bearer(token))
    await assert_insufficient_scope(resp, WRITE_SCOPE, token)


async def test_authentication_comes_before_routing_and_validation(client, make_token, account):
    # An unauthenticated caller learns nothing about paths or bodies.
    resp = await client.get(f"{URL}/nope/deeper")
    await assert_unauthenticated(resp)
    resp = await client.post(URL, data=b"not json", headers={"Content-Type": "text/plain"})
    await assert_unauthenticated(resp)
    reader = make_token(account, [READ_SCOPE])
    resp = await client.post(URL, data=b"not json", headers=bearer(reader))
    await assert_insufficient_scope(resp, WRITE_SCOPE, reader)


# --- tokens never leak --------------------------------------------------------------------------


async def test_no_token_appears_in_bodies_headers_or_logs(client, make_token, account, caplog):
    caplog.set_level(logging.DEBUG)
    good = make_token(account)
    bad = hs256(claims(account), OTHER_SECRET)
    reader = make_token(account, [READ_SCOPE])
    exchanges = [
        ("POST", URL, good, {"contact_id": "c1"}),
        ("POST", URL, good, {"contact_id": "c1", "token": good}),
        ("GET", URL, good, None),
        ("GET", f"{URL}?limit=0", good, None),
        ("GET", f"{URL}/0000000000000000", good, None),
        ("GET", URL, bad, None),
        ("POST", URL, reader, {"contact_id": "c2"}),
        ("DELETE", URL, good, None),
    ]
    for method, path, token, body in exchanges:
        resp = await client.request(method, path, json=body, headers=bearer(token))
        text = await resp.text()
        assert resp.status in (200, 201, 401, 403, 404, 405, 422)
        for secret in (good, bad, reader):
            assert secret not in text
            assert all(secret not in value for value in resp.headers.values())
    for secret in (good, bad, reader):
        assert secret not in caplog.text


# --- the verified-token cache -------------------------------------------------------------------


class Clock:
    """Unix time that moves only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_verified_token_is_not_verified_again_until_it_expires(auth_settings, monkeypatch):
    clock = Clock(1_700_000_000.0)
    verifier = TokenVerifier(auth_settings, clock=clock)  # leeway 0 in the test settings
    expires = 1_700_000_002
    claims = {"sub": "acct_c", "scope": READ_SCOPE, "exp": expires}
    token = jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    assert verifier.verify(token) == verifier.verify(token)
    clock.now = expires - 0.001
    assert verifier.verify(token).account_id == "acct_c"
    assert len(calls) == 1
    # At its exp the cached entry is gone and the token is checked (and refused) again.
    clock.now = expires
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)
    assert len(calls) == 2
    assert token not in verifier._cache


def test_the_verifier_checks_times_against_its_clock(auth_settings):
    """exp, nbf and iat are compared with the injected clock, not the system's."""
    y2k = 946_684_800
    token = hs256({"sub": "acct_t", "iat": y2k, "nbf": y2k, "exp": y2k + 60})
    assert TokenVerifier(auth_settings, clock=Clock(y2k + 59)).verify(token).account_id == "acct_t"
    for now, why in ((y2k - 1, "not valid yet"), (y2k + 60, "expired")):
        with pytest.raises(InvalidToken, match=why):
            TokenVerifier(auth_settings, clock=Clock(now)).verify(token)
    leeway = dataclasses.replace(auth_settings, leeway_seconds=5)
    assert TokenVerifier(leeway, clock=Clock(y2k + 64)).verify(token).account_id == "acct_t"
    assert TokenVerifier(leeway, clock=Clock(y2k - 5)).verify(token).account_id == "acct_t"


def test_a_tampered_token_is_never_served_from_the_cache(auth_settings):
    verifier = TokenVerifier(auth_settings)
    token = mint_token(auth_settings, "acct_c", [READ_SCOPE], 60)
    verifier.verify(token)
    header, payload, signature = token.split(".")
    forged = ".".join(
        [header, payload, signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")]
    )
    with pytest.raises(InvalidToken):
        verifier.verify(forged)


def test_the_cache_is_bounded(auth_settings, monkeypatch):
    monkeypatch.setattr("service.api.auth.TOKEN_CACHE_SIZE", 5)
    verifier = TokenVerifier(auth_settings)
    tokens = [mint_token(auth_settings, f"acct_{n}", [READ_SCOPE], 60) for n in range(12)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._cache) == 5
    assert set(verifier._cache) == set(tokens[-5:])


def test_the_cache_keeps_the_recently_used_tokens(auth_settings, monkeypatch):
    monkeypatch.setattr("service.api.auth.TOKEN_CACHE_SIZE", 3)
    verifier = TokenVerifier(auth_settings)
    tokens = [mint_token(auth_settings, f"acct_{n}", [READ_SCOPE], 60) for n in range(4)]
    for token in tokens[:3]:
        verifier.verify(token)
    verifier.verify(tokens[0])  # used again: the least recently used is now tokens[1]
    verifier.verify(tokens[3])
    assert set(verifier._cache) == {tokens[0], tokens[2], tokens[3]}
