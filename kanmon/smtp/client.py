"""Outbound SMTP client: one connection to one server (kanmon.deliver.scache keeps them for reuse).

Role: speak ESMTP to a next hop (a relay server, a smarthost or an MX host) and report
what it said for each recipient. Greeting, EHLO (HELO fallback), STARTTLS by policy,
PIPELINING, SIZE, 8BITMIME (8-bit parts re-encoded 7-bit for a server without it:
kanmon.smtp.downgrade)/SMTPUTF8, DATA, RSET between transactions (with PIPELINING
in one write with the next MAIL, RCPT and DATA: `reset_pending`), QUIT. The
caller (deliver/smtp.py) decides what to do with the results; this module never
touches the spool or the records.

Trusts: the caller's envelope and body (already accepted and spooled by us) — but still
refuses addresses with control characters, because they would become SMTP commands.
Does not trust the server at all: every reply line is bounded (RFC 5321 4.5.3.1.5,
MAX_REPLY_LINE: a longer line is cut, not refused, as Postfix does; MAX_REPLY_LINES), every read has a timeout (RFC 5321 4.5.3.2), reply
text is stripped of control characters before anyone logs it or puts it into a DSN, and
whatever the server sent after its `220` to STARTTLS is thrown away (CVE-2011-0411;
DESIGN.md promise 3).

Never: send a body with bare CR or LF (it is normalised to CRLF so a downstream server
cannot be smuggled a second message, CVE-2023-51764), send anything but `.\\r\\n` as the
end of data, wait on the network without a timeout, or buffer a server's reply without a
bound.
"""

from __future__ import annotations

import asyncio
import warnings
import re
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from kanmon.model import CrlfChecked, DotFree, Envelope, LocalReply, Reply, check_sendable, describe_reply
from kanmon.smtp.downgrade import ConversionLimit, downgrade_8bit
from kanmon.smtp.xtext import xtext_encode

if TYPE_CHECKING:
    from kanmon.config import Config, TlsPolicy

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF. A longer one is
# tolerated, as Postfix does: its first MAX_REPLY_LINE - 2 octets are kept, the rest of the
# line is dropped; a "line" still without its LF after MAX_REPLY_DISCARD more octets is a
# protocol error. A whole reply keeps at most MAX_REPLY_LINES * MAX_REPLY_LINE octets.
MAX_REPLY_LINE = 512
MAX_REPLY_DISCARD = 64 * 1024
# Our own bound on a multi-line reply (an EHLO answer has ~10-20 lines).
MAX_REPLY_LINES = 100
# Pause reading from a server that sends more than this without being asked.
READ_HIGH_WATER = 64 * 1024
# The body goes out in blocks; each must be taken within command_timeout
# (RFC 5321 4.5.3.2.5: data block, 3 minutes), so a big message on a slow link is fine.
DATA_BLOCK = 256 * 1024
# 8-bit to 7-bit conversions (kanmon.smtp.downgrade) run here, one at a time, off the loop.
_DOWNGRADE_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kanmon-downgrade")

TLS_POLICIES = ("none", "opportunistic", "required", "verify", "smtps")

_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


# ---------------------------------------------------------------------------
# Replies and errors


class SmtpClientError(Exception):
    """A failure of the session (not of one recipient). `reply` is what to record.

    `try_next` says whether another server should be tried in the same attempt.
    """

    try_next = True

    def __init__(self, reply: Reply):
        self.reply = reply
        super().__init__(describe_reply(reply))


class ConnectFailed(SmtpClientError):
    """The TCP connection (or implicit TLS handshake) could not be made."""


class ServerRefused(SmtpClientError):
    """4xx/5xx to the greeting, EHLO or HELO: the server will not talk to us now."""


class TlsUnavailable(SmtpClientError):
    """The TLS policy asks for TLS (or a valid certificate) and this server cannot give it."""


class ConnectionLost(SmtpClientError):
    """The server went away, timed out or spoke garbage during a session.

    `after_data_end`: the final dot had been sent, so the message may have been delivered;
    the caller must not send it to another server in the same attempt.
    """

    def __init__(self, reply: Reply, *, after_data_end: bool = False):
        super().__init__(reply)
        self.after_data_end = after_data_end
        self.try_next = not after_data_end


def clean_text(text: str) -> str:
    """Replace control characters (CR, LF, NUL, ESC, DEL, U+2028...) with '?'."""
    return _CONTROL_RE.sub("?", text)


def check_address(address: str) -> None:
    """Raise ValueError if an envelope address could break an SMTP command line (the
    receiver's parse_path refuses the same at MAIL/RCPT: kanmon.model.check_sendable)."""
    check_sendable(address)


def _is_last_line(line: bytes) -> bool:
    """RFC 5321 4.2: every line of a reply but the last has a hyphen after the code."""
    return len(line) < 4 or line[3:4] != b"-"


