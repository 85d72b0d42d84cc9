"""Parsing of MAIL FROM / RCPT TO arguments (RFC 5321 4.1.2, 4.1.1.2, 4.1.1.3).

Role: turn the untrusted text after `MAIL FROM:` / `RCPT TO:` into a normalised
address and its ESMTP parameters, or raise SmtpError with the right reply.

Trusts: nothing. Input is raw client text (already known to be one line without
CR or LF). Never: accept a routed address (source route, `%`, `!`, or a second `@`
in the local part) — those are how open relays are abused (DESIGN.md promise 4).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from kanmon.model import Reply, SmtpError, check_sendable
from kanmon.smtp import replies
from kanmon.smtp.xtext import xtext_decode

# RFC 5321 4.5.3.1: size limits of objects.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5321 4.1.2: atext of Dot-string.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(\.[{_ATEXT}]+)*$")
_DOT_STRING_UTF8 = re.compile(rf"^([{_ATEXT}]|[^\x00-\x7f])+(\.([{_ATEXT}]|[^\x00-\x7f])+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_LABEL_UTF8 = re.compile(r"^([A-Za-z0-9]|[^\x00-\x7f])(([A-Za-z0-9-]|[^\x00-\x7f]){0,61}([A-Za-z0-9]|[^\x00-\x7f]))?$")


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed reverse-path or forward-path."""

    address: str  # "local@domain", or "" for the null reverse-path <>
    local: str = ""
    domain: str = ""  # lower case
    params: dict[str, str | None] = field(default_factory=dict)


def _split_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not key or not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*$", key):
            raise SmtpError(replies.SYNTAX_PARAMS)
        params[key.upper()] = value if eq else None
    return params


def _control_in_params(rest: str) -> Reply:
    """The reply for a control character after the path: 501 5.5.4 naming the parameter
    it is in (a parameter's value, not the address, is what is wrong)."""
    for item in rest.split(" "):
        if _CONTROL.search(item):
            key = item.partition("=")[0]
            if re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*$", key):
                return replies.bad_parameter(key)
            break
    return replies.SYNTAX_PARAMS


def _split_path(arg: str, bad: Reply, strict: bool = False) -> tuple[str, str]:
    """'<a@b> SIZE=1' -> ('a@b', 'SIZE=1'), honouring quoted strings inside <>.
    strict: the address must be in <> and followed by nothing or a space (RFC 5321
    4.1.2 Path, Postfix strict_rfc821_envelopes): else STRICT_SYNTAX."""
    arg = arg.strip(" ")  # spaces only: a control character at either end is refused, not dropped
    if not arg.startswith("<"):
        if strict:
            raise SmtpError(replies.STRICT_SYNTAX)
        # Be liberal as Postfix is: a bare address without <> and without spaces.
        first, _, rest = arg.partition(" ")
        if not first or "<" in first or ">" in first:
            raise SmtpError(bad)
        return first, rest
    if '"' not in arg:
        # No quoted string: the path ends at the first ">" (one C-level scan).
        i = arg.find(">", 1)
        if i < 0:
            raise SmtpError(bad)
        rest = arg[i + 1 :]
        if strict and rest and not rest.startswith(" "):
            raise SmtpError(replies.STRICT_SYNTAX)  # <a@b>junk
        return arg[1:i], rest
    i = 1
    in_quote = False
    while i < len(arg):
        ch = arg[i]
        if in_quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == ">":
            rest = arg[i + 1 :]
            if strict and rest and not rest.startswith(" "):
                raise SmtpError(replies.STRICT_SYNTAX)  # <a@b>junk
            return arg[1:i], rest
        i += 1
    raise SmtpError(bad)


