"""Messages as Japanese mailers write them, for the content tests: ISO-2022-JP
encoded-word subjects (with the CP932 rows Windows adds), Shift_JIS bodies, HTML parts,
RFC 2231 attachment names, and a password-protected zip made with real ZipCrypto
(PKWARE traditional encryption, the "PPAP" habit) so no external zip tool is needed."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText


def to_iso2022jp(text: str) -> bytes:
    """ISO-2022-JP bytes as Windows mailers write them: CP932 rows (e.g. circled digits)
    included, which Python's iso2022_jp codec cannot write."""
    out = bytearray()
    kanji = False
    for ch in text:
        b = ch.encode("cp932")
        if len(b) == 1:
            if kanji:
                out += b"\x1b(B"
                kanji = False
            out += b
            continue
        if not kanji:
            out += b"\x1b$B"
            kanji = True
        s1, s2 = b
        j1 = ((s1 - (0x70 if s1 < 0xA0 else 0xB0)) << 1) - 1
        if s2 >= 0x9F:
            j1 += 1
            j2 = s2 - 0x7E
        else:
            j2 = s2 - 0x1F - (1 if s2 >= 0x80 else 0)
        out += bytes((j1, j2))
    if kanji:
        out += b"\x1b(B"
    return bytes(out)


def jis_word(text: str) -> str:
    """An RFC 2047 encoded-word in ISO-2022-JP, base64."""
    return "=?ISO-2022-JP?B?" + base64.b64encode(to_iso2022jp(text)).decode() + "?="


def _zipcrypto(plain: bytes, password: bytes, check: int) -> bytes:
    keys = [0x12345678, 0x23456789, 0x34567890]

    def crc(value: int, byte: int) -> int:
        return zlib.crc32(bytes([byte]), value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def update(byte: int) -> None:
        keys[0] = crc(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = crc(keys[2], keys[1] >> 24)

    def stream() -> int:
        t = (keys[2] | 2) & 0xFFFF
        return ((t * (t ^ 1)) >> 8) & 0xFF

    for p in password:
        update(p)
    out = bytearray()
    for p in bytes(11) + bytes([check]) + plain:  # 12-byte header, its last byte the CRC's high byte
        out.append(p ^ stream())
        update(p)
    return bytes(out)


def encrypted_zip(members: dict[str, bytes], password: bytes = b"himitsu") -> bytes:
    """A zip whose members are stored and encrypted with ZipCrypto (flag bit 0)."""
    out = io.BytesIO()
    central = []
    for name, plain in members.items():
        raw_name = name.encode("utf-8")
        crc = zlib.crc32(plain)
        data = _zipcrypto(plain, password, crc >> 24)
        offset = out.tell()
        flags = 0x1 | 0x800  # encrypted, UTF-8 name
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, 0, 0, crc, len(data), len(plain), len(raw_name), 0))
        out.write(raw_name + data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, 0, 0, 0, crc, len(data), len(plain),
                                   len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name)
    start = out.tell()
    for c in central:
        out.write(c)
    size = out.tell() - start
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), size, start, 0))
    return out.getvalue()


def plain_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def zip_with_names(members: dict[str | bytes, bytes]) -> bytes:
    """A zip whose member names are written as given: a str as zipfile writes it (the
    UTF-8 flag, bit 11, set when it is not ASCII), bytes as they are without the flag, as
    Windows Explorer (CP932) and Info-ZIP zip on Linux (UTF-8) write them. zipfile sets
    the flag on any name not ASCII, so such bytes go in as an ASCII stand-in of their
    length, replaced in the local header and the central directory (names are outside
    the CRC)."""
    out = io.BytesIO()
    stand_ins: dict[bytes, bytes] = {}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for i, (name, data) in enumerate(members.items()):
            if isinstance(name, str):
                z.writestr(name, data)
                continue
            stand_in = f"~{i}~".ljust(len(name), "~").encode()
            assert len(stand_in) == len(name), "a raw name of 4 bytes or more"
            z.writestr(stand_in.decode(), data)
            stand_ins[stand_in] = name
    archive = out.getvalue()
    for stand_in, raw in stand_ins.items():
        assert archive.count(stand_in) == 2, "the stand-in is in the two headers only"
        archive = archive.replace(stand_in, raw)
    return archive


def attachment(data: bytes, filename: str, *, rfc2231: str | None = "iso-2022-jp", subtype: str = "octet-stream"):
    """An attachment part named as Japanese mailers name it: RFC 2231 (filename*=) in a
    charset, or (rfc2231=None) an encoded-word in quotes, as Outlook and Becky! write."""
    part = MIMEApplication(data, subtype)
    if rfc2231 is None:
        part.add_header("Content-Disposition", "attachment", filename=jis_word(filename))
    elif rfc2231 == "continued":
        # RFC 2231 3 and 4: the value split into numbered, percent-encoded sections.
        quoted = "".join(f"%{b:02X}" for b in filename.encode())
        sections = [quoted[i:i + 60] for i in range(0, len(quoted), 60)]
        params = "".join(f";\r\n filename*{n}*={'utf-8' + chr(39) * 2 if n == 0 else ''}{s}" for n, s in enumerate(sections))
        part.add_header("Content-Disposition", "attachment")
        part.replace_header("Content-Disposition", "attachment" + params)
    else:
        # RFC 2231 with a charset Python's email package will not encode itself: by hand.
        quoted = "".join(f"%{b:02X}" for b in to_iso2022jp(filename))
        part.add_header("Content-Disposition", "attachment")
        part.replace_header("Content-Disposition", f"attachment; filename*=iso-2022-jp''{quoted}")
    return part


def japanese_message(subject: str = "【至急】請求書のご確認", body: str = "いつもお世話になっております。", *,
                     html: str | None = None, attachments=(), sender: str = "katou@partner.example",
                     to: str = "tanaka@corp.example") -> bytes:
    """A message with an ISO-2022-JP encoded Subject and a Shift_JIS body (and optional
    HTML part and attachments), CRLF line ends."""
    # By hand: Python's email package would re-encode a shift_jis part as ISO-2022-JP.
    text = MIMEText("", "plain")
    text.set_payload(base64.encodebytes(body.encode("cp932")).decode())
    text.replace_header("Content-Type", 'text/plain; charset="Shift_JIS"')
    text.replace_header("Content-Transfer-Encoding", "base64")
    if html is None and not attachments:
        msg = text
    else:
        msg = MIMEMultipart()
        msg.attach(text)
        if html is not None:
            msg.attach(MIMEText(html, "html", "utf-8"))
        for part in attachments:
            msg.attach(part)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = jis_word(subject)
    msg["Message-ID"] = "<sample@partner.example>"
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