def _more_lines(line: bytes, lines: list[bytes]) -> bool:
    """Append a reply line; whether more lines of the reply follow (ValueError beyond
    MAX_REPLY_LINES)."""
    lines.append(line)
    if _is_last_line(line):
        return False
    if len(lines) >= MAX_REPLY_LINES:
        raise ValueError(f"reply longer than {MAX_REPLY_LINES} lines")
    return True


def parse_reply(lines: Sequence[bytes]) -> Reply:
    """Reply lines (CRLF stripped) -> Reply. Raises ValueError for malformed lines.

    RFC 5321 4.2: `ddd-text` for all lines but the last, `ddd text` (or `ddd`) last.
    RFC 2034: a leading enhanced status code x.y.z of the same class is split off.
    """
    if not lines:
        raise ValueError("empty reply")
    code = None
    texts: list[str] = []
    enhanced = ""
    for i, raw in enumerate(lines):
        if len(raw) < 3 or not raw[:3].isdigit():
            raise ValueError(f"malformed reply line {raw[:40]!r}")
        this_code = int(raw[:3])
        if code is None:
            code = this_code
        elif this_code != code:
            raise ValueError("reply lines with different codes")
        sep = raw[3:4]
        last = i == len(lines) - 1
        if sep not in (b" ", b"-", b"") or (sep == b"-") == last:
            raise ValueError(f"malformed reply line {raw[:40]!r}")
        text = clean_text(raw[4:].decode("utf-8", "replace"))
        m = _ENHANCED_RE.match(text)
        if m and int(m.group(1)) == code // 100:
            if i == 0:
                enhanced = ".".join(m.group(1, 2, 3))
            if ".".join(m.group(1, 2, 3)) == enhanced:
                text = text[m.end():]
        texts.append(text.strip())
    assert code is not None
    if not 200 <= code <= 599:
        raise ValueError(f"reply code {code} out of range")
    return Reply(code, enhanced, "\n".join(texts))


# ---------------------------------------------------------------------------
# The body on the wire


def encode_data(body: bytes) -> bytes:
    """The spooled message -> the bytes after DATA, ending with `.\r\n`.

    Bare CR and bare LF become CRLF (no smuggling downstream, CVE-2023-51764), unless the
    body is CrlfChecked; the body ends with CRLF, leading dots are doubled (RFC 5321
    4.5.2), unless the body is DotFree (no line starts with a dot). All C-level scans.
    """
    dot_free = isinstance(body, DotFree)
    if not isinstance(body, CrlfChecked):
        crlf = body.count(b"\r\n")
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if not dot_free:  # RFC 5321 4.5.2: transparency.
        body = body.replace(b"\r\n.", b"\r\n..")
        if body.startswith(b"."):
            body = b"." + body
    return body + b".\r\n"


# ---------------------------------------------------------------------------
# Settings and TLS


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What a connection needs from the configuration (RFC 5321 4.5.3.2 timeouts)."""

    hostname: str
    connect_timeout: float = 30.0  # connect + greeting (RFC: 5 min for the greeting)
    command_timeout: float = 300.0  # EHLO, MAIL, RCPT, DATA, RSET, each data block
    data_timeout: float = 600.0  # reply to the final dot (RFC 5321 4.5.3.2.6)
    ca_file: Path | None = None  # for verify=OK/FAIL and tls = verify
    bind_address: str | None = None  # local address connections leave from (smtp_bind_address)

    @classmethod
    def from_config(cls, config: Config) -> ClientSettings:
        out = config.outbound
        return cls(
            hostname=config.server.hostname,
            connect_timeout=out.connect_timeout,
            command_timeout=out.command_timeout,
            data_timeout=out.data_timeout,
            ca_file=out.ca_file,
            bind_address=out.bind_address,
        )


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the event log says about a TLS session."""

    version: str
    cipher: str
    bits: int
    alg_bits: int
    verify: str  # OK (valid for the server name) | FAIL (not) | NONE (no certificate shown)
    # The certificates the server sent, leaf first (DER), for DANE and pinning checks.
    chain: tuple[bytes, ...] = field(default=(), repr=False, compare=False)

    def describe(self) -> str:
        """For RecipientResult.tls: `TLSv1.3 TLS_AES_256_GCM_SHA384 verify=FAIL`."""
        return f"{self.version} {self.cipher} verify={self.verify}"


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@lru_cache(maxsize=8)
def _trust_store(ca_file: str | None):  # -> cryptography Store | None
    from cryptography import x509
    from cryptography.x509.verification import Store

    paths: list[Path] = []
    if ca_file:
        paths.append(Path(ca_file))
    else:
        default = ssl.get_default_verify_paths()
        for p in (default.cafile, default.openssl_cafile):
            if p and Path(p).is_file():
                paths.append(Path(p))
                break
    certs = []
    for p in paths:
        try:
            with warnings.catch_warnings():
                # System bundles hold old roots with odd serial numbers; cryptography warns
                # about them (CryptographyDeprecationWarning) but loads them.
                warnings.simplefilter("ignore")
                certs.extend(x509.load_pem_x509_certificates(p.read_bytes()))
        except (OSError, ValueError):
            continue
    return Store(certs) if certs else None


