"""The Authentication-Results header (RFC 8601) and the removal of forged ones.

Role: format one Authentication-Results value with our authserv-id from the SPF, DKIM,
DMARC and ARC results; find the incoming Authentication-Results fields that carry our
authserv-id (RFC 8601 5: a receiver removes them, they can only be forged) and return
the message without them.

Trusts: nothing in the message. Every value from it goes through kanmon.auth.values.
Never: remove a field with another authserv-id; write CR or LF into a value.
"""

from __future__ import annotations

import re

from kanmon.auth.dkim import ArcResult, DkimSignatureResult
from kanmon.auth.dmarc import DmarcResult
from kanmon.auth.spf import SpfResult
from kanmon.auth.values import comment, value

_AR_FIELD = re.compile(rb"(?im)^Authentication-Results[ \t]*:(?:[^\r\n]*\r\n[ \t])*[^\r\n]*\r\n")
_COMMENT = re.compile(r"\([^()]*\)")


def authserv_id_of(field_value: str) -> str:
    """The authserv-id an A-R value starts with (comments and whitespace skipped), lower case."""
    text = field_value
    for _ in range(3):  # nested comments, a few levels
        text = _COMMENT.sub(" ", text)
    text = text.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end].lower() if end > 0 else ""
    return re.split(r"[\s;]", text, maxsplit=1)[0].lower()


def strip_forged(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """The header block without the Authentication-Results fields naming authserv_id,
    and how many were removed."""
    ours = authserv_id.lower()
    removed = 0

    def keep(m: re.Match[bytes]) -> bytes:
        nonlocal removed
        name_end = m.group(0).index(b":")
        val = m.group(0)[name_end + 1 :].replace(b"\r\n", b"").decode("utf-8", "replace")
        if authserv_id_of(val) == ours:
            removed += 1
            return b""
        return m.group(0)

    out = _AR_FIELD.sub(keep, header)
    return out, removed


# the comment when pyspf gives no explanation (it gives none for these)
_SPF_TEXT = {"none": "no SPF record", "neutral": "SPF record neither permits nor denies"}


def _spf_part(spf: SpfResult) -> list[str]:
    parts = []
    o = spf.mailfrom
    if spf.sender:
        parts.append(f"spf={o.result} ({comment(o.explanation or _SPF_TEXT.get(o.result, o.result))}) smtp.mailfrom={value(spf.sender)}")
    elif spf.helo is None:
        parts.append(f"spf={o.result} ({comment(o.explanation or _SPF_TEXT.get(o.result, o.result))}) smtp.mailfrom=<>")
    if spf.helo is not None:
        h = spf.helo
        parts.append(f"spf={h.result} ({comment(h.explanation or _SPF_TEXT.get(h.result, h.result))}) smtp.helo={value(spf.helo_name)}")
    return parts


def _dkim_part(s: DkimSignatureResult) -> str:
    out = f"dkim={s.result}"
    if s.reason:
        out += f" ({comment(s.reason)})"
    if s.domain:
        out += f" header.d={value(s.domain)}"
    if s.selector:
        out += f" header.s={value(s.selector)}"
    if s.algorithm:
        out += f" header.a={value(s.algorithm)}"
    if s.b:
        out += f" header.b={value(s.b)}"
    return out


def _dmarc_part(d: DmarcResult) -> str:
    bits = []
    if d.record is not None:
        bits.append(f"p={d.record.p} sp={d.record.sp} dis={d.policy.upper()}")
        if d.record.pct != 100:
            bits.append(f"pct={d.record.pct}")
    if d.reason:
        bits.append(d.reason)
    out = f"dmarc={d.result}"
    if bits:
        out += f" ({comment('; '.join(bits))})"
    if d.from_domain:
        out += f" header.from={value(d.from_domain)}"
    return out


def _arc_part(a: ArcResult) -> str:
    out = f"arc={a.result}"
    bits = []
    if a.instances:
        bits.append(f"i={a.instances}")
    if a.sealer:
        bits.append(f"sealer {a.sealer}")
    if a.reason:
        bits.append(a.reason)
    if bits:
        out += f" ({comment('; '.join(bits))})"
    return out


def authentication_results(
    authserv_id: str, *, spf: SpfResult | None = None, dkim: list[DkimSignatureResult] | None = None,
    dkim_checked: bool = False, dmarc: DmarcResult | None = None, dmarc_note: str = "", arc: ArcResult | None = None,
) -> str:
    """The A-R value: authserv-id; then one resinfo per result ("none" when nothing was found)."""
    parts = [authserv_id]
    if spf is not None:
        parts += _spf_part(spf)
    if dkim:
        parts += [_dkim_part(s) for s in dkim]
    elif dkim_checked:
        parts.append("dkim=none (no signatures)")
    if dmarc is not None:
        part = _dmarc_part(dmarc)
        if dmarc_note:
            part = part.replace(" header.from=", f" ({comment(dmarc_note)}) header.from=", 1) if " header.from=" in part else part + f" ({comment(dmarc_note)})"
        parts.append(part)
    if arc is not None:
        parts.append(_arc_part(arc))
    if len(parts) == 1:
        parts.append("none")
    return "; ".join(parts)
