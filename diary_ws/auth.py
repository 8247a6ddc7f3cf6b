"""Who may send and who may listen: API keys, listener JWTs, the proxy's user header, allowed origins.

A leaf helper: plain values in (header values, the query string, addresses), a result or a `DiaryWSError`
out. Secrets are read once, at start, by `Security.from_settings`; a bad one is a `SettingError`, so the
command line stops with exit 2 and one line. Nothing here ever puts a key or a token in a message or a log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from diary_ws.errors import BadRequest, Forbidden, Unauthorized
from diary_ws.settings import SettingError, Settings, env_name

log = logging.getLogger("diary_ws.auth")

# Where diary_ws.server keeps the address of the direct peer, before uvicorn's proxy-headers middleware
# replaces scope["client"] with the X-Forwarded-For address (see `direct_peer`).
PEER_SCOPE_KEY = "diary_ws.peer"

MIN_API_KEY_CHARS = 16
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 §3.2: an HMAC key at least as long as the hash
MIN_RSA_BITS = 2048
MAX_TOKEN_CHARS = 8192  # a JWT is a few hundred bytes; refuse megabytes before any parsing
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


# --- senders: API keys -------------------------------------------------------------------------------------


class ApiKeys:
    """The sender keys, kept as SHA-256 digests so every comparison has the same length and cost."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None, x_api_key: str | None) -> int:
        """The index of the key the request carries (either header form), or Unauthorized."""
        presented = []
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("the Authorization header must be 'Bearer <API key>'", invalid=True)
            presented.append(value.strip())
        if x_api_key is not None:
            presented.append(x_api_key.strip())
        if not presented:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        found = [self._match(value) for value in presented]
        if None in found:
            raise Unauthorized("the API key is not valid", invalid=True)
        if len(set(found)) > 1:
            raise Unauthorized("Authorization and X-API-Key carry different keys; send one", invalid=True)
        index = found[0]
        assert index is not None  # narrowed above: None is not in found
        return index

    def _match(self, value: str) -> int | None:
        digest = hashlib.sha256(value.encode("utf-8", "replace")).digest()
        match = None
        for index, known in enumerate(self._digests):  # every key is compared: no early exit to time
            if hmac.compare_digest(digest, known) and match is None:
                match = index
        return match


def parse_api_keys(raw: str, label: str) -> ApiKeys:
    """A comma (or newline) separated list of keys; each at least 16 visible ASCII characters."""
    keys = [item.strip() for item in re.split(r"[,\n]", raw) if item.strip()]
    if not keys:
        raise SettingError(label, "holds no key")
    for number, key in enumerate(keys, 1):
        if len(key) < MIN_API_KEY_CHARS or not _VISIBLE_ASCII.fullmatch(key):
            raise SettingError(
                label,
                f"key number {number} must be at least {MIN_API_KEY_CHARS} visible ASCII characters without "
                "spaces (for example the output of `openssl rand -hex 32`)",
            )
    return ApiKeys(keys)


# --- listeners: JWTs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified listener token says."""

    subject: str
    expires_at: float  # seconds since the epoch


# PyJWT's exceptions -> what the 401 says. The token itself is never echoed.
_TOKEN_PROBLEMS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired: get a new one"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf is in the future)"),
    (jwt.InvalidAudienceError, "the token's audience (aud) is not this service's"),
    (jwt.InvalidIssuerError, "the token's issuer (iss) is not the one this service trusts"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not allowed"),
    (jwt.InvalidSignatureError, "the token's signature is not valid"),
    (jwt.DecodeError, "the token is malformed: expected a JWT such as xxxxx.yyyyy.zzzzz"),
)


