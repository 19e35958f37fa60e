"""The suppression list's hash (dsrflow.suppression): one hash per person however the identifier is
written, keyed, and a key file that is wrong is one clear ConfigError line."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pytest

from dsrflow import cli
from dsrflow.errors import ConfigError
from dsrflow.settings import Settings
from dsrflow.suppression import SuppressionKey, load_key, new_key, suppression_hash, write_key

KEY = SuppressionKey(key_id="s_test", secret=bytes(range(32)))


def test_the_hash_is_hmac_sha256_of_the_normal_form() -> None:
    expected = hmac.new(KEY.secret, b"email:lan.nguyen@example.vn", hashlib.sha256).hexdigest()
    assert suppression_hash(KEY, "email", "lan.nguyen@example.vn") == expected
    assert suppression_hash(KEY.secret, "email", "lan.nguyen@example.vn") == expected  # the secret alone will do


@pytest.mark.parametrize("written", ["Lan.Nguyen@Example.VN", "  lan.nguyen@example.vn ", "LAN.NGUYEN@EXAMPLE.VN"])
def test_an_email_however_written_gives_one_hash(written: str) -> None:
    assert suppression_hash(KEY, "email", written) == suppression_hash(KEY, "email", "lan.nguyen@example.vn")


@pytest.mark.parametrize("written", ["0901 234 567", "0901234567", "+84 90 123 45 67", "0084901234567",
                                     "+84901234567"])
def test_a_phone_however_written_gives_one_hash(written: str) -> None:
    assert suppression_hash(KEY, "phone", written, region="VN") == suppression_hash(KEY, "phone", "+84901234567")


def test_a_local_number_is_read_in_its_region() -> None:
    assert suppression_hash(KEY, "phone", "(415) 555-2671", region="US") == suppression_hash(KEY, "phone",
                                                                                             "+14155552671")
    assert suppression_hash(KEY, "phone", "0901 234 567", region="US") != suppression_hash(KEY, "phone",
                                                                                           "+84901234567")


def test_type_and_key_both_count() -> None:
    assert suppression_hash(KEY, "customer_id", "C-1") != suppression_hash(KEY, "user_id", "C-1")
    other = SuppressionKey(key_id="s_other", secret=bytes(32))
    assert suppression_hash(KEY, "email", "a@example.vn") != suppression_hash(other, "email", "a@example.vn")


def test_what_is_no_identifier_is_a_value_error_without_the_value() -> None:
    with pytest.raises(ValueError) as caught:
        suppression_hash(KEY, "phone", "call me maybe")
    assert "call me" not in str(caught.value)


def test_a_written_key_reads_back_and_is_private(tmp_path: Path) -> None:
    key = new_key()
    path = write_key(key, tmp_path / "k" / "suppression.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path) == key and len(key.secret) == 32 and key.key_id.startswith("s_")
    assert "secret" not in repr(key) and key.secret.hex() not in repr(key)
    with pytest.raises(Exception, match="exists already"):
        write_key(new_key(), path)  # never replaced
    assert load_key(path) == key


def _bad(tmp_path: Path, body: str | bytes, mode: int = 0o600) -> Path:
    p = tmp_path / f"bad-{abs(hash(body))}.json"
    p.write_bytes(body.encode() if isinstance(body, str) else body)
    os.chmod(p, mode)
    return p


@pytest.mark.parametrize(("body", "mode", "says"), [
    ("not json", 0o600, "is not JSON"),
    ("[1, 2]", 0o600, "is not a JSON object"),
    ('{"key_id": "s_1"}', 0o600, "lacks secret"),
    ('{"key_id": "s_1", "secret": "***"}', 0o600, "secret is not base64"),
    ('{"key_id": "s_1", "secret": "c2hvcnQ="}', 0o600, "secret is 5 bytes, not 32"),
    ('{"key_id": "no spaces", "secret": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}', 0o600, "key_id is not"),
    (json.dumps({"key_id": "s_1", "secret": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}), 0o644,
     "may be read by others"),
])
def test_a_bad_key_file_is_one_config_error_line(tmp_path: Path, body: str, mode: int, says: str) -> None:
    path = _bad(tmp_path, body, mode)
    with pytest.raises(ConfigError) as caught:
        load_key(path)
    message = str(caught.value)
    assert says in message and str(path) in message and "\n" not in message
    assert "AAAA" not in message  # never the secret


def test_a_missing_key_file_is_one_config_error_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_key(tmp_path / "nowhere.json")
    assert "\n" not in str(caught.value)


def test_the_setting_names_the_variable_and_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad(tmp_path, "not json")
    monkeypatch.setenv("DSRFLOW_SUPPRESSION_KEY", str(bad))
    settings = Settings()
    with pytest.raises(ConfigError, match=r"^invalid setting DSRFLOW_SUPPRESSION_KEY: suppression key file .* is "
                                          r"not JSON$"):
        settings.suppression_key  # noqa: B018
    with pytest.raises(ConfigError, match="DSRFLOW_SUPPRESSION_KEY"):
        settings.require(*cli.SERVICE_SETTINGS["coordinator"])  # the coordinator does not start with it
    good = write_key(new_key(), tmp_path / "good.json")
    monkeypatch.setenv("DSRFLOW_SUPPRESSION_KEY", str(good))
    assert Settings().suppression_key == good
    monkeypatch.setenv("DSRFLOW_SUPPRESSION_KEY", "")
    assert Settings().suppression_key is None


def test_the_cli_writes_a_key_and_check_needs_one_identifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DSRFLOW_SUPPRESSION_KEY", raising=False)
    cli.get_settings.cache_clear()
    out = tmp_path / "key.json"
    assert cli.main(["suppression", "key", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"DSRFLOW_SUPPRESSION_KEY={out.resolve()}" in printed
    key = load_key(out)
    assert key.key_id in printed and key.secret.hex() not in printed
    assert cli.main(["suppression", "key", "--out", str(out)]) == 2  # never replaced
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["suppression", "check", "--key", str(out)]) == 2
    assert "one of --email and --phone" in capsys.readouterr().err
    assert cli.main(["suppression", "check", "--email", "a@example.vn"]) == 1
    assert "no suppression key" in capsys.readouterr().err
    cli.get_settings.cache_clear()
