"""dsrflow.auth without a database: credential files, and command tokens signed and checked
against one public key. Each refusal has its own test, and a token made without PyJWT (by hand,
with the ``cryptography`` library) verifies, as one made by a DPO tool in another language would."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dsrflow.auth import (
    MAX_LIFETIME,
    REQUIRED_CLAIMS,
    AuthError,
    Credential,
    CredentialError,
    Refusal,
    generate_credential,
    load_credential,
    new_key_id,
    sign_command,
    token_key_id,
    verify_with_key,
)
from dsrflow.errors import ConfigError, DsrflowError, InvalidInput

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
T = int(NOW.timestamp())
CMD = {"decision": "release", "case_id": str(uuid.UUID(int=7))}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: Ed25519PrivateKey | None = None, *,
          signature: bytes | None = None) -> str:
    """A JWS compact token made by hand: base64url(header).base64url(claims).base64url(Ed25519 signature),
    as RFC 7515 and RFC 8037 describe it, without PyJWT."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if signature is None:
        signature = key.sign(signing_input.encode()) if key else b""
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def cred() -> Credential:
    return generate_credential("lan.dpo@example.vn")


def header(cred: Credential, **extra: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": "JWT", "kid": cred.key_id, **extra}


def claims(cred: Credential, **changes: Any) -> dict[str, Any]:
    base = {"iss": cred.actor, "aud": "dsrflow", "jti": str(uuid.uuid4()), "iat": T, "exp": T + 300, "cmd": CMD}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(token: str, key: Any, reason: Refusal, *, now: datetime = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_with_key(token, key, now=now)
    exc = info.value
    assert exc.reason_code == reason, str(exc)
    for part in token.split("."):  # no part of the token in the message
        assert len(part) < 8 or part not in str(exc)
    return exc


# -- signing and verifying ---------------------------------------------------------------------------
def test_a_signed_command_verifies(cred: Credential) -> None:
    cid = uuid.uuid4()
    token = sign_command(cred, CMD, now=NOW, command_id=cid)
    v = verify_with_key(token, cred.public_pem(), now=NOW + timedelta(minutes=4))
    assert (v.key_id, v.issuer, v.command_id, v.cmd) == (cred.key_id, cred.actor, cid, CMD)
    assert v.issued_at == NOW and v.expires_at == NOW + timedelta(minutes=5)
    assert token_key_id(token) == cred.key_id


def test_the_token_is_a_plain_jwt_any_library_reads(cred: Credential) -> None:
    token = sign_command(cred, CMD, now=NOW, ttl=timedelta(minutes=10))
    h, c, _ = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(h + "==")) == {"alg": "EdDSA", "typ": "JWT", "kid": cred.key_id}
    body = json.loads(base64.urlsafe_b64decode(c + "=="))
    assert set(body) == {"iss", "aud", "jti", "iat", "exp", "cmd"}
    assert (body["iss"], body["aud"], body["iat"], body["exp"], body["cmd"]) == (cred.actor, "dsrflow", T, T + 600, CMD)
    uuid.UUID(body["jti"])
    # and PyJWT on its own, with the public key, agrees
    decoded = jwt.decode(token, cred.private_key.public_key(), algorithms=["EdDSA"], audience="dsrflow",
                         options={"verify_exp": False, "verify_iat": False})
    assert decoded["cmd"] == CMD


def test_a_token_made_by_hand_without_pyjwt_verifies(cred: Credential) -> None:
    """What a DPO tool in Go, Java or JavaScript produces with its own JWT (or bare Ed25519) library."""
    cid = str(uuid.uuid4())
    token = forge({"typ": "JWT", "alg": "EdDSA", "kid": cred.key_id},
                  {"cmd": CMD, "exp": T + 120, "iat": T, "jti": cid, "aud": ["dsrflow"], "iss": cred.actor},
                  cred.private_key)
    v = verify_with_key(token, cred.public_pem(), now=NOW)
    assert str(v.command_id) == cid and v.issuer == cred.actor and v.cmd == CMD


def test_sign_refuses_a_lifetime_over_ten_minutes(cred: Credential) -> None:
    with pytest.raises(InvalidInput):
        sign_command(cred, CMD, now=NOW, ttl=MAX_LIFETIME + timedelta(seconds=1))
    with pytest.raises(InvalidInput):
        sign_command(cred, CMD, now=NOW, ttl=timedelta(0))
    with pytest.raises(InvalidInput):
        sign_command(cred, CMD, now=datetime(2026, 3, 2, 9, 30))  # naive
    sign_command(cred, CMD, now=NOW, ttl=MAX_LIFETIME)


# -- each refusal ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d", "!!!.e30.c2ln", ".e30.c2ln",
                                   b64(b"[1]") + ".e30.c2ln", b64(b"not json") + ".e30.c2ln"])
