"""DKIM signing (kanmon.auth.dkimsign): canonicalization, which mail is signed with which
key, and signatures that dkimpy (an independent implementation) verifies."""

from __future__ import annotations

import importlib.util
import os
import stat

import dkim
import pytest

from kanmon.auth import dkimkeys
from kanmon.auth.dkimsign import (
    Signer,
    SigningKey,
    canonical_body_relaxed,
    canonical_header_relaxed,
    load_signer,
    split_fields,
)
from kanmon.config import DKIM_DEFAULT_HEADERS, DKIM_DEFAULT_OVERSIGN, ConfigError, parse_config

NOW = 1_790_000_000
HAVE_NACL = importlib.util.find_spec("nacl") is not None
ALGORITHMS = [
    "rsa-sha256",
    pytest.param("ed25519-sha256", marks=pytest.mark.skipif(
        not HAVE_NACL, reason="dkimpy verifies ed25519 only with PyNaCl, not a dependency (OpenDKIM checks ed25519)")),
]

MESSAGE = (
    b"Received: from pc.example.test (pc [192.0.2.7])\r\n\tby mx1.example.test (kanmon) with ESMTPA id 1\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.example,\r\n  carol@remote.example\r\n"
    b"Subject:   quarterly   report \r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"\r\n"
    b"Hello  Bob, \t\r\n\r\nthe numbers.\r\n\r\n\r\n"
)


def key_for(algorithm: str, domain: str = "example.test", selector: str = "k1") -> tuple[SigningKey, str]:
    private = dkimkeys.generate_key(algorithm)
    return (SigningKey(domain, selector, algorithm, private, tuple(DKIM_DEFAULT_HEADERS), tuple(DKIM_DEFAULT_OVERSIGN)),
            dkimkeys.public_key(private).record())


def verify(message: bytes, records: dict[str, str]) -> bool:
    """dkimpy's verdict on the first signature, with our records as its DNS."""
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip("."), "").encode()
    return dkim.verify(message, dnsfunc=dnsfunc)


# -- canonicalization (RFC 6376 3.4.5's example) ---------------------------------------------


