"""A client of Rspamd's HTTP protocol (POST /checkv2), for a spam score and action.

Role: send the message with what Rspamd needs to know about the transaction (headers IP,
Helo, From, Rcpt, User, Queue-Id) and read its JSON answer: score, required score, action
("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject"), the
subject to use for "rewrite subject", and the symbols. HTTP/1.1 with Connection: close on
a plain socket: the exchange is one request and one bounded response, no library needed.

Trusts: Rspamd's answer only as far as its form (types checked; the symbol names kept
printable and short).
Never: wait without a timeout; read an answer larger than MAX_ANSWER.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_ANSWER = 1024 * 1024
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class SpamResult:
    status: str  # ok | error
    score: float = 0.0
    required: float = 0.0
    action: str = "no action"
    subject: str = ""  # rewrite subject: the subject Rspamd proposes
    symbols: tuple[str, ...] = field(default_factory=tuple)
    error: str = ""


def _header_value(v: str) -> str:
    return re.sub(r"[\r\n\x00]", " ", v)[:500]


async def check(url: str, data: bytes, *, ip: str = "", helo: str = "", mail_from: str = "", rcpts=(), user: str = "",
                queue_id: str = "", timeout: float = 30.0) -> SpamResult:
    """Rspamd's verdict; never raises for a network or protocol problem (status error)."""
    try:
        async with asyncio.timeout(timeout):
            return await _check(url, data, ip, helo, mail_from, rcpts, user, queue_id)
    except asyncio.TimeoutError:
        return SpamResult("error", error=f"rspamd at {url} did not answer within {timeout:g} s")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        return SpamResult("error", error=f"rspamd at {url}: {type(e).__name__}: {e}")


def parse_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: write http://host:port (Rspamd's normal worker, usually port 11333)")
    return parts.hostname, parts.port or 11333, (parts.path.rstrip("/") or "") + "/checkv2"


async def _check(url, data, ip, helo, mail_from, rcpts, user, queue_id) -> SpamResult:
    host, port, path = parse_url(url)
    headers = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(data)}"]
    for name, value in (("IP", ip), ("Helo", helo), ("From", mail_from), ("User", user), ("Queue-Id", queue_id)):
        if value:
            headers.append(f"{name}: {_header_value(value)}")
    headers += [f"Rcpt: {_header_value(r)}" for r in rcpts]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("utf-8", "replace"))
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not status_line.startswith("HTTP/1.") or status_line.split(" ")[1:2] != ["200"]:
            return SpamResult("error", error=f"rspamd at {url}: {status_line[:100]!r}")
        chunks, size = [], 0
        while size <= MAX_ANSWER:  # to EOF (Connection: close): the answer may come in pieces
            chunk = await reader.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        body = b"".join(chunks)
        if len(body) > MAX_ANSWER:
            return SpamResult("error", error=f"rspamd at {url}: answer larger than {MAX_ANSWER} bytes")
    finally:
        writer.close()
    return parse_answer(body)


def parse_answer(body: bytes) -> SpamResult:
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return SpamResult("error", error="rspamd: the answer is not JSON")
    if not isinstance(d, dict):
        return SpamResult("error", error="rspamd: the answer is not a JSON object")
    score, required, action = d.get("score"), d.get("required_score", 0.0), d.get("action")
    if not isinstance(score, (int, float)) or not isinstance(required, (int, float)) or action not in ACTIONS:
        return SpamResult("error", error=f"rspamd: unexpected answer (score {score!r}, action {action!r})")
    subject = d.get("subject") if isinstance(d.get("subject"), str) else ""
    symbols = d.get("symbols") if isinstance(d.get("symbols"), dict) else {}
    names = tuple(_PRINTABLE.sub("?", str(k))[:64] for k in list(symbols)[:50])
    return SpamResult("ok", float(score), float(required), action, subject, names)