def test_a_malformed_token_is_refused(cred: Credential, token: str) -> None:
    refused(token, cred.public_pem(), Refusal.malformed)


def test_a_token_with_no_signature_or_payload_is_malformed(cred: Credential) -> None:
    token = sign_command(cred, CMD, now=NOW)
    h, c, _ = token.split(".")
    refused(f"{h}.{c}.", cred.public_pem(), Refusal.malformed)
    refused(f"{h}..{_}", cred.public_pem(), Refusal.malformed)


def test_a_payload_that_is_not_json_is_malformed(cred: Credential) -> None:
    signing_input = f"{b64(json.dumps(header(cred)).encode())}.{b64(b'not json')}"
    token = f"{signing_input}.{b64(cred.private_key.sign(signing_input.encode()))}"
    refused(token, cred.public_pem(), Refusal.malformed)


def test_a_huge_token_is_refused_unparsed(cred: Credential) -> None:
    big = sign_command(cred, {**CMD, "padding": "x" * 70_000}, now=NOW)  # well signed, but too big
    refused(big, cred.public_pem(), Refusal.malformed)


def test_a_non_string_token_is_refused(cred: Credential) -> None:
    with pytest.raises(AuthError) as info:
        verify_with_key(b"a.b.c", cred.public_pem(), now=NOW)  # type: ignore[arg-type]
    assert info.value.reason_code == Refusal.malformed


@pytest.mark.parametrize("kid", [None, "", 42, "k_XYZ", "../../etc/passwd", "k_0123456789abcdef0"])
def test_a_token_without_a_dsrflow_key_id_is_refused(cred: Credential, kid: Any) -> None:
    h = header(cred)
    if kid is None:
        del h["kid"]
    else:
        h["kid"] = kid
    refused(forge(h, claims(cred), cred.private_key), cred.public_pem(), Refusal.unknown_key)


def test_a_signature_by_another_key_is_refused(cred: Credential) -> None:
    other = generate_credential(cred.actor, key_id=cred.key_id)  # same actor and kid, another private key
    token = sign_command(other, CMD, now=NOW)
    exc = refused(token, cred.public_pem(), Refusal.bad_signature)
    assert cred.key_id in str(exc)


def test_a_tampered_command_is_refused(cred: Credential) -> None:
    h, _, s = sign_command(cred, CMD, now=NOW).split(".")
    tampered = b64(json.dumps(claims(cred, cmd={**CMD, "decision": "lift"})).encode())
    refused(f"{h}.{tampered}.{s}", cred.public_pem(), Refusal.bad_signature)


def test_a_garbage_signature_is_refused(cred: Credential) -> None:
    refused(forge(header(cred), claims(cred), signature=b"\x00" * 64), cred.public_pem(), Refusal.bad_signature)
    refused(forge(header(cred), claims(cred), signature=b"short"), cred.public_pem(), Refusal.bad_signature)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS256", "HS384", "HS512", "RS256", "ES256", "PS256",
                                 "eddsa", "Ed25519", "ES256K", "", None, 1])
def test_only_eddsa_is_accepted(cred: Credential, alg: Any) -> None:
    h = header(cred, alg=alg)
    if alg is None:
        del h["alg"]
    signing_input = f"{b64(json.dumps(h).encode())}.{b64(json.dumps(claims(cred)).encode())}"
    # the classic confusions: no signature at all, or an HMAC keyed with the (public) PEM
    for sig in (b"", hmac.new(cred.public_pem().encode(), signing_input.encode(), hashlib.sha256).digest(),
                cred.private_key.sign(signing_input.encode())):
        refused(f"{signing_input}.{b64(sig)}", cred.public_pem(), Refusal.algorithm)


