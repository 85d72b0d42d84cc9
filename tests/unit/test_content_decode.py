"""Decoding a message as the content rules read it: Japanese charsets as mailers write
them, encoded-words, RFC 2231 names, HTML reduced to text, and bounds on hostile input."""

from __future__ import annotations

import base64
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from kanmon.content import decode
from kanmon.content.decode import decode_bytes, decode_header_value, decode_message, html_to_text, normalize
from tests.support.mailsamples import attachment, japanese_message, jis_word, to_iso2022jp


def test_iso2022jp_encoded_subject_with_windows_rows():
    # ① and ㈱ are NEC rows of CP932 that Python's iso2022_jp codec refuses.
    assert decode_header_value(jis_word("【至急】請求書①㈱")) == "【至急】請求書①㈱"


def test_plain_iso2022jp_and_other_declared_charsets():
    assert decode_bytes(to_iso2022jp("請求書"), "ISO-2022-JP") == "請求書"
    assert decode_bytes("請求書".encode("cp932"), "Shift_JIS") == "請求書"
    assert decode_bytes("請求書".encode("euc_jp"), "EUC-JP") == "請求書"
    assert decode_bytes("請求書".encode(), "utf-8") == "請求書"


def test_undeclared_or_wrongly_declared_charset_is_guessed():
    assert decode_bytes("請求書".encode("cp932")) == "請求書"
    assert decode_bytes("請求書".encode("cp932"), "utf-8") == "請求書"
    assert decode_bytes(to_iso2022jp("請求書")) == "請求書"  # ESC $ B without a label
    assert decode_bytes(b"caf\xe9", "x-no-such-charset") == "café"  # Latin-1 as the last guess


def test_encoded_words_adjacent_split_and_mixed_with_text():
    half1 = "=?UTF-8?B?" + base64.b64encode("請求".encode()).decode() + "?="
    half2 = "=?UTF-8?Q?=E6=9B=B8?="
    assert decode_header_value(f"Re: {half1}\r\n {half2} です") == "Re: 請求書 です"


def test_raw_8bit_subject_is_read():
    msg = b"Subject: " + "請求書".encode("cp932") + b"\r\nFrom: a@b\r\n\r\nbody\r\n"
    assert decode_message(msg).subject == "請求書"


def test_raw_iso2022jp_subject_is_read():
    # 7-bit, not MIME-encoded: ESC $ B ... ESC ( B, as older Japanese mailers write it
    raw = to_iso2022jp("納品書の送付①").decode("ascii")
    assert decode_header_value(raw) == "納品書の送付①"
    assert decode_header_value("Re: " + "請求書".encode("iso2022_jp").decode() + " " + jis_word("です")) == "Re: 請求書 です"
    msg = b"Subject: " + "納品書".encode("iso2022_jp") + b"\r\nFrom: a@b\r\n\r\nbody\r\n"
    assert decode_message(msg).subject == "納品書"
    # an ESC that designates no Japanese set is left alone
    assert decode_header_value("a\x1b(Bb") == "a\x1b(Bb"
    assert decode_header_value("a\x1b$Ab") == "a\x1b$Ab"  # GB 2312 (ISO-2022-JP-2): not guessed
    assert decode_header_value("plain") == "plain"


def test_broken_encoded_word_and_base64_never_raise():
    assert decode_header_value("=?UTF-8?B?!!!notbase64?=") is not None
    msg = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"***not base64***\r\n")
    decode_message(msg)  # no exception: the text is what could be read


def test_shift_jis_body_html_part_and_subject():
    html = "<html><head><style>p{}</style><script>var 請求書 = 1;</script></head><body><p>ご請求書&amp;明細</p></body></html>"
    d = decode_message(japanese_message(body="本文の請求書です", html=html))
    assert d.subject == "【至急】請求書のご確認"
    assert "本文の請求書です" in d.text
    assert "ご請求書&明細" in d.text
    assert "var" not in d.text  # script content is not text