def _leaf_policy():  # -> cryptography ExtensionPolicy
    """Web PKI rules for the server certificate, but tolerant of a critical
    subjectAltName or extendedKeyUsage (OpenSSL accepts both; test CAs such as trustme
    issue them). serverAuth is still required when an extendedKeyUsage is present."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    def server_auth(_policy, _cert, eku) -> None:
        if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku):
            raise ValueError("certificate is not for TLS servers")

    return (
        ExtensionPolicy.webpki_defaults_ee()
        .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, server_auth)
    )


leaf_policy = _leaf_policy  # for the DANE-TA check (kanmon.deliver.dane)


def verify_peer_chain(chain_der: Sequence[bytes], server_name: str, ca_file: Path | None) -> bool:
    """Would this certificate chain pass verification for server_name? (for verify=OK|FAIL)

    Used on sessions that did not require verification (opportunistic, required, smtps):
    the handshake went on regardless, the answer only goes into the event log.
    """
    if not chain_der:
        return False
    try:
        import ipaddress

        from cryptography import x509
        from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder

        store = _trust_store(str(ca_file) if ca_file else None)
        if store is None:
            return False
        certs = [x509.load_der_x509_certificate(d) for d in chain_der]
        try:
            subject = x509.IPAddress(ipaddress.ip_address(server_name))
        except ValueError:
            subject = x509.DNSName(server_name.rstrip("."))
        verifier = (
            PolicyBuilder()
            .store(store)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_leaf_policy())
            .build_server_verifier(subject)
        )
        verifier.verify(certs[0], certs[1:])
        return True
    except Exception:  # any reason at all: not verified
        return False


def _peer_chain(sslobj) -> list[bytes]:
    """The certificates the server sent, leaf first (DER); [] when it sent none."""
    chain: list[bytes] = []
    inner = getattr(sslobj, "_sslobj", None)
    get_chain = getattr(inner, "get_unverified_chain", None)
    if get_chain is not None:
        try:
            chain = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in get_chain() or []]  # type: ignore[attr-defined]
        except Exception:
            chain = []
    if not chain and sslobj is not None:
        leaf = sslobj.getpeercert(binary_form=True)
        chain = [leaf] if leaf else []
    return chain


def _tls_info(transport: asyncio.BaseTransport, verify: str | None, server_name: str, ca_file: Path | None) -> TlsInfo:
    sslobj = transport.get_extra_info("ssl_object")
    cipher = transport.get_extra_info("cipher") or ("", "", 0)
    version = sslobj.version() if sslobj is not None else ""
    chain = _peer_chain(sslobj) if sslobj is not None else []
    if verify is None:
        if not chain:
            verify = "NONE"  # the server showed no certificate at all
        else:
            verify = "OK" if verify_peer_chain(chain, server_name, ca_file) else "FAIL"
    bits = cipher[2] or 0
    return TlsInfo(version=version or "", cipher=cipher[0] or "", bits=bits, alg_bits=bits, verify=verify,
                   chain=tuple(chain))


# ---------------------------------------------------------------------------
# The byte pipe: a Protocol with a bounded read buffer


class _Pipe(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.closed = False
        self.close_exc: BaseException | None = None
        # An over-long reply line being dropped up to its LF: its kept start, and how much
        # of the rest has gone.
        self._long_line: bytes | None = None
        self._dropped = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > READ_HIGH_WATER and not self._read_paused and self.transport is not None:
            self.transport.pause_reading()
            self._read_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.close_exc = exc
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # used by SmtpConnection (callers wrap these in timeouts)
    def read_line_nowait(self) -> bytes | None:
        """A line already received, as read_line() returns it; None when no whole line
        is buffered yet (nothing is taken then, but the dropped part of an over-long line).
        ValueError for a line without LF after MAX_REPLY_DISCARD octets."""
        if self._long_line is not None:
            end = self._buffer.find(b"\n")
            if end < 0:
                self._dropped += len(self._buffer)
                self._buffer.clear()
                self._resume_reading()
                if self._dropped > MAX_REPLY_DISCARD:
                    raise ValueError(f"reply line longer than {MAX_REPLY_LINE + MAX_REPLY_DISCARD} bytes")
                return None
            del self._buffer[: end + 1]
            line, self._long_line = self._long_line, None
            self._resume_reading()
            return line
        end = self._buffer.find(b"\n", 0, MAX_REPLY_LINE)
        if end >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._resume_reading()
            return line.rstrip(b"\r\n")
        if len(self._buffer) >= MAX_REPLY_LINE:
            # Longer than RFC 5321 allows (no LF in its first MAX_REPLY_LINE octets): keep
            # its start, drop the rest up to the LF, so a valid code still decides.
            self._long_line = bytes(self._buffer[: MAX_REPLY_LINE - 2])
            del self._buffer[:MAX_REPLY_LINE]
            self._dropped = 2
            return self.read_line_nowait()
        return None

    def _resume_reading(self) -> None:
        if self._read_paused and len(self._buffer) <= READ_HIGH_WATER // 2 and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    @property
    def drain_needed(self) -> bool:
        """Whether drain() has anything to do: wait (the transport asked us to stop
        writing) or report the connection closed."""
        return self._write_paused or self.closed

    async def read_line(self) -> bytes:
        """One line without its CRLF; at most MAX_REPLY_LINE bytes (a longer one cut)."""
        while True:
            line = self.read_line_nowait()
            if line is not None:
                return line
            if self.closed:
                raise EOFError
            if self._read_paused and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None

    def discard_buffered(self) -> int:
        """Throw away whatever the server sent that we have not read (CVE-2011-0411)."""
        n = len(self._buffer)
        self._buffer.clear()
        self._long_line = None
        return n

    def write(self, data: bytes | memoryview) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise EOFError
        self.transport.write(data)

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise EOFError

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# ---------------------------------------------------------------------------
# One connection


@dataclass(frozen=True, slots=True)
class DsnParams:
    """RFC 3461 parameters to pass on with a message (decoded; encoded as xtext here).
    Sent only to a server that offers DSN (RFC 3461 5.2.1)."""

    ret: str = ""  # FULL | HDRS
    envid: str = ""
    notify: dict[str, str] = field(default_factory=dict)  # rcpt -> NEVER | SUCCESS,FAILURE,DELAY
    orcpt: dict[str, str] = field(default_factory=dict)  # rcpt -> "addr-type;address"

    @classmethod
    def of(cls, env: Envelope) -> DsnParams | None:
        """The envelope's DSN parameters, or None when the client gave none."""
        if not (env.dsn_ret or env.dsn_envid or env.dsn_notify or env.dsn_orcpt):
            return None
        return cls(env.dsn_ret, env.dsn_envid, env.dsn_notify, env.dsn_orcpt)

    def mail_params(self) -> list[str]:
        out = []
        if self.ret:
            out.append(f"RET={self.ret}")
        if self.envid:
            out.append(f"ENVID={xtext_encode(self.envid)}")
        return out

    def rcpt_params(self, rcpt: str) -> str:
        out = ""
        if notify := self.notify.get(rcpt):
            out += f" NOTIFY={notify}"
        if orcpt := self.orcpt.get(rcpt):
            addr_type, _, address = orcpt.partition(";")
            if address.isascii():  # a utf-8 address would need RFC 6533's encoding: left out
                out += f" ORCPT={addr_type};{xtext_encode(address)}"
        return out