def _check_domain(domain: str, utf8: bool, bad: Reply) -> str:
    if not domain or len(domain) > MAX_DOMAIN:
        raise SmtpError(bad)
    if domain.startswith("["):
        # RFC 5321 4.1.3: address literal.
        if not domain.endswith("]"):
            raise SmtpError(bad)
        inner = domain[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
            try:
                ipaddress.IPv6Address(inner)
            except ValueError:
                raise SmtpError(bad) from None
            return f"[IPv6:{inner.lower()}]"
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise SmtpError(bad) from None
        return f"[{inner}]"
    label_re = _LABEL_UTF8 if utf8 else _LABEL
    # A trailing dot (<u@victim.>) is not a valid SMTP domain (RFC 5321 4.1.2).
    if any(not label_re.match(label) for label in domain.split(".")):
        raise SmtpError(bad)
    return domain.lower()


def _check_local(local: str, utf8: bool, bad: Reply) -> str:
    if not local or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise SmtpError(bad)
    if local.startswith('"'):
        # RFC 5321 4.1.2 Quoted-string: unquote, reject controls.
        if len(local) < 2 or not local.endswith('"'):
            raise SmtpError(bad)
        inner = re.sub(r"\\(.)", r"\1", local[1:-1])
        if any(ord(c) < 32 or ord(c) == 127 for c in inner):
            raise SmtpError(bad)
        if any(c in inner for c in "@%!"):
            raise SmtpError(replies.ROUTED_ADDRESS)
        if re.match(_DOT_STRING, inner):
            return inner
        return local  # keep it quoted
    if "%" in local or "!" in local:
        raise SmtpError(replies.ROUTED_ADDRESS)
    if not (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local):
        raise SmtpError(bad)
    return local


def parse_path(arg: str, *, is_sender: bool, smtputf8_allowed: bool, strict: bool = False) -> Path:
    """Parse the argument of MAIL FROM: or RCPT TO: (after the colon). strict: the
    address must be in <> (a session profile's strict_syntax); otherwise a bare
    address without spaces is taken, as Postfix does."""
    bad = replies.BAD_SENDER_SYNTAX if is_sender else replies.BAD_RCPT_SYNTAX
    inside, rest = _split_path(arg, bad, strict)
    if _CONTROL.search(inside):
        raise SmtpError(bad)  # NUL and other controls never belong in a path
    if _CONTROL.search(rest):
        raise SmtpError(_control_in_params(rest))
    params = _split_params(rest)
    utf8 = "SMTPUTF8" in params and is_sender
    non_ascii = not inside.isascii()
    if non_ascii and not (smtputf8_allowed and (utf8 or not is_sender)):
        raise SmtpError(replies.NO_UTF8)
    if len(inside.encode("utf-8")) > MAX_PATH:
        raise SmtpError(bad)
    if inside == "":
        if is_sender:
            return Path("", params=params)
        raise SmtpError(bad)
    if inside.startswith("@"):
        # RFC 5321 4.1.1.3 source route <@a,@b:u@c>: obsolete, and a relay trick.
        raise SmtpError(replies.ROUTED_ADDRESS)
    # The domain is after the last @ that is not inside quotes.
    if inside.startswith('"'):
        end = 1
        while end < len(inside):
            if inside[end] == "\\":
                end += 2
                continue
            if inside[end] == '"':
                break
            end += 1
        local, at, domain = inside[: end + 1], inside[end + 1 : end + 2], inside[end + 2 :]
        if at != "@":
            raise SmtpError(bad)
    else:
        local, at, domain = inside.rpartition("@")
        if not at:
            # RFC 5321 4.1.1.3: "postmaster" without a domain is allowed as RCPT.
            if not is_sender and inside.lower() == "postmaster":
                return Path("postmaster", "postmaster", "", params)
            raise SmtpError(bad)
        if "@" in local:
            raise SmtpError(replies.ROUTED_ADDRESS)  # u@victim@ours
    local = _check_local(local, non_ascii, bad)
    domain = _check_domain(domain, non_ascii, bad)
    address = f"{local}@{domain}"
    try:
        check_sendable(address)  # what the outbound client would refuse is refused now
    except ValueError:
        raise SmtpError(replies.UNSENDABLE_SENDER if is_sender else replies.UNSENDABLE_RCPT) from None
    return Path(address, local, domain, params)


# ---------------------------------------------------------------------------
# RFC 3461 DSN parameters: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.
# A malformed value is 501 5.5.4 naming the parameter, like any other parameter syntax error.

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")  # in the order we write them
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+$")  # atom


def _printable(text: str) -> bool:
    return all(" " <= ch <= "~" or ord(ch) > 127 for ch in text)


def parse_ret(value: str | None) -> str:
    """RET=FULL|HDRS (RFC 3461 4.3) -> "FULL" or "HDRS"."""
    if value is None or value.upper() not in ("FULL", "HDRS"):
        raise SmtpError(replies.bad_parameter("RET"))
    return value.upper()


def parse_envid(value: str | None) -> str:
    """ENVID=xtext (RFC 3461 4.4) -> the decoded envelope id (printable US-ASCII)."""
    if not value or len(value) > MAX_ENVID:
        raise SmtpError(replies.bad_parameter("ENVID"))
    try:
        envid = xtext_decode(value)
    except ValueError:
        raise SmtpError(replies.bad_parameter("ENVID")) from None
    if not envid.isascii() or not _printable(envid):
        raise SmtpError(replies.bad_parameter("ENVID"))
    return envid


def parse_notify(value: str | None) -> str:
    """NOTIFY=NEVER | SUCCESS,FAILURE,DELAY in any order (RFC 3461 4.1) -> "NEVER" or the
    keywords given, comma-separated in a fixed order. NEVER with another keyword, an
    unknown or an empty one is a syntax error."""
    if not value:
        raise SmtpError(replies.bad_parameter("NOTIFY"))
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if any(w not in NOTIFY_KEYWORDS for w in words):
        raise SmtpError(replies.bad_parameter("NOTIFY"))
    return ",".join(k for k in NOTIFY_KEYWORDS if k in words)


def parse_orcpt(value: str | None) -> str:
    """ORCPT=addr-type;xtext (RFC 3461 4.2) -> "addr-type;address", decoded."""
    if not value or len(value) > MAX_ORCPT:
        raise SmtpError(replies.bad_parameter("ORCPT"))
    addr_type, sep, encoded = value.partition(";")
    if not sep or not encoded or not _ADDR_TYPE.match(addr_type):
        raise SmtpError(replies.bad_parameter("ORCPT"))
    try:
        address = xtext_decode(encoded, utf8=addr_type.lower() == "utf-8")
    except ValueError:
        raise SmtpError(replies.bad_parameter("ORCPT")) from None
    if not _printable(address):
        raise SmtpError(replies.bad_parameter("ORCPT"))
    return f"{addr_type.lower() if addr_type.lower() in ('rfc822', 'utf-8') else addr_type};{address}"
