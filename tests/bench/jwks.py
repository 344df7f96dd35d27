"""Scenario 10's identity provider: an RSA key, its JWKS served on a loopback port from the
harness's own event loop, and RS256 tokens for the seeded accounts in a data directory of their
own (the wrk scripts read tokens.txt and targets.txt from BENCH_DATA_DIR)."""

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from service.api.auth import READ_SCOPE, WRITE_SCOPE
from tests.bench.processes import free_port
from tests.bench.seed import Dataset

AUDIENCE = "conversations-bench"
KID = "bench-1"
TOKEN_TTL_SECONDS = 6 * 3600


@dataclasses.dataclass(frozen=True)
class Provider:
    """The JWKS URL the service is given, and the dataset with RS256 tokens."""

    jwks_url: str
    dataset: Dataset
    requests: list[int]  # one entry per JWKS fetch, so the run can say how many there were

    def service_env(self) -> dict[str, str]:
        """The service's token settings: keys from the JWKS only, audience enforced."""
        return {
            "JWT_JWKS_URL": self.jwks_url,
            "JWT_AUDIENCE": AUDIENCE,
            "JWT_HS256_SECRETS": "",
        }


@contextlib.asynccontextmanager
async def jwks_provider(dataset: Dataset, data_dir: Path) -> AsyncIterator[Provider]:
    """A JWKS server on 127.0.0.1, and `dataset` with RS256 tokens written under `data_dir`."""
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
    try:
        yield Provider(
            f"http://127.0.0.1:{port}/jwks.json", _rs256_dataset(dataset, key, data_dir), requests
        )
    finally:
        await runner.cleanup()


def _rs256_dataset(dataset: Dataset, key: rsa.RSAPrivateKey, data_dir: Path) -> Dataset:
    now = int(time.time())
    tokens = {
        account: jwt.encode(
            {
                "sub": account,
                "aud": AUDIENCE,
                "scope": f"{READ_SCOPE} {WRITE_SCOPE}",
                "iat": now,
                "exp": now + TOKEN_TTL_SECONDS,
            },
            key,
            algorithm="RS256",
            headers={"kid": KID},
        )
        for account in dataset.accounts
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("targets.txt", "cursors.txt", "activity_cursors.txt"):
        shutil.copyfile(dataset.data_dir / name, data_dir / name)
    (data_dir / "tokens.txt").write_text("".join(f"{a} {tokens[a]}\n" for a in dataset.accounts))
    return dataclasses.replace(dataset, tokens=tokens, data_dir=data_dir)