def test_critical_header_extensions_are_refused(cred: Credential) -> None:
    for extra in ({"crit": ["exp"]}, {"crit": ["b64"], "b64": False}, {"b64": True}):
        token = forge(header(cred, **extra), claims(cred), cred.private_key)
        refused(token, cred.public_pem(), Refusal.malformed)


@pytest.mark.parametrize("aud", ["other", ["other", "api"], "DSRFLOW", "dsrflow "])
def test_a_token_for_another_audience_is_refused(cred: Credential, aud: Any) -> None:
    refused(forge(header(cred), claims(cred, aud=aud), cred.private_key), cred.public_pem(), Refusal.wrong_audience)


def test_an_expired_token_is_refused(cred: Credential) -> None:
    token = sign_command(cred, CMD, now=NOW, ttl=timedelta(minutes=5))
    verify_with_key(token, cred.public_pem(), now=NOW + timedelta(minutes=5) - timedelta(seconds=1))
    exc = refused(token, cred.public_pem(), Refusal.expired, now=NOW + timedelta(minutes=5))
    assert "expired" in str(exc)
    refused(token, cred.public_pem(), Refusal.expired, now=NOW + timedelta(days=3))


def test_a_token_issued_in_the_future_is_refused_beyond_the_skew(cred: Credential) -> None:
    ahead = sign_command(cred, CMD, now=NOW + timedelta(seconds=60))
    verify_with_key(ahead, cred.public_pem(), now=NOW)  # a sender's clock 60 s fast is tolerated
    too_far = sign_command(cred, CMD, now=NOW + timedelta(seconds=61))
    refused(too_far, cred.public_pem(), Refusal.issued_in_future)
    not_before = forge(header(cred), claims(cred, nbf=T + 120), cred.private_key)
    refused(not_before, cred.public_pem(), Refusal.issued_in_future)


def test_a_lifetime_over_ten_minutes_is_refused(cred: Credential) -> None:
    ok = forge(header(cred), claims(cred, exp=T + 600), cred.private_key)
    verify_with_key(ok, cred.public_pem(), now=NOW)
    too_long = forge(header(cred), claims(cred, exp=T + 601), cred.private_key)
    refused(too_long, cred.public_pem(), Refusal.lifetime_too_long)
    forever = forge(header(cred), claims(cred, iat=T - 60, exp=T + 10 * 365 * 86400), cred.private_key)
    refused(forever, cred.public_pem(), Refusal.lifetime_too_long)


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_a_token_missing_a_claim_is_refused(cred: Credential, claim: str) -> None:
    token = forge(header(cred), {k: v for k, v in claims(cred).items() if k != claim}, cred.private_key)
    exc = refused(token, cred.public_pem(), Refusal.missing_claim)
    assert claim in str(exc)


@pytest.mark.parametrize("change", [
    {"jti": "not-a-uuid"}, {"jti": 12}, {"cmd": "release"}, {"cmd": [CMD]}, {"iat": "2026-03-02"},
    {"exp": True}, {"exp": T}, {"exp": T - 10}, {"iss": ""}, {"iss": ["lan"]}, {"iss": "lan nguyen"},
])
def test_a_claim_of_the_wrong_kind_is_refused(cred: Credential, change: dict[str, Any]) -> None:
    refused(forge(header(cred), claims(cred, **change), cred.private_key), cred.public_pem(), Refusal.bad_claim)


def test_now_must_be_timezone_aware(cred: Credential) -> None:
    with pytest.raises(InvalidInput):
        verify_with_key(sign_command(cred, CMD, now=NOW), cred.public_pem(), now=datetime(2026, 3, 2, 9, 30))


def test_a_public_key_that_is_not_ed25519_is_refused(cred: Credential) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(InvalidInput, match="not Ed25519"):
        verify_with_key(sign_command(cred, CMD, now=NOW), ec_pem, now=NOW)


def test_auth_errors_are_dsrflow_errors() -> None:
    assert issubclass(AuthError, DsrflowError) and issubclass(CredentialError, ConfigError)
    assert {r.value for r in Refusal} >= {"malformed", "unknown_key", "key_revoked", "actor_disabled",
                                          "issuer_mismatch", "bad_signature", "wrong_audience", "expired",
                                          "issued_in_future", "lifetime_too_long", "missing_claim", "algorithm"}