def test_relaxed_canonicalization_of_the_rfc_example():
    header = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
    fields = split_fields(header)
    assert fields is not None
    assert b"".join(canonical_header_relaxed(n, v) for n, v in fields) == b"a:X\r\nb:Y Z\r\n"
    assert canonical_body_relaxed(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"


def test_relaxed_body_edge_cases():
    assert canonical_body_relaxed(b"") == b""
    assert canonical_body_relaxed(b"\r\n\r\n") == b""  # only empty lines: an empty body
    assert canonical_body_relaxed(b" \t \r\n") == b""  # a line of whitespace is empty once reduced
    assert canonical_body_relaxed(b"no line end") == b"no line end\r\n"
    assert canonical_body_relaxed(b"a" + b" " * 9 + b"b\r\n") == b"a b\r\n"  # runs of any length


def test_a_header_that_is_not_fields_is_refused():
    assert split_fields(b"no colon here\r\n") is None
    assert split_fields(b"\tcontinuation first\r\n") is None
    assert split_fields(b"A: bare\nlf\r\n") is None


# -- signatures dkimpy verifies ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_signature_dkimpy_verifies(algorithm):
    key, record = key_for(algorithm)
    signed = Signer([key]).signed(MESSAGE, NOW)
    assert signed.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    assert signed.endswith(MESSAGE)
    assert all(len(line) <= 78 for line in signed.split(b"\r\n"))  # folded
    assert verify(signed, {"k1._domainkey.example.test": record})


def test_what_breaks_the_signature_and_what_does_not():
    key, record = key_for("rsa-sha256")
    records = {"k1._domainkey.example.test": record}
    signed = Signer([key]).signed(MESSAGE, NOW)
    assert verify(signed, records)
    # Another hop's trace fields on top, refolded whitespace: still valid (relaxed).
    assert verify(b"Received: from mx1 by mx.remote\r\n" + signed, records)
    assert verify(signed.replace(b"Hello  Bob,", b"Hello Bob,  "), records)
    # The body or a signed field changed: invalid.
    assert not verify(signed.replace(b"the numbers.", b"the numbers!"), records)
    assert not verify(signed.replace(b"quarterly", b"annual"), records)
    # Oversigned fields cannot be added: a second Subject, a Reply-To, a Cc.
    head, _, body = signed.partition(b"\r\n\r\n")
    for extra in (b"Subject: urgent", b"Reply-To: thief@evil.example", b"Cc: x@evil.example", b"From: x@evil.example"):
        assert not verify(head + b"\r\n" + extra + b"\r\n\r\n" + body, records), extra
    # A field not signed may be added.
    assert verify(head + b"\r\nX-Mailer: added later\r\n\r\n" + body, records)
    # The key in DNS is another one: invalid.
    _other, other_record = key_for("rsa-sha256")
    assert not verify(signed, {"k1._domainkey.example.test": other_record})


def test_the_header_list_is_the_configured_one_with_oversigning():
    key, _record = key_for("rsa-sha256")
    sig = Signer([key]).sign(MESSAGE, NOW).decode()
    h = sig.split("h=", 1)[1].split(";", 1)[0].replace("\r\n\t", "").replace(" ", "")
    names = h.split(":")
    # Present once and oversigned: twice; oversigned but absent (reply-to, cc): once.
    assert names.count("from") == 2 and names.count("subject") == 2 and names.count("date") == 2
    assert names.count("to") == 2 and names.count("reply-to") == 1 and names.count("cc") == 1
    assert names.count("message-id") == 1 and "received" not in names
    assert f"t={NOW};" in sig.replace("\r\n\t", " ")
    assert "c=relaxed/relaxed;" in sig and "d=example.test;" in sig


# -- which mail is signed, with which key ------------------------------------------------------


def with_from(value: bytes) -> bytes:
    return MESSAGE.replace(b"From: Alice <alice@example.test>", b"From: " + value)


def test_only_mail_from_our_domains_is_signed():
    key, _ = key_for("rsa-sha256")
    signer = Signer([key])
    assert signer.sign(with_from(b"a@remote.example"), NOW) == b""
    assert signer.sign(with_from(b"a@example.test.evil.example"), NOW) == b""
    assert signer.sign(with_from(b"a@notexample.test"), NOW) == b""
    assert signer.sign(with_from(b"\"x@example.test\" <a@remote.example>"), NOW) == b""
    assert signer.sign(with_from(b"a@EXAMPLE.test"), NOW) != b""
    # Not readable, or not one From: no signature (receivers refuse such mail anyway).
    assert signer.sign(MESSAGE.replace(b"From: Alice <alice@example.test>\r\n", b""), NOW) == b""
    assert signer.sign(MESSAGE.replace(b"To:", b"From: b@example.test\r\nTo:"), NOW) == b""
    assert signer.sign(with_from(b"a@example.test, b@remote.example"), NOW) == b""
    assert signer.sign(b"\r\nbody only\r\n", NOW) == b""
    assert signer.sign(MESSAGE.replace(b"the numbers.", b"bare\nLF"), NOW) == b""
    assert not Signer() and Signer().sign(MESSAGE, NOW) == b""


def test_a_subdomain_is_signed_by_the_closest_domain_we_sign_for():
    parent, parent_record = key_for("rsa-sha256", "example.test", "p")
    sub, sub_record = key_for("rsa-sha256", "sales.example.test", "s")
    signer = Signer([parent, sub])
    records = {"p._domainkey.example.test": parent_record, "s._domainkey.sales.example.test": sub_record}
    # A notice from our host name (MAILER-DAEMON@mx1.example.test): the parent signs.
    dsn = signer.signed(with_from(b"MAILER-DAEMON@mx1.example.test (Mail Delivery System)"), NOW)
    assert b"d=example.test;" in dsn and verify(dsn, records)
    mail = signer.signed(with_from(b"x@eu.sales.example.test"), NOW)
    assert b"d=sales.example.test;" in mail and verify(mail, records)


def test_signed_once_per_domain_and_algorithm():
    key, record = key_for("rsa-sha256")
    signer = Signer([key])
    once = signer.signed(MESSAGE, NOW)
    assert signer.signed(once, NOW) == once  # the relay sees what the store signed
    # Two active keys of different algorithms: two signatures (RFC 8463 dual signing).
    ed, _ed_record = key_for("ed25519-sha256", selector="e1")
    both = Signer([key, ed]).signed(MESSAGE, NOW)
    assert both.count(b"DKIM-Signature:") == 2
    assert b"a=ed25519-sha256" in both and b"a=rsa-sha256" in both
    assert verify(both, {"k1._domainkey.example.test": record})  # dkimpy checks the first, rsa


# -- keys and their files ---------------------------------------------------------------------


def test_keys_are_written_privately_and_never_overwritten(tmp_path):
    path = tmp_path / "dkim" / "example.test.k1.key"
    key = dkimkeys.generate_key("rsa-sha256")
    dkimkeys.write_private_key(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    with pytest.raises(FileExistsError):
        dkimkeys.write_private_key(path, dkimkeys.generate_key("rsa-sha256"))
    assert dkimkeys.public_key(dkimkeys.load_private_key(path, "rsa-sha256")) == dkimkeys.public_key(key)
    dkimkeys.write_private_key(path, dkimkeys.generate_key("ed25519-sha256"), force=True)
    with pytest.raises(dkimkeys.DkimKeyError, match="not an rsa key"):
        dkimkeys.load_private_key(path, "rsa-sha256")
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_txt_strings_are_at_most_255_octets():
    record = dkimkeys.public_key(dkimkeys.generate_key("rsa-sha256")).record()
    parts = dkimkeys.txt_strings(record)
    assert len(parts) == 2 and all(len(p) <= 255 for p in parts) and "".join(parts) == record
    assert dkimkeys.txt_strings("short") == ["short"]


CONFIG = """
[server]
data_dir = "{data_dir}"
{blocks}
"""


def dkim_block(selector: str, extra: str = "", domain: str = "example.test") -> str:
    return f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\n{extra}\n'


def test_config_rotation_rules(tmp_path):
    # Two keys of a domain: one active, the other not yet.
    cfg = parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("old") + dkim_block("new", "active = false")))
    assert [(d.selector, d.active) for d in cfg.dkim] == [("old", True), ("new", False)]
    assert cfg.dkim_key_path(cfg.dkim[1]) == tmp_path / "dkim" / "example.test.new.key"
    with pytest.raises(ConfigError, match=r"dkim\[1\]\.active: example.test already has an active rsa-sha256 key"):
        parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("old") + dkim_block("new")))
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("a") + dkim_block("a", "active = false")))
    # An ed25519 key beside the RSA one: both sign.
    parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("r") + dkim_block("e", 'algorithm = "ed25519-sha256"')))
    with pytest.raises(ConfigError, match="must include \"from\""):
        parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("a", 'headers = ["subject"]\noversign = []')))
    with pytest.raises(ConfigError, match="not a selector"):
        parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("bad_selector")))


def test_load_signer_names_the_key_that_does_not_load(tmp_path):
    cfg = parse_config(CONFIG.format(data_dir=tmp_path, blocks=dkim_block("k1") + dkim_block("k2", "active = false")))
    with pytest.raises(dkimkeys.DkimKeyError, match=r"dkim\[0\] \(k1._domainkey.example.test\): .*cannot read"):
        load_signer(cfg)
    dkimkeys.write_private_key(cfg.dkim_key_path(cfg.dkim[0]), dkimkeys.generate_key("rsa-sha256"))
    signer = load_signer(cfg)  # the inactive key's missing file does not matter
    assert [k.selector for k in signer.keys_for("example.test")] == ["k1"]
