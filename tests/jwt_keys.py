"""Keys and hand-made tokens for the security tests, including the forged ones PyJWT refuses to make."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# 64 bytes: over the 32-byte minimum, and long enough that signing an HS512 token with it draws no warning
SECRET = "a-test-secret-that-is-long-enough-for-hs512-0123456789abcdefghij"


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_public_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(public_pem(key))
    return str(path)


def claims(sub: str = "alice", ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    """Claims valid for `ttl` seconds from now; `extra` adds or overrides (None removes)."""
    found: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **extra}
    return {k: v for k, v in found.items() if v is not None}


def sign(payload: dict[str, Any], key: Any, algorithm: str) -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """An `alg: none` token: header and payload, empty signature."""
    header = _b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    return f"{header}.{_b64(orjson.dumps(payload))}."


def hs256_forged_with(secret: bytes, payload: dict[str, Any]) -> str:
    """HS256 over arbitrary bytes, such as a server's RSA public key PEM (the key-confusion attack).

    PyJWT itself refuses to use a PEM as an HMAC secret, so the attacker's token is made by hand.
    """
    signing_input = f"{_b64(orjson.dumps({'alg': 'HS256', 'typ': 'JWT'}))}.{_b64(orjson.dumps(payload))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"
