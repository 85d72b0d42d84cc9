"""The quarantine digest's signed links: a token names one entry, one recipient, one
action and an expiry; any change to it, another key, or its expiry refuses it."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import stat
from pathlib import Path

import pytest

from kanmon.quarantine import links
from kanmon.quarantine.digest import digest_message

SECRET = b"k" * 32
QID = "0123456789ABCDE"
NOW = 1_800_000_000.0


def _payload(token: str) -> bytes:
    body = token.split(".")[0]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _with_payload(token: str, payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + "." + token.split(".")[1]


def test_a_token_round_trips() -> None:
    token = links.sign(SECRET, QID, "Bob@Example.test", "release", NOW + 60)
    link = links.verify(SECRET, token, NOW)
    assert (link.qid, link.rcpt, link.action, link.expires) == (QID, "Bob@Example.test", "release", NOW + 60)
    assert links.url("https://mx.example.test:8443/", token) == f"https://mx.example.test:8443/q/{token}"


def test_a_recipient_with_a_colon_stays_whole() -> None:
    token = links.sign(SECRET, QID, '"a:b"@example.test', "delete", NOW + 60)
    assert links.verify(SECRET, token, NOW).rcpt == '"a:b"@example.test'


def test_an_expired_token_is_refused() -> None:
    token = links.sign(SECRET, QID, "bob@example.test", "release", NOW + 60)
    assert links.verify(SECRET, token, NOW + 59).qid == QID
    for at in (NOW + 60, NOW + 86400):
        with pytest.raises(links.LinkError) as e:
            links.verify(SECRET, token, at)
        assert e.value.reason == "expired"


@pytest.mark.parametrize("change", [
    lambda p: p.replace(b"release:", b"delete:"),  # another action
    lambda p: p.replace(b"bob@", b"eve@"),  # another recipient
    lambda p: p.replace(QID.encode(), b"0123456789ABCDF"),  # another entry
    lambda p: p.replace(b":1800000060:", b":1900000060:"),  # a later expiry
])
def test_a_changed_payload_is_forged(change) -> None:
    token = links.sign(SECRET, QID, "bob@example.test", "release", NOW + 60)
    changed = change(_payload(token))
    assert changed != _payload(token)
    with pytest.raises(links.LinkError) as e:
        links.verify(SECRET, _with_payload(token, changed), NOW)
    assert e.value.reason == "forged"


@pytest.mark.parametrize("mangle", [
    lambda t: t.split(".")[0] + "." + ("B" if t.split(".")[1][0] == "A" else "A") + t.split(".")[1][1:],  # another MAC
    lambda t: t.split(".")[0],  # no MAC
    lambda t: t + ".x",  # three parts
    lambda t: "%%%." + t.split(".")[1],  # not base64
    lambda t: t + "A" * 2000,  # too long
    lambda t: "",
])
def test_a_mangled_token_is_forged(mangle) -> None:
    token = links.sign(SECRET, QID, "bob@example.test", "delete", NOW + 60)
    with pytest.raises(links.LinkError) as e:
        links.verify(SECRET, mangle(token), NOW)
    assert e.value.reason == "forged"


def test_another_key_is_forged() -> None:
    token = links.sign(SECRET, QID, "bob@example.test", "delete", NOW + 60)
    with pytest.raises(links.LinkError) as e:
        links.verify(b"x" * 32, token, NOW)
    assert e.value.reason == "forged"


def test_only_release_and_delete_are_signed() -> None:
    with pytest.raises(ValueError):
        links.sign(SECRET, QID, "bob@example.test", "hold", NOW + 60)


def test_the_secret_is_made_once_and_private(tmp_path: Path) -> None:
    first = links.load_secret(tmp_path)
    path = tmp_path / "console" / links.SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) == links.SECRET_BYTES
    assert links.load_secret(tmp_path) == first
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="damaged"):
        links.load_secret(tmp_path)


ROW = {"id": QID, "stored": NOW - 3600, "score": 7.5, "from": "spammer@bad.test", "subject": "buy\x1b[2J now"}


def _text(raw: bytes) -> str:
    return email.message_from_bytes(raw, policy=email.policy.default).get_body().get_content().replace("\r\n", "\n")


def test_the_digest_without_links_tells_the_administrators_command() -> None:
    text = _text(digest_message("bob@example.test", [ROW], sender="postmaster@mx", hostname="mx", now=NOW, keep_days=30))
    assert f"kanmon quarantine release {QID} --to bob@example.test" in text
    assert "/q/" not in text
    assert "\x1b" not in text


def test_the_digest_with_links_carries_both_links_whole() -> None:
    release = links.url("https://mx.example.test", links.sign(SECRET, QID, "bob@example.test", "release", NOW + 60))
    delete = links.url("https://mx.example.test", links.sign(SECRET, QID, "bob@example.test", "delete", NOW + 60))
    raw = digest_message("bob@example.test", [ROW], sender="postmaster@mx", hostname="mx", now=NOW, keep_days=30,
                         links={QID: (release, delete)})
    text = _text(raw)
    assert f"release: {release}\n" in text
    assert f"delete:  {delete}\n" in text
    assert "kanmon quarantine release" not in text
