"""kanmon's DKIM verifier of the common case against dkimpy, the reference.

verify_dkim() verifies a CRLF message with an rsa-sha256 or ed25519-sha256 signature
itself (kanmon.auth.dkimsign's canonical forms, `cryptography` for the signature) and
hands everything else to dkimpy. Here both read the same messages, signed by dkimpy as
an independent signer and then changed the ways mail is changed on its way: each
message's results must be the same with and without the common-case verifier, and the
expected ones; and the common-case verifier must really have answered for the cases it
claims (else the comparison would compare dkimpy with itself).
"""

from __future__ import annotations

import base64

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from kanmon.auth import dkim as kdkim
from kanmon.auth.dkim import verify_dkim
from kanmon.auth.lookup import LookupAnswer
from tests.support.dkimkeys import ed25519_key, rsa_key
from tests.support.dnsserver import txt

D = "sender.test"

BODY = (b"Hello Bob,\r\n\r\nthe  figures\tfor  November are attached.   \r\n"
        b"--\r\n  Alice \t\r\n\r\n\r\n")
HEADER = (b"Received: from a.sender.test by mx.sender.test; Mon, 30 Nov 2026 10:00:00 +0000\r\n"
          b"From: Alice Example <alice@sender.test>\r\n"
          b"To: bob@example.test,\r\n\tcarol@example.test\r\n"
          b"Subject:  Figures   for\r\n  November\r\n"
          b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
          b"Message-ID: <figures-1@sender.test>\r\n"
          b"MIME-Version: 1.0\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\n")
MESSAGE = HEADER + b"\r\n" + BODY
MULTIPART = (
    b"Received: from out.sender.test (out.sender.test [192.0.2.10])\r\n\tby mx.sender.test with ESMTPS id 4Q1\r\n"
    b"\tfor <bob@example.test>; Mon, 30 Nov 2026 10:00:01 +0000\r\n"
    b"From: =?UTF-8?B?5bGx55Sw?= <yamada@sender.test>\r\nTo: bob@example.test\r\n"
    b"Subject: =?UTF-8?B?5Lya6K2w44Gu6LOH5paZ?=\r\nDate: Mon, 30 Nov 2026 10:00:00 +0900\r\n"
    b"Message-ID: <m2@sender.test>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed;\r\n boundary=\"b1\"\r\n\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "会議の資料を添付します。\t \r\n".encode() * 20
    + b"--b1\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + b"JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0ZpbHRlci9GbGF0ZURlY29kZT4+\r\n" * 40
    + b"--b1--\r\n"
)


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa_key(2048), "rsa1024": rsa_key(1024), "ed": ed25519_key()}


@pytest.fixture(scope="module")
def lookup(keys):
    records = {f"{sel}._domainkey.{D}": (k.record()[4:],) for sel, k in keys.items()}
    records[f"revoked._domainkey.{D}"] = ('"v=DKIM1; k=rsa; p="',)
    # the rsa key as a bare RSAPublicKey (PKCS#1) rather than SubjectPublicKeyInfo: dkimpy reads both
    pem = serialization.load_pem_private_key(keys["rsa"].private, None).public_key()
    pkcs1 = base64.b64encode(pem.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1))
    records[f"pkcs1._domainkey.{D}"] = (txt(f"v=DKIM1; k=rsa; p={pkcs1.decode()}"),)

    def look(name: str, rdtype: str) -> LookupAnswer:
        if rdtype == "TXT" and name in records:
            return LookupAnswer("ok", records[name])
        return LookupAnswer("nxdomain")

    return look


def signed(message: bytes, key, selector: str, canon=(b"relaxed", b"relaxed"), **kw) -> bytes:
    return dkim.sign(message, selector.encode(), D.encode(), key.private, canonicalize=canon,
                     signature_algorithm=key.algorithm.encode(), **kw) + message


def replace(message: bytes, old: bytes, new: bytes) -> bytes:
    assert old in message
    return message.replace(old, new, 1)


def split(message: bytes) -> tuple[bytes, bytes]:
    end = message.index(b"\r\n\r\n")
    return message[: end + 2], message[end + 4:]