# -- credential files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0, 0o022, 0o277])
def test_a_credential_is_saved_0600_and_loads_back(tmp_path: Path, cred: Credential, umask: int) -> None:
    old = os.umask(umask)  # the mode is 0600 whatever the umask
    try:
        path = cred.save(tmp_path / "lan.json")
        replaced = cred.save(tmp_path / "lan.json", overwrite=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and replaced == path
    assert cred.save(tmp_path / "new" / "dir" / "c.json").exists()  # missing directories are made
    data = json.loads(path.read_text())
    assert set(data) == {"actor", "key_id", "private_key"} and data["private_key"].startswith("-----BEGIN PRIVATE KEY")
    loaded = load_credential(path)
    assert (loaded.actor, loaded.key_id, loaded.public_pem()) == (cred.actor, cred.key_id, cred.public_pem())
    verify_with_key(sign_command(loaded, CMD, now=NOW), cred.public_pem(), now=NOW)


def test_a_credential_is_not_overwritten_unless_asked(tmp_path: Path, cred: Credential) -> None:
    path = cred.save(tmp_path / "c.json")
    other = generate_credential("binh")
    with pytest.raises(CredentialError, match="exists already"):
        other.save(path)
    assert load_credential(path).actor == cred.actor
    path.chmod(0o644)
    other.save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_credential(path).actor == "binh"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind


def test_the_private_key_is_not_in_the_repr(cred: Credential) -> None:
    pem = json.loads(cred.to_json())["private_key"]
    body = "".join(pem.splitlines()[1:-1])
    assert body not in repr(cred) and "private_key" not in repr(cred)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_a_credential_others_may_read_is_refused(tmp_path: Path, cred: Credential, mode: int) -> None:
    path = cred.save(tmp_path / "c.json")
    path.chmod(mode)
    with pytest.raises(CredentialError, match="chmod 600"):
        load_credential(path)
    path.chmod(0o400)
    load_credential(path)


def test_a_missing_credential_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="does not exist"):
        load_credential(tmp_path / "nope.json")


def write_private(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("content", ["{not json", "\xff\xfe", b"\xff\xfe\x00", "[1, 2]", "null"])
def test_a_credential_file_that_is_not_a_json_object_is_refused(tmp_path: Path, content: str | bytes) -> None:
    with pytest.raises(CredentialError, match="not JSON|not a JSON object"):
        load_credential(write_private(tmp_path / "c.json", content))


def test_a_credential_without_its_fields_is_refused(tmp_path: Path, cred: Credential) -> None:
    data = json.loads(cred.to_json())
    for field in ("actor", "key_id", "private_key"):
        with pytest.raises(CredentialError, match=field):
            load_credential(write_private(tmp_path / "c.json", json.dumps({**data, field: None})))
    with pytest.raises(CredentialError, match="key id"):
        load_credential(write_private(tmp_path / "c.json", json.dumps({**data, "key_id": "mine"})))


def test_a_credential_with_another_kind_of_key_is_refused(tmp_path: Path, cred: Credential) -> None:
    data = json.loads(cred.to_json())
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()
    with pytest.raises(CredentialError, match="not Ed25519"):
        load_credential(write_private(tmp_path / "c.json", json.dumps({**data, "private_key": ec_pem})))
    with pytest.raises(CredentialError, match="not a PEM private key"):
        load_credential(write_private(tmp_path / "c.json", json.dumps({**data, "private_key": cred.public_pem()})))
    encrypted = cred.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(b"secret")).decode()
    with pytest.raises(CredentialError, match="encrypted"):
        load_credential(write_private(tmp_path / "c.json", json.dumps({**data, "private_key": encrypted})))


def test_a_credential_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(CredentialError, match="not a regular file"):
        load_credential(d)


def test_key_ids_and_names_are_checked() -> None:
    ids = {new_key_id() for _ in range(100)}
    assert len(ids) == 100 and all(k.startswith("k_") and len(k) == 18 for k in ids)
    with pytest.raises(InvalidInput):
        generate_credential("lan nguyen")
    with pytest.raises(InvalidInput):
        generate_credential("lan", key_id="key-1")