def test_quoted_printable_euc_jp_body():
    qp = "".join(f"={b:02X}" for b in "ご請求書".encode("euc_jp")).encode()
    msg = (b"Subject: x\r\nContent-Type: text/plain; charset=EUC-JP\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp + b"\r\n")
    assert "ご請求書" in decode_message(msg).text


def test_attachment_names_rfc2231_continuations_encoded_words():
    z = b"PK\x05\x06" + bytes(18)
    msg = japanese_message(attachments=[
        attachment(z, "請求書.zip"),  # filename*=iso-2022-jp''%1B%24B...
        attachment(z, "明細書.pdf.exe", rfc2231=None),  # filename="=?ISO-2022-JP?B?...?="
        attachment(z, "見積書_" + "長" * 40 + ".xlsm", rfc2231="continued"),  # filename*0*=utf-8''...; filename*1*=...
    ])
    assert b"filename*0*=" in msg  # the continuation form really is in the message
    names = [a.name for a in decode_message(msg).attachments]
    assert names == ["請求書.zip", "明細書.pdf.exe", "見積書_" + "長" * 40 + ".xlsm"]


def test_html_to_text_survives_garbage():
    assert "x" in html_to_text("<p>x<<<</<!--")


def test_normalize_makes_full_and_half_width_one():
    assert normalize("ＩＮＶＯＩＣＥ ｾｲｷｭｳｼｮ") == normalize("invoice セイキュウショ")


def test_parts_and_depth_are_bounded(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PARTS", 10)
    outer = MIMEMultipart()
    for i in range(30):
        outer.attach(MIMEText(f"part {i}"))
    d = decode_message(outer.as_bytes())
    assert "more than 10 MIME parts" in d.truncated
    assert "part 29" not in d.text


def test_raw_8bit_parameters_as_swaks_and_old_mailers_write_them():
    # Found by sending with swaks: a raw UTF-8 (or Shift_JIS) file name in quotes made the
    # email package return Header objects, and the content check answered 451.
    for encoding in ("utf-8", "cp932"):
        raw = ("Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
               "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
               "Content-Type: application/zip; name=\"請求書.zip\"\r\n"
               "Content-Disposition: attachment; filename=\"請求書.zip\"\r\n"
               "Content-Transfer-Encoding: base64\r\n\r\nUEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==\r\n--b--\r\n").encode(encoding)
        d = decode_message(raw)
        assert [a.name for a in d.attachments] == ["請求書.zip"] and not d.truncated, encoding


def test_a_part_that_cannot_be_read_is_kept_and_marked(monkeypatch):
    calls = []

    def broken(part, *a, **k):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(decode, "part_filename", broken)
    msg = japanese_message(attachments=[attachment(b"PK\x05\x06" + bytes(18), "a.zip")])
    d = decode_message(msg)
    assert calls and "could not be read (RuntimeError)" in d.truncated
    assert any(a.name == "" for a in d.attachments)


def test_prefix_subject_is_7bit_once_and_keeps_the_body():
    from kanmon.content.decode import prefix_subject

    msg = b"From: a\r\nSubject: " + jis_word("請求書").encode() + b"\r\n\r\nbody Subject: not this\r\n"
    tagged = prefix_subject(msg, "[要確認]")
    assert tagged.startswith(b"From: a\r\nSubject: =?UTF-8?B?")
    assert decode_header_value(tagged.split(b"\r\n")[1][9:].decode()) == "[要確認] 請求書"
    assert prefix_subject(tagged, "[要確認]") == tagged
    assert tagged.endswith(b"\r\n\r\nbody Subject: not this\r\n")
    assert prefix_subject(b"From: a\r\n\r\nx\r\n", "[X]") == b"From: a\r\nSubject: [X]\r\n\r\nx\r\n"


def test_undeclared_euc_jp_is_not_read_as_cp932_half_width_katakana():
    from kanmon.content.decode import decode_bytes

    text = "請求書送付のお知らせ"
    assert decode_bytes(text.encode("euc_jp")) == text
    assert decode_bytes(text.encode("cp932")) == text
    assert decode_bytes("ﾃｽﾄ送付".encode("cp932")) == "ﾃｽﾄ送付"  # Shift_JIS EUC-JP cannot read stays CP932
