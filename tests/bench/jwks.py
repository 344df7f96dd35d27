"""Scenario 10's identity provider: an RSA key, its JWKS served on a loopback port from the
harness's own event loop, and RS256 and HS256 tokens (both for the same audience) for the seeded
accounts, each kind in a data directory of its own (the wrk scripts read tokens.txt and
targets.txt from BENCH_DATA_DIR)."""

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from service.api.auth import READ_SCOPE, WRITE_SCOPE, mint_token
from service.settings import load_auth_settings
from tests.bench.processes import free_port
from tests.bench.seed import Dataset

AUDIENCE = "conversations-bench"
KID = "bench-1"
TOKEN_TTL_SECONDS = 6 * 3600


@dataclasses.dataclass(frozen=True)
class Provider:
    """The JWKS URL the service is given, and the dataset with tokens of each kind."""

    jwks_url: str
    rs256: Dataset  # tokens signed by the JWKS's key
    hs256: Dataset  # tokens signed by the HS256 secret, for the same audience
    requests: list[int]  # one entry per JWKS fetch, so the run can say how many there were

    def service_env(self) -> dict[str, str]:
        """The service's token settings: the JWKS and the HS256 secret (from the environment)
        side by side, so that one server answers both kinds; the audience enforced."""
        return {"JWT_JWKS_URL": self.jwks_url, "JWT_AUDIENCE": AUDIENCE}


@contextlib.asynccontextmanager
async def jwks_provider(dataset: Dataset, data_dir: Path) -> AsyncIterator[Provider]:
    """A JWKS server on 127.0.0.1, and `dataset` with RS256 and HS256 tokens for its accounts
    written under `data_dir`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": KID, "use": "sig"}
    document = json.dumps({"keys": [public]}).encode()
    requests: list[int] = []

    async def jwks(request: web.Request) -> web.Response:
        requests.append(1)
        return web.Response(body=document, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    auth = dataclasses.replace(load_auth_settings(), audience=AUDIENCE)
    scopes = [READ_SCOPE, WRITE_SCOPE]
    try:
        yield Provider(
            f"http://127.0.0.1:{port}/jwks.json",
            rs256=_with_tokens(dataset, data_dir / "rs256", lambda a: _rs256(key, a)),
            hs256=_with_tokens(
                dataset,
                data_dir / "hs256",
                lambda a: mint_token(auth, a, scopes, TOKEN_TTL_SECONDS),
            ),
            requests=requests,
        )
    finally:
        await runner.cleanup()


def _rs256(key: rsa.RSAPrivateKey, account: str) -> str:
    now = int(time.time())
    claims = {
        "sub": account,
        "aud": AUDIENCE,
        "scope": f"{READ_SCOPE} {WRITE_SCOPE}",
        "iat": now,
        "exp": now + TOKEN_TTL_SECONDS,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


def _with_tokens(dataset: Dataset, data_dir: Path, token: Callable[[str], str]) -> Dataset:
    """`dataset` with a token of `token(account)` per account, its files under `data_dir`."""
    tokens = {account: token(account) for account in dataset.accounts}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("targets.txt", "cursors.txt", "activity_cursors.txt"):
        shutil.copyfile(dataset.data_dir / name, data_dir / name)
    (data_dir / "tokens.txt").write_text("".join(f"{a} {tokens[a]}\n" for a in dataset.accounts))
    return dataclasses.replace(dataset, tokens=tokens, data_dir=data_dir)