@dataclass(slots=True)
class TransactionResult:
    """Per-recipient replies of one mail transaction, in the order of `rcpts`."""

    replies: list[tuple[str, Reply]]
    mail_reply: Reply | None = None  # the reply to MAIL FROM (None: not sent)
    rcpt_replies: list[tuple[str, Reply]] = field(default_factory=list)  # the RCPT stage's own replies
    data_reply: Reply | None = None  # the reply to the final dot, if we got that far


@dataclass(slots=True)
class _Stage:
    name: str = "connecting"


class SmtpConnection:
    """An open, greeted, EHLO'd (and maybe TLS'd) SMTP session with one server.

    Made by `open_connection`. Use `send_message` for each transaction (`reset` between
    them when reusing), `quit` at the end. `address`/`port` is where we are connected,
    `server_name` the name we verify TLS for and log (`relay=`).
    """

    def __init__(self, pipe: _Pipe, *, address: str, port: int, server_name: str, settings: ClientSettings):
        self._pipe = pipe
        self.address = address
        self.port = port
        self.server_name = server_name
        self.settings = settings
        self.tls: TlsInfo | None = None
        self.tls_note = ""  # why a session is plaintext although TLS was wanted
        self.esmtp = False
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}
        self.transactions = 0
        self.last_used = time.monotonic()
        # RSET owed before the next transaction (a cached session taken for reuse): sent
        # first in that transaction's pipelined group, or on its own without PIPELINING.
        self.reset_pending = False
        self._stage = _Stage()
        self._usable = True

    # -- state

    @property
    def usable(self) -> bool:
        """Still connected and in a known state (no half-finished transaction)."""
        t = self._pipe.transport
        return self._usable and not self._pipe.closed and t is not None and not t.is_closing()

    @property
    def max_size(self) -> int:
        """RFC 1870 SIZE limit of the server; 0 = none announced."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    # -- low-level I/O

    def _lost(self, what: str, *, after_data_end: bool = False) -> ConnectionLost:
        self._usable = False
        self._pipe.abort()
        return ConnectionLost(
            LocalReply(451, "4.4.2", f"lost connection with {self.address} while {what}"),
            after_data_end=after_data_end,
        )

    def _timed_out(self, what: str, *, after_data_end: bool = False) -> ConnectionLost:
        self._usable = False
        self._pipe.abort()
        return ConnectionLost(
            LocalReply(451, "4.4.2", f"conversation with {self.address} timed out while {what}"),
            after_data_end=after_data_end,
        )

    async def _read_reply(self, timeout: float, what: str, *, after_data_end: bool = False) -> Reply:
        lines: list[bytes] = []
        pipe = self._pipe
        try:
            # A reply already received (pipelined replies come in one read) is taken
            # without arming a timer; the timeout bounds only the wait for the rest.
            while pipe._buffer and (line := pipe.read_line_nowait()) is not None and _more_lines(line, lines):
                pass
            if not lines or not _is_last_line(lines[-1]):
                async with asyncio.timeout(timeout):
                    while _more_lines(await pipe.read_line(), lines):
                        pass
            reply = parse_reply(lines)
            if reply.code == 421:
                self._usable = False  # RFC 5321 3.8: the server is closing the channel
            return reply
        except TimeoutError:
            raise self._timed_out(what, after_data_end=after_data_end) from None
        except EOFError:
            raise self._lost(what, after_data_end=after_data_end) from None
        except ValueError as e:
            self._usable = False
            self._pipe.abort()
            raise ConnectionLost(
                LocalReply(451, "4.5.0", f"protocol error from {self.address} while {what}: {clean_text(str(e))}"),
                after_data_end=after_data_end,
            ) from None

    async def _send(self, data: bytes | memoryview, what: str, *, timeout: float | None = None) -> None:
        try:
            self._pipe.write(data)
            if not self._pipe.drain_needed:
                return  # the transport takes it: no wait to bound (no timer armed)
            async with asyncio.timeout(self.settings.command_timeout if timeout is None else timeout):
                await self._pipe.drain()
        except TimeoutError:
            raise self._timed_out(what) from None
        except EOFError:
            raise self._lost(what) from None

    async def _command(self, line: str, what: str, *, timeout: float | None = None) -> Reply:
        await self._send(line.encode("utf-8") + b"\r\n", what)
        return await self._read_reply(self.settings.command_timeout if timeout is None else timeout, what)

    # -- session setup

    async def _greet(self) -> None:
        # RFC 5321 4.5.3.2.1: initial 220 message (connect_timeout covers connect + this).
        self._stage.name = "receiving the initial server greeting"
        self.greeting = await self._read_reply(self.settings.connect_timeout, self._stage.name)
        if self.greeting.code != 220:
            await self.quit()
            raise ServerRefused(self.greeting)

    async def _hello(self) -> None:
        """EHLO, HELO when EHLO gets a 5xx (RFC 5321 3.2)."""
        self._stage.name = "performing the EHLO handshake"
        reply = await self._command(f"EHLO {self.settings.hostname}", self._stage.name)
        if reply.code == 250:
            self.esmtp = True
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            return
        if reply.is_permanent and reply.code != 554:
            self._stage.name = "performing the HELO handshake"
            reply = await self._command(f"HELO {self.settings.hostname}", self._stage.name)
            if reply.code == 250:
                self.esmtp = False
                self.extensions = {}
                return
        await self.quit()
        raise ServerRefused(reply)

    async def _starttls(self, policy: str) -> None:
        """RFC 3207. Raises TlsUnavailable or returns with self.tls set (or tls_note)."""
        if not self.supports("STARTTLS"):
            if policy == "opportunistic":
                self.tls_note = "server does not offer STARTTLS"
                return
            await self.quit()
            raise TlsUnavailable(LocalReply(451, "4.7.4", f"TLS is required, but was not offered by host {self.address}"))
        self._stage.name = "sending STARTTLS"
        reply = await self._command("STARTTLS", self._stage.name)
        if reply.code != 220:
            if policy == "opportunistic":
                self.tls_note = f"STARTTLS refused: {reply}"
                return
            await self.quit()
            raise TlsUnavailable(
                LocalReply(451, "4.7.5", f"TLS is required, but host {self.address} refused STARTTLS: {reply}")
            )
        # CVE-2011-0411: anything the server sent after its 220 came before TLS; drop it.
        self._pipe.discard_buffered()
        await self._handshake(policy)
        # RFC 3207 4.2: forget what the server said before TLS and ask again.
        await self._hello()

    async def _handshake(self, policy: str) -> None:
        loop = asyncio.get_running_loop()
        verifying = policy == "verify"
        try:
            ctx = _verifying_context(self.settings.ca_file) if verifying else _unverified_context()
        except (OSError, ssl.SSLError) as e:
            await self.quit()
            raise TlsUnavailable(
                LocalReply(451, "4.7.5", f"cannot load the CA file {self.settings.ca_file}: {clean_text(str(e))}")
            ) from None
        transport = self._pipe.transport
        assert transport is not None
        try:
            new_transport = await loop.start_tls(
                transport,
                self._pipe,
                ctx,
                server_hostname=self.server_name,
                ssl_handshake_timeout=self.settings.connect_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            self._usable = False
            transport.abort()
            raise TlsUnavailable(
                LocalReply(451, "4.7.5", f"TLS handshake with {self.address} failed: {clean_text(str(e) or type(e).__name__)}")
            ) from None
        if new_transport is None:
            self._usable = False
            raise TlsUnavailable(LocalReply(451, "4.7.5", f"TLS handshake with {self.address} failed: connection closed"))
        self._pipe.transport = new_transport  # type: ignore[assignment]
        self.tls = _tls_info(new_transport, "OK" if verifying else None, self.server_name, self.settings.ca_file)

    # -- transactions

    async def _reset_alone(self) -> None:
        """The RSET a reuse owes (reset_pending), as a command of its own: for a
        transaction that cannot carry it in a pipelined group. ConnectionLost if refused."""
        if self.reset_pending:
            self.reset_pending = False
            if not await self.reset():
                raise self._lost("resetting the session (RSET was refused)")

    async def reset(self) -> bool:
        """RSET before reusing the connection; False if it is no longer fit for use."""
        if not self.usable:
            return False
        try:
            reply = await self._command("RSET", "sending RSET")
        except ConnectionLost:
            return False
        if reply.code != 250:
            self._usable = False
            await self.quit()
            return False
        return True

    async def probe_recipient(self, mail_from: str, rcpt: str) -> tuple[Reply, Reply | None]:
        """A recipient verification probe: MAIL FROM, RCPT TO, then RSET; never DATA.

        Returns (reply to MAIL, reply to RCPT or None when MAIL was refused). The
        connection stays usable for another probe when RSET is accepted. Raises
        ConnectionLost when the session breaks, ValueError for an unusable address.
        """
        check_address(mail_from)
        check_address(rcpt)
        if not self.usable:
            raise self._lost("starting a verification probe")
        self.last_used = time.monotonic()
        await self._reset_alone()
        utf8 = " SMTPUTF8" if not (mail_from.isascii() and rcpt.isascii()) and self.supports("SMTPUTF8") else ""
        mail_reply = await self._command(f"MAIL FROM:<{mail_from}>{utf8}", "sending MAIL FROM")
        rcpt_reply: Reply | None = None
        if mail_reply.code == 250:
            rcpt_reply = await self._command(f"RCPT TO:<{rcpt}>", "sending RCPT TO")
        await self.reset()
        return mail_reply, rcpt_reply

    async def send_message(
        self, mail_from: str, rcpts: Sequence[str], body: bytes, *, smtputf8: bool = False,
        dsn: DsnParams | None = None,
    ) -> TransactionResult:
        """One mail transaction. Returns each recipient's final reply.

        dsn: RFC 3461 parameters, added to MAIL and RCPT only when the server offers DSN.

        A recipient refused at RCPT gets that reply; an accepted one gets the reply to the
        final dot. Raises ConnectionLost when the session breaks (after_data_end tells
        whether the dot was sent), ValueError for an address with control characters.
        """
        if not rcpts:
            raise ValueError("send_message needs at least one recipient")
        check_address(mail_from)
        for r in rcpts:
            check_address(r)
        if not self.usable:
            raise self._lost("starting a new transaction")
        self.last_used = time.monotonic()
        self.transactions += 1
        reset = self.reset_pending and self.supports("PIPELINING")  # else sent alone, now
        if not reset:
            await self._reset_alone()

        need_utf8 = smtputf8 or not mail_from.isascii() or not all(r.isascii() for r in rcpts)
        if need_utf8 and not self.supports("SMTPUTF8"):
            # RFC 6531 3.2: cannot downgrade non-ASCII addresses.
            reply = LocalReply(
                550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.address}"
            )
            return TransactionResult([(r, reply) for r in rcpts])
        eight_bit = not body.isascii()
        if eight_bit and not self.supports("8BITMIME"):
            # RFC 6152 3: a server without 8BITMIME gets 7-bit data: the 8-bit parts are
            # re-encoded (quoted-printable, base64), as Postfix does. 8-bit octets in
            # headers cannot be, and go as they are (docs/outbound-smtp.md).
            # CPU work of up to a few hundred ms for a large message: off the event loop,
            # one conversion at a time (each holds about twice the converted message).
            self._stage.name = "converting the message to 7-bit"
            try:
                body = await asyncio.get_running_loop().run_in_executor(_DOWNGRADE_POOL, downgrade_8bit, body)
            except ConversionLimit as e:
                # RFC 6152 3: convert, or fail the delivery; never 8-bit octets to this server.
                reply = LocalReply(
                    554, "5.6.3",
                    f"8-bit message could not be converted to 7-bit for host {self.address}, which does not"
                    f" offer 8BITMIME: {e}",
                )
                return TransactionResult([(r, reply) for r in rcpts])
            eight_bit = False
        data = encode_data(body)
        size = len(data)
        if self.max_size and size > self.max_size:
            # RFC 1870 6.1: the server told us it will not take it.
            reply = LocalReply(
                552, "5.3.4",
                f"message size {size} exceeds size limit {self.max_size} of server {self.address}",
            )
            return TransactionResult([(r, reply) for r in rcpts])

        params = []
        if self.supports("SIZE"):
            params.append(f"SIZE={size}")
        if eight_bit:
            params.append("BODY=8BITMIME")  # RFC 6152
        if need_utf8:
            params.append("SMTPUTF8")  # RFC 6531 3.4
        if dsn is not None and self.supports("DSN"):
            params += dsn.mail_params()
            rcpt_lines = [f"RCPT TO:<{r}>{dsn.rcpt_params(r)}" for r in rcpts]
        else:
            rcpt_lines = [f"RCPT TO:<{r}>" for r in rcpts]
        mail_line = f"MAIL FROM:<{mail_from}>" + "".join(" " + p for p in params)

        if self.supports("PIPELINING"):
            return await self._transaction_pipelined(mail_line, rcpt_lines, rcpts, data, reset)
        return await self._transaction_lockstep(mail_line, rcpt_lines, rcpts, data)

    async def _transaction_pipelined(
        self, mail_line: str, rcpt_lines: list[str], rcpts: Sequence[str], data: bytes, reset: bool = False
    ) -> TransactionResult:
        # RFC 2920 3.1: MAIL, all RCPTs and DATA in one go; DATA is the last of the group.
        # RSET may lead it (RFC 2920 3.1 lists it among the commands a group may hold):
        # a reused session is reset without a round trip of its own.
        lines = [mail_line, *rcpt_lines, "DATA"]
        if reset:
            self.reset_pending = False
            lines.insert(0, "RSET")
        await self._send(("\r\n".join(lines) + "\r\n").encode("utf-8"), "sending MAIL FROM")
        if reset:
            rset_reply = await self._read_reply(self.settings.command_timeout, "receiving the reply to RSET")
            if rset_reply.code != 250:
                # Closing (421) or not fit for reuse: cut it before the body could be asked
                # for; the server drops the transaction it opened, nothing was delivered.
                raise self._lost(f"resetting the session (RSET answered {rset_reply.code})")
        mail_reply = await self._read_reply(self.settings.command_timeout, "receiving the reply to MAIL FROM")
        replies: list[tuple[str, Reply]] = []
        for r in rcpts:
            rr = await self._read_reply(self.settings.command_timeout, "receiving the reply to RCPT TO")
            replies.append((r, rr))
        data_cmd_reply = await self._read_reply(self.settings.command_timeout, "receiving the reply to DATA")
        if mail_reply.code != 250:
            self._after_failed_mail(data_cmd_reply)
            return TransactionResult([(r, mail_reply) for r in rcpts], mail_reply)
        accepted = [r for r, rr in replies if rr.code in (250, 251)]
        if data_cmd_reply.code != 354:
            return self._merge(mail_reply, replies, data_cmd_reply if accepted else None, None)
        if not accepted:
            # RFC 2920 3.1: DATA accepted although no recipient was; end it empty.
            await self._send(b".\r\n", "sending an empty message")
            await self._read_reply(self.settings.data_timeout, "ending an empty message")
            return self._merge(mail_reply, replies, None, None)
        return await self._send_body(mail_reply, replies, data)

    async def _transaction_lockstep(
        self, mail_line: str, rcpt_lines: list[str], rcpts: Sequence[str], data: bytes
    ) -> TransactionResult:
        mail_reply = await self._command(mail_line, "sending MAIL FROM")
        if mail_reply.code != 250:
            return TransactionResult([(r, mail_reply) for r in rcpts], mail_reply)
        replies = []
        for r, line in zip(rcpts, rcpt_lines):
            replies.append((r, await self._command(line, "sending RCPT TO")))
        if not any(rr.code in (250, 251) for _, rr in replies):
            await self.reset()
            return self._merge(mail_reply, replies, None, None)
        data_cmd_reply = await self._command("DATA", "sending DATA")
        if data_cmd_reply.code != 354:
            return self._merge(mail_reply, replies, data_cmd_reply, None)
        return await self._send_body(mail_reply, replies, data)

    def _after_failed_mail(self, data_cmd_reply: Reply) -> None:
        if data_cmd_reply.code == 354:
            # A broken server opened DATA without a sender; we cannot trust its state.
            self._usable = False
            self._pipe.abort()

    async def _send_body(self, mail_reply: Reply, replies: list[tuple[str, Reply]], data: bytes) -> TransactionResult:
        # RFC 5321 4.5.3.2.5: each data block must be taken within the timeout.
        self._stage.name = "sending message body"
        view = memoryview(data)
        for start in range(0, len(data), DATA_BLOCK):
            await self._send(view[start : start + DATA_BLOCK], "sending message body")
        # RFC 5321 4.5.3.2.6: reply to the final dot.
        final = await self._read_reply(self.settings.data_timeout, "waiting for the reply after end of data", after_data_end=True)
        return self._merge(mail_reply, replies, final, final)

    @staticmethod
    def _merge(
        mail_reply: Reply, replies: list[tuple[str, Reply]], for_accepted: Reply | None, data_reply: Reply | None
    ) -> TransactionResult:
        out = []
        for r, rr in replies:
            if rr.code in (250, 251) and for_accepted is not None:
                out.append((r, for_accepted))
            elif rr.code in (250, 251):
                out.append((r, LocalReply(451, "4.3.0", "message was not sent: no recipient was accepted")))
            else:
                out.append((r, rr))
        return TransactionResult(out, mail_reply, list(replies), data_reply)

    async def quit(self) -> None:
        """QUIT (short wait for 221), then close. Never raises."""
        self._usable = False
        pipe = self._pipe
        if pipe.closed or pipe.transport is None or pipe.transport.is_closing():
            pipe.abort()
            return
        try:
            pipe.write(b"QUIT\r\n")
            async with asyncio.timeout(min(self.settings.command_timeout, 5.0)):
                await pipe.read_line()
        except (TimeoutError, EOFError, ValueError, OSError):
            pass
        pipe.abort()

    def abort(self) -> None:
        """Cut the connection at once, without QUIT (its state is in doubt)."""
        self._usable = False
        self._pipe.abort()

    def close_nowait(self) -> None:
        """Send QUIT without waiting for its reply, and close."""
        self._usable = False
        t = self._pipe.transport
        if t is not None and not t.is_closing():
            try:
                t.write(b"QUIT\r\n")
            except Exception:
                pass
            t.close()


# ---------------------------------------------------------------------------
# Opening a connection, by TLS policy


def _connect_reason(error: BaseException, address: str) -> str:
    if isinstance(error, ConnectionRefusedError):
        return f"Connection refused by {address}"
    if isinstance(error, TimeoutError):
        return f"Connection timed out with {address}"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake with {address} failed: {clean_text(str(error))}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({address})"
    return f"cannot connect to {address}: {clean_text(str(error) or type(error).__name__)}"


async def _connect(
    address: str, port: int, server_name: str, settings: ClientSettings, implicit_tls: bool
) -> SmtpConnection:
    loop = asyncio.get_running_loop()
    pipe = _Pipe()
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await loop.create_connection(
                lambda: pipe,
                host=address,
                port=port,
                local_addr=(settings.bind_address, 0) if settings.bind_address else None,
                ssl=_unverified_context() if implicit_tls else None,
                server_hostname=server_name if implicit_tls else None,
                ssl_handshake_timeout=settings.connect_timeout if implicit_tls else None,
            )
    except (OSError, TimeoutError, ssl.SSLError) as e:
        pipe.abort()
        cls = TlsUnavailable if isinstance(e, ssl.SSLError) else ConnectFailed
        raise cls(LocalReply(451, "4.4.1", _connect_reason(e, address))) from None
    conn = SmtpConnection(pipe, address=address, port=port, server_name=server_name, settings=settings)
    if implicit_tls:
        assert pipe.transport is not None
        conn.tls = _tls_info(pipe.transport, None, server_name, settings.ca_file)
    return conn


async def open_connection(
    address: str,
    port: int,
    *,
    server_name: str,
    policy: TlsPolicy,
    settings: ClientSettings,
) -> SmtpConnection:
    """Connect to address:port, read the greeting, EHLO, and do TLS as `policy` says.

    - none: plaintext.
    - opportunistic: STARTTLS if offered, certificate not required (verify=OK|FAIL is
      recorded); plaintext on the same connection if STARTTLS is not offered or refused,
      on a new connection if the handshake fails (conn.tls_note says why).
    - required: STARTTLS must work (certificate not checked) — else TlsUnavailable.
    - verify: STARTTLS and a certificate valid for server_name (settings.ca_file or the
      system CAs) — else TlsUnavailable.
    - smtps: implicit TLS from the first byte (RFC 8314), certificate not required.

    Raises ConnectFailed, ServerRefused, TlsUnavailable, ConnectionLost; every one of them
    means "try the next server".
    """
    if policy not in TLS_POLICIES:
        raise ValueError(f"unknown TLS policy {policy!r} (one of {', '.join(TLS_POLICIES)})")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    conn = await _connect(address, port, server_name, settings, implicit_tls=policy == "smtps")
    try:
        await conn._greet()
        await conn._hello()
        if policy in ("none", "smtps"):
            return conn
        try:
            await conn._starttls(policy)
        except TlsUnavailable as e:
            if policy != "opportunistic":
                raise
            # The handshake failed; the old connection is unusable. Plaintext, anew.
            conn = await _connect(address, port, server_name, settings, implicit_tls=False)
            conn.tls_note = f"{e.reply.text}; continued without TLS"
            await conn._greet()
            await conn._hello()
        return conn
    except BaseException:
        conn._pipe.abort()
        raise


__all__ = [
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "ClientSettings",
    "ConnectFailed",
    "ConnectionLost",
    "ServerRefused",
    "SmtpClientError",
    "SmtpConnection",
    "TlsInfo",
    "TlsUnavailable",
    "TransactionResult",
    "check_address",
    "clean_text",
    "encode_data",
    "open_connection",
    "parse_reply",
]
