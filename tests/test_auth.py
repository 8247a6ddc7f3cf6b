"""The auth helpers on their own: API keys, JWT verification, tokens, proxies, origins, secret loading."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from diary_ws.auth import (
    JwtVerifier,
    Proxies,
    Security,
    check_hs256_secret,
    direct_peer,
    load_public_key,
    normalise_origin,
    parse_api_keys,
    token_from,
)
from diary_ws.errors import BadRequest, DiaryWSError, Forbidden, Unauthorized
from diary_ws.settings import SettingError, Settings, from_env
from tests.jwt_keys import SECRET, claims, ec_key, hs256_forged_with, public_pem, rsa_key, sign, unsigned

KEY1 = "first-key-0123456789abcdef"
KEY2 = "second-key-0123456789abcdef"

# --- API keys ------------------------------------------------------------------------------------------------


def test_either_of_two_keys_in_either_header_form() -> None:
    keys = parse_api_keys(f"{KEY1}, {KEY2}", "K")
    assert keys.identify(f"Bearer {KEY1}", None) == 0
    assert keys.identify(f"bearer   {KEY2}", None) == 1
    assert keys.identify(None, KEY2) == 1
    assert keys.identify(f"Bearer {KEY1}", KEY1) == 0


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "invalid"),
    [
        (None, None, False),  # nothing sent: a plain challenge
        ("Bearer wrong-key-0123456789abcdef", None, True),
        (None, "wrong-key-0123456789abcdef", True),
        (f"Basic {KEY1}", None, True),  # the right key in the wrong scheme
        ("Bearer", None, True),
        (f"Bearer {KEY1[:-1]}", None, True),  # a prefix of a key
        (f"Bearer {KEY1}x", None, True),  # a key with more after it
        (f"Bearer {KEY1}", KEY2, True),  # two different keys at once
        (f"Bearer {KEY1}", "wrong", True),  # one right, one wrong
    ],
)
def test_bad_api_keys_are_401_with_a_challenge(authorization: str | None, x_api_key: str | None, invalid: bool) -> None:
    keys = parse_api_keys(f"{KEY1},{KEY2}", "K")
    with pytest.raises(Unauthorized) as caught:
        keys.identify(authorization, x_api_key)
    challenge = caught.value.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="diary-ws"')
    assert ('error="invalid_token"' in challenge) is invalid
    assert KEY1 not in caught.value.message
    assert KEY2 not in caught.value.message


@pytest.mark.parametrize("raw", ["", " , ", "short", f"{KEY1},short", "has a space in it 0123456789", "é" * 20])
def test_unusable_api_key_settings_are_refused(raw: str) -> None:
    with pytest.raises(SettingError) as caught:
        parse_api_keys(raw, "DIARY_WS_API_KEY")
    assert caught.value.name == "DIARY_WS_API_KEY"


def test_api_key_file_takes_newlines_and_commas(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY1}\n{KEY2},\n")
    security = Security.from_settings(Settings(api_key_file=str(path)))
    assert security.sender(None, KEY2) == "key-2"
    assert security.sender(f"Bearer {KEY1}", None) == "key-1"


def test_no_keys_means_anyone_may_send() -> None:
    assert Security.from_settings(Settings()).sender(None, None) is None


@pytest.mark.parametrize("name", ["api_key_file", "jwt_secret_file", "jwt_public_key_file"])
def test_unreadable_secret_file_is_a_setting_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(SettingError) as caught:
        Security.from_settings(from_env({f"DIARY_WS_{name.upper()}": str(tmp_path / "missing")}))
    assert caught.value.name == f"DIARY_WS_{name.upper()}"


# --- JWT -----------------------------------------------------------------------------------------------------


def hs256() -> JwtVerifier:
    return JwtVerifier(SECRET.encode(), ("HS256",), "diary", "https://auth.example")


def good(**extra: Any) -> dict[str, Any]:
    found = {**claims(), "aud": "diary", "iss": "https://auth.example", **extra}
    return {k: v for k, v in found.items() if v is not None}


def test_a_valid_token_gives_subject_and_expiry() -> None:
    payload = good()
    got = hs256().verify(sign(payload, SECRET, "HS256"))
    assert got.subject == "alice"
    assert got.expires_at == payload["exp"]


RSA = rsa_key()
OTHER_RSA = rsa_key()


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (unsigned(good()), "algorithm"),
        (sign(good(), SECRET, "HS512"), "algorithm"),  # the right secret, an algorithm not on the list
        (sign(good(), RSA, "RS256"), "algorithm"),
        (sign(good(), "another-secret-that-is-long-enough-000000", "HS256"), "signature"),
        (sign(good(exp=int(time.time()) - 5), SECRET, "HS256"), "expired"),
        (sign(good(nbf=int(time.time()) + 600), SECRET, "HS256"), "not valid yet"),
        (sign(good(aud="someone-else"), SECRET, "HS256"), "audience"),
        (sign(good(iss="https://evil.example"), SECRET, "HS256"), "issuer"),
        (sign(good(aud=None), SECRET, "HS256"), "aud"),
        (sign(good(exp=None), SECRET, "HS256"), "exp"),
        (sign(good(sub=None), SECRET, "HS256"), "sub"),
        (sign({**good(), "sub": 42}, SECRET, "HS256"), "not valid"),
        (sign({**good(), "exp": "tomorrow"}, SECRET, "HS256"), "malformed"),
        ("not-a-jwt", "malformed"),
        ("a.b.c", "malformed"),
        ("", "malformed"),
        (sign(good(), SECRET, "HS256")[:-8], "signature|malformed"),  # truncated
        (sign(good(), SECRET, "HS256").rsplit(".", 1)[0], "malformed"),  # the signature cut off
        ("x" * 9000, "over"),
    ],
)
def test_bad_tokens_are_401_and_never_echoed(token: str, says: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        hs256().verify(token)
    assert re.search(says, caught.value.message)
    assert 'error="invalid_token"' in caught.value.headers["WWW-Authenticate"]
    if token:
        assert token not in caught.value.message


def test_rs256_key_refuses_key_confusion_and_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem(RSA))
    key, algorithms = load_public_key(str(path), "K")
    assert algorithms == ("RS256",)
    verifier = JwtVerifier(key, algorithms, None, None)
    assert verifier.verify(sign(claims(), RSA, "RS256")).subject == "alice"
    for forged in (
        hs256_forged_with(public_pem(RSA), claims()),  # HS256 "signed" with the public key
        sign(claims(), OTHER_RSA, "RS256"),
        sign(claims(), RSA, "PS256"),  # the right key, an algorithm the key type does not choose
        unsigned(claims()),
    ):
        with pytest.raises(Unauthorized):
            verifier.verify(forged)


def test_an_aud_claim_is_ignored_without_jwt_audience() -> None:
    verifier = JwtVerifier(SECRET.encode(), ("HS256",), None, None)
    assert verifier.verify(sign(claims(aud="anything"), SECRET, "HS256")).subject == "alice"


@pytest.mark.parametrize(("curve", "algorithm"), [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384")])
def test_ec_keys_choose_their_algorithm(tmp_path: Path, curve: ec.EllipticCurve, algorithm: str) -> None:
    key = ec_key(curve)
    path = tmp_path / "ec.pem"
    path.write_bytes(public_pem(key))
    public, algorithms = load_public_key(str(path), "K")
    assert algorithms == (algorithm,)
    assert JwtVerifier(public, algorithms, None, None).verify(sign(claims(), key, algorithm)).subject == "alice"
    with pytest.raises(Unauthorized):
        JwtVerifier(public, algorithms, None, None).verify(hs256_forged_with(public_pem(key), claims()))


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        public_pem(rsa_key(1024)),  # too small
        public_pem(ec_key(ec.SECP256K1())),  # a curve JOSE does not use for ES256
    ],
)
def test_unusable_public_keys_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    with pytest.raises(SettingError):
        load_public_key(str(path), "DIARY_WS_JWT_PUBLIC_KEY_FILE")


def test_short_hs256_secret_is_refused() -> None:
    with pytest.raises(SettingError):
        check_hs256_secret("x" * 31, "DIARY_WS_JWT_SECRET")
    assert check_hs256_secret("x" * 32, "DIARY_WS_JWT_SECRET") == b"x" * 32


def test_secret_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    security = Security.from_settings(Settings(jwt_secret_file=str(path)))
    assert security.jwt is not None
    assert security.jwt.verify(sign(claims(), SECRET, "HS256")).subject == "alice"


# --- where the token comes from --------------------------------------------------------------------------------


def test_token_from_query_or_header() -> None:
    assert token_from(b"token=abc&since=1-0", None) == "abc"
    assert token_from(b"since=1-0", "Bearer abc") == "abc"
    assert token_from(b"", None) is None
    assert token_from(b"tok%65n=abc", None) == "abc"  # the name is decoded as Starlette decodes it


@pytest.mark.parametrize(
    ("query", "authorization", "error"),
    [
        (b"token=a&token=b", None, BadRequest),
        (b"token=a", "Bearer b", BadRequest),
        (b"", "Basic abc", Unauthorized),
        (b"token=\xff", None, BadRequest),
    ],
)
def test_token_sent_twice_or_oddly_is_refused(query: bytes, authorization: str | None, error: type) -> None:
    with pytest.raises(error):
        token_from(query, authorization)


# --- listener auth: JWT, user header, both ---------------------------------------------------------------------


def both() -> Security:
    return Security(jwt=JwtVerifier(SECRET.encode(), ("HS256",), None, None), user_header="X-User-Id")


def test_either_credential_is_enough_when_both_are_configured() -> None:
    token = sign(claims("alice"), SECRET, "HS256")
    assert both().listener_auth("alice", token, None) is not None
    assert both().listener_auth("alice", None, "alice") is None
    assert both().listener_auth("alice", token, "alice") is not None


@pytest.mark.parametrize(
    ("token_for", "header", "error"),
    [
        (None, None, Unauthorized),
        ("bob", None, Forbidden),
        (None, "bob", Forbidden),
        (None, "", Unauthorized),
        ("alice", "bob", Forbidden),  # each credential sent must be valid
        ("bob", "alice", Forbidden),
        ("garbage", "alice", Unauthorized),
    ],
)
def test_each_credential_sent_must_be_valid(token_for: str | None, header: str | None, error: type) -> None:
    token = None
    if token_for == "garbage":
        token = "garbage"
    elif token_for is not None:
        token = sign(claims(token_for), SECRET, "HS256")
    with pytest.raises(error):
        both().listener_auth("alice", token, header)


def test_no_listener_auth_configured_lets_everyone_in() -> None:
    assert Security().listener_auth("alice", None, None) is None


# --- proxies and origins ---------------------------------------------------------------------------------------


def test_trusted_proxies() -> None:
    proxies = Proxies(("127.0.0.1", "10.0.0.0/8", "::1"))
    assert proxies.trusts("127.0.0.1")
    assert proxies.trusts("10.1.2.3")
    assert proxies.trusts("::ffff:127.0.0.1")
    assert proxies.trusts("::1")
    assert not proxies.trusts("127.0.0.2")
    assert not proxies.trusts("11.0.0.1")
    assert not proxies.trusts("not-an-ip")
    assert not proxies.trusts(None)
    assert not Proxies(()).trusts("127.0.0.1")
    assert Proxies(("*",)).trusts("203.0.113.9")


def test_direct_peer_prefers_the_recorded_one() -> None:
    assert direct_peer({"client": ("203.0.113.9", 0), "diary_ws.peer": ("127.0.0.1", 5000)}) == "127.0.0.1"
    assert direct_peer({"client": ("127.0.0.2", 5000)}) == "127.0.0.2"
    assert direct_peer({"client": None}) is None


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://App.Example.com/", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("http://app.example.com:8080", "http://app.example.com:8080"),
        ("https://app.example.com:80", "https://app.example.com:80"),
    ],
)
def test_origin_normalisation(origin: str, normal: str) -> None:
    assert normalise_origin(origin) == normal


def test_origin_check() -> None:
    security = Security(origins=frozenset({"https://app.example.com"}))
    security.check_origin(None)  # not a browser
    security.check_origin("https://app.example.com")
    security.check_origin("HTTPS://APP.EXAMPLE.COM:443")
    for bad in ("https://evil.example", "null", "http://app.example.com", "https://app.example.com.evil.example"):
        with pytest.raises(Forbidden):
            security.check_origin(bad)
    Security().check_origin("https://anything.example")  # ALLOWED_ORIGINS=*


def test_errors_are_the_family() -> None:
    assert issubclass(Unauthorized, DiaryWSError)
    assert Unauthorized.status_code == 401
    assert Forbidden.status_code == 403