CANONS = [(b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed")]


def cases(keys) -> list[tuple[str, bytes, list[str], bool]]:
    """(name, message, the expected results, whether the common-case verifier answers)."""
    out = []
    for h, b in CANONS:
        c = f"{h.decode()}/{b.decode()}"
        m = signed(MESSAGE, keys["rsa"], "rsa", (h, b))
        out.append((f"rsa {c} pass", m, ["pass"], True))
        out.append((f"rsa {c} body altered", replace(m, b"November are", b"December are"), ["fail"], True))
        out.append((f"rsa {c} signed header altered", replace(m, b"Figures", b"Fugures"), ["fail"], True))
        out.append((f"rsa {c} unsigned header added", b"X-Spam: no\r\n" + m, ["pass"], True))
        out.append((f"rsa {c} empty lines added at the end", m + b"\r\n\r\n", ["pass"], True))
        out.append((f"rsa {c} body whitespace changed", replace(m, b"the  figures", b"the figures"),
                    ["pass" if b == b"relaxed" else "fail"], True))
        out.append((f"rsa {c} header refolded", replace(m, b"Figures   for\r\n  November", b"Figures for November"),
                    ["pass" if h == b"relaxed" else "fail"], True))
        out.append((f"rsa {c} header name case", replace(m, b"\r\nSubject:", b"\r\nSUBJECT:"),
                    ["pass" if h == b"relaxed" else "fail"], True))
        out.append((f"ed25519 {c} pass", signed(MESSAGE, keys["ed"], "ed", (h, b)), ["pass"], True))
        header, body = split(MESSAGE)
        ml = signed(MESSAGE, keys["rsa"], "rsa", (h, b), length=True)
        out.append((f"rsa {c} l= with a footer added", ml + b"-- \r\nthe list footer\r\n", ["pass"], True))
        out.append((f"rsa {c} l= body changed inside", replace(ml, b"November are", b"December are"), ["fail"], True))
        empty = signed(header + b"\r\n", keys["rsa"], "rsa", (h, b))
        out.append((f"rsa {c} empty body", empty, ["pass"], True))
        out.append((f"rsa {c} empty body, lines added", empty + b"\r\n\r\n", ["pass"], True))
    for h, b in CANONS:
        c = f"{h.decode()}/{b.decode()}"
        mp = signed(MULTIPART, keys["rsa"], "rsa", (h, b))
        out.append((f"multipart {c} pass", mp, ["pass"], True))
        out.append((f"multipart {c} Received added on top", b"Received: from mx.example.test\r\n" + mp, ["pass"], True))
        out.append((f"multipart {c} attachment altered", replace(mp, b"JVBERi0xLjQK", b"JVBERi0xLjUK"), ["fail"], True))
        out.append((f"multipart {c} 8bit text altered", replace(mp, "資料".encode(), "資金".encode()), ["fail"], True))
    m = signed(MESSAGE, keys["rsa"], "rsa")
    out.append(("a second From added", b"From: mallory@evil.test\r\n" + m, ["fail"], True))
    out.append(("oversigned Subject, a second Subject added",
                b"Subject: urgent\r\n" + signed(MESSAGE, keys["rsa"], "rsa",
                                               include_headers=[b"from", b"subject", b"subject", b"to"]),
                ["fail"], True))
    out.append(("1024-bit key", signed(MESSAGE, keys["rsa1024"], "rsa1024"), ["pass"], True))
    two = signed(signed(MESSAGE, keys["ed"], "ed"), keys["rsa"], "rsa")
    out.append(("two signatures, both pass", two, ["pass", "pass"], True))
    out.append(("two signatures, body altered", replace(two, b"November are", b"December are"), ["fail", "fail"], True))
    out.append(("signature under a selector with no key", signed(MESSAGE, keys["rsa"], "gone"), ["permerror"], False))
    out.append(("revoked key", signed(MESSAGE, keys["rsa"], "revoked"), ["permerror"], False))
    out.append(("wrong key (ed25519 signature, rsa selector)",
                replace(signed(MESSAGE, keys["ed"], "ed"), b"s=ed;", b"s=rsa;"), ["fail"], False))
    out.append(("rsa key as PKCS#1", signed(MESSAGE, keys["rsa"], "pkcs1"), ["pass"], True))
    out.append(("LF line ends", signed(MESSAGE, keys["rsa"], "rsa").replace(b"\r\n", b"\n"), ["pass"], False))
    out.append(("an mbox From line on top", b"From alice@sender.test Mon Nov 30 10:00:00 2026\r\n" + m, ["pass"], False))
    out.append(("signature in the future", replace(m, b"; t=", b"; t=9"), ["permerror"], False))
    out.append(("rsa-sha1 (RFC 8301: never valid)",
                dkim.sign(MESSAGE, b"rsa", D.encode(), keys["rsa"].private, signature_algorithm=b"rsa-sha1") + MESSAGE,
                ["permerror"], False))
    out.append(("b= not base64", replace(m, b" b=", b" b=*"), ["permerror"], False))
    return out


def test_the_common_case_verifier_agrees_with_dkimpy(keys, lookup):
    for name, message, expected, common in cases(keys):
        ours = verify_dkim(message, lookup)
        reference = verify_dkim(message, lookup, common=False)
        assert ours == reference, name
        assert [r.result for r in ours] == expected, (name, ours)


def test_the_common_case_verifier_answers_what_it_claims(keys, lookup):
    answered = 0
    for name, message, _expected, common in cases(keys):
        end = message.find(b"\r\n\r\n")
        parsed = kdkim._parse(message, end)
        n = len(kdkim._fields(message[: end + 2], b"DKIM-Signature"))
        results = []
        for idx in range(n):
            tags = kdkim._tags(kdkim._fields(message[: end + 2], b"DKIM-Signature")[idx])
            record = lookup(kdkim.key_name(tags[b"s"].decode(), tags[b"d"].decode()), "TXT")
            raw = record.records[0][1:-1].replace('" "', "").encode() if record.status == "ok" else b""
            results.append(None if parsed is None or not raw else kdkim._verify_common(parsed, idx, raw))
        claimed = parsed is not None and n > 0 and all(r is not None for r in results)
        assert claimed == common, (name, results)
        answered += common
    assert answered > 50


def test_a_message_dkimpy_cannot_parse_is_a_permerror_for_every_signature(keys, lookup):
    m = signed(MESSAGE, keys["rsa"], "rsa")
    broken = b" folded first line\r\n" + m
    assert [r.reason for r in verify_dkim(broken, lookup)] == ["message header does not parse"]