class JwtVerifier:
    """Verifies listener tokens with one key and an algorithm allowlist chosen from the key's type.

    The allowlist never comes from the token's header: an RSA key takes only RS256 and a secret only HS256,
    so `alg: none` and the HS256-signed-with-the-public-key confusion fail before any signature math.
    """

    __slots__ = ("key", "algorithms", "audience", "issuer")

    def __init__(self, key: Any, algorithms: tuple[str, ...], audience: str | None, issuer: str | None) -> None:
        self.key = key
        self.algorithms = algorithms
        self.audience = audience
        self.issuer = issuer

    def verify(self, token: str) -> Claims:
        """The claims of a valid token, or Unauthorized saying what is wrong with it."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized(f"the token is over {MAX_TOKEN_CHARS} characters", invalid=True)
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                # Without JWT_AUDIENCE an `aud` in the token is not checked (PyJWT would refuse it outright).
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token lacks the {exc.claim} claim", invalid=True) from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(_token_problem(exc), invalid=True) from None
        except (ValueError, TypeError, OverflowError):  # a signed but absurd claim, such as exp 1e400
            raise Unauthorized("the token is not valid", invalid=True) from None
        subject = claims["sub"]
        if not isinstance(subject, str):  # PyJWT checks this too; kept so the type is sure
            raise Unauthorized("the token's sub claim must be a string", invalid=True)
        return Claims(subject, float(claims["exp"]))


def _token_problem(exc: Exception) -> str:
    for kind, message in _TOKEN_PROBLEMS:
        if isinstance(exc, kind):
            return message
    return "the token is not valid"


def load_public_key(path: str, label: str) -> tuple[Any, tuple[str, ...]]:
    """A PEM public key (or certificate) and the one algorithm its type allows."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingError(label, f"cannot be read: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SettingError(label, "must be a PEM public key (-----BEGIN PUBLIC KEY-----) or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SettingError(label, f"holds a {key.key_size}-bit RSA key; use at least {MIN_RSA_BITS} bits")
        return key, ("RS256",)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGORITHMS:
        return key, (EC_ALGORITHMS[key.curve.name],)
    raise SettingError(label, "must hold an RSA key (RS256) or an EC key on P-256, P-384 or P-521 (ES256/384/512)")


def check_hs256_secret(secret: str, label: str) -> bytes:
    """The secret as bytes, refused when shorter than the hash (brute-forcing a short one is cheap)."""
    data = secret.encode()
    if len(data) < MIN_HS256_SECRET_BYTES:
        raise SettingError(label, f"must be at least {MIN_HS256_SECRET_BYTES} bytes (try `openssl rand -hex 32`)")
    return data


def token_from(query_string: bytes, authorization: str | None) -> str | None:
    """The listener's token: `?token=` or `Authorization: Bearer`; BadRequest when sent twice."""
    try:
        found = [value for name, value in parse_qsl(query_string.decode("utf-8"), keep_blank_values=True)
                 if name == "token"]  # fmt: skip
    except UnicodeDecodeError:
        raise BadRequest("query string is not valid UTF-8") from None
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", invalid=True)
        found.append(value.strip())
    if len(found) > 1:
        raise BadRequest("send the token once: either ?token= or Authorization: Bearer")
    return found[0] if found else None


# --- proxies and origins -----------------------------------------------------------------------------------


class Proxies:
    """TRUSTED_PROXIES: the peers whose X-Forwarded-For and user header are believed."""

    __slots__ = ("_any", "_networks")

    def __init__(self, items: Sequence[str]) -> None:
        self._any = "*" in items
        self._networks = tuple(ipaddress.ip_network(item, strict=False) for item in items if item != "*")

    def trusts(self, host: str | None) -> bool:
        """Whether a direct peer's address is one of the trusted proxies."""
        if self._any:
            return True
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # a unix socket path or a name: not an address we were told to trust
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener shows 127.0.0.1 as ::ffff:127.0.0.1
        return any(address in network for network in self._networks)


def direct_peer(scope: Mapping[str, Any]) -> str | None:
    """The address of the peer on the other end of the TCP connection: the proxy, when there is one.

    uvicorn's proxy-headers middleware overwrites scope["client"] with the X-Forwarded-For address, so the
    direct peer is gone by the time the app runs. diary_ws.server records it first under PEER_SCOPE_KEY;
    in a server without that hook, scope["client"] is the direct peer as long as that server does not
    rewrite it (do not turn on its proxy headers; set TRUSTED_PROXIES instead).
    """
    peer = scope.get(PEER_SCOPE_KEY) or scope.get("client")
    return str(peer[0]) if peer else None


def client_address(scope: Mapping[str, Any]) -> str:
    """The client's address for rate limits: the X-Forwarded-For one when a trusted proxy sent it."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


_DEFAULT_PORT = re.compile(r"^(http://[^/]+):80$|^(https://[^/]+):443$")


def normalise_origin(origin: str) -> str:
    """Lower case, no trailing slash and no default port, as browsers send and settings store it."""
    text = origin.strip().rstrip("/").lower()
    m = _DEFAULT_PORT.match(text)
    return (m.group(1) or m.group(2)) if m else text


# --- all of it, per app ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Security:
    """Everything the security settings decide, built once per app and kept on `app.state.security`."""

    api_keys: ApiKeys | None = None
    jwt: JwtVerifier | None = None
    user_header: str | None = None
    proxies: Proxies = field(default_factory=lambda: Proxies(()))
    origins: frozenset[str] | None = None  # None: any origin

    @classmethod
    def from_settings(cls, settings: Settings) -> Security:
        """Read the secrets (variables or files) and keys; SettingError when one is unusable."""
        if settings.user_header is not None and "*" in settings.trusted_proxies:
            log.warning("USER_HEADER is trusted from every peer (TRUSTED_PROXIES=*): only safe if no client can "
                        "reach this port except through the proxy")  # fmt: skip
        return cls(
            api_keys=_api_keys(settings),
            jwt=_jwt_verifier(settings),
            user_header=settings.user_header,
            proxies=Proxies(settings.trusted_proxies),
            origins=None if settings.allowed_origins == ("*",) else frozenset(settings.allowed_origins),
        )

    def sender(self, authorization: str | None, x_api_key: str | None) -> str | None:
        """The sender's key label (`key-1`, ...) when keys are configured, None when anyone may send."""
        if self.api_keys is None:
            return None
        return f"key-{self.api_keys.identify(authorization, x_api_key) + 1}"

    def check_origin(self, origin: str | None) -> None:
        """Forbidden for a browser handshake from an origin not in ALLOWED_ORIGINS. No Origin: not a browser."""
        if origin is None or self.origins is None:
            return
        if normalise_origin(origin) not in self.origins:
            shown = origin if len(origin) <= 100 else origin[:100] + "..."
            raise Forbidden(f"origin {shown!r} is not allowed (ALLOWED_ORIGINS)")

    def listener_auth(self, user_id: str, token: str | None, header: str | None) -> float | None:
        """Check a listener's credentials for `user_id`; the token's expiry when a token was used.

        `token` only counts when JWTs are configured, and `header` (the USER_HEADER value) only when the
        caller has found that the direct peer is a trusted proxy. Either one is enough; each one sent must
        be valid: 401 when invalid or when neither is sent, 403 when it names another user.
        """
        if self.jwt is None and self.user_header is None:
            return None
        expires_at = None
        presented = False
        if self.jwt is not None and token is not None:
            claims = self.jwt.verify(token)
            if claims.subject != user_id:
                raise Forbidden(f"the token is for another user, not {user_id}")
            expires_at, presented = claims.expires_at, True
        if self.user_header is not None and header is not None:
            if not header.strip():
                raise Unauthorized(f"the {self.user_header} header is empty", invalid=True)
            if header != user_id:
                raise Forbidden(f"the {self.user_header} header names another user, not {user_id}")
            presented = True
        if not presented:
            raise Unauthorized(self._how_to_authenticate())
        return expires_at

    def _how_to_authenticate(self) -> str:
        ways = []
        if self.jwt is not None:
            ways.append("a token in ?token= or 'Authorization: Bearer <token>'")
        if self.user_header is not None:
            ways.append(f"the {self.user_header} header from a trusted proxy")
        return "authentication required: send " + " or ".join(ways)


def _api_keys(settings: Settings) -> ApiKeys | None:
    if settings.api_key is not None:
        return parse_api_keys(settings.api_key, env_name("api_key"))
    if settings.api_key_file is not None:
        label = env_name("api_key_file")
        return parse_api_keys(_read_secret(settings.api_key_file, label), label)
    return None


def _jwt_verifier(settings: Settings) -> JwtVerifier | None:
    aud, iss = settings.jwt_audience, settings.jwt_issuer
    if settings.jwt_secret is not None:
        secret = check_hs256_secret(settings.jwt_secret, env_name("jwt_secret"))
        return JwtVerifier(secret, ("HS256",), aud, iss)
    if settings.jwt_secret_file is not None:
        label = env_name("jwt_secret_file")
        return JwtVerifier(
            check_hs256_secret(_read_secret(settings.jwt_secret_file, label), label), ("HS256",), aud, iss
        )
    if settings.jwt_public_key_file is not None:
        key, algorithms = load_public_key(settings.jwt_public_key_file, env_name("jwt_public_key_file"))
        return JwtVerifier(key, algorithms, aud, iss)
    return None


def _read_secret(path: str, label: str) -> str:
    try:
        # Secret mounts (Docker, Kubernetes) often end the file with a newline; it is not part of the secret.
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise SettingError(label, f"cannot be read: {why}") from None
