"""Event types: each is one fact about a session or a message, with its fields.

Role: every stage records what happened as one of these types, through
`Records.record(event, queue_id, session=...)`. Each type produces two things from the
same fields:

- `line()`: the sendmail/Postfix-style text of the event log (kanmon.log, stdout,
  `kanmon log events`). Admins and tests read these lines: their formats are fixed.
- `fields()`: the structured fields, stored as JSON beside the line (the events table's
  `detail` column). Counters, `kanmon trace` and alerts read kinds and fields, never the
  line.

`KIND` names the type in the events table's `kind` column; `event_from_row` rebuilds a
typed event from a stored row (an old row, written before the fields existed, comes back
as a `Note` with its text).

Trusts: its callers for the values. Values from the network (addresses, HELO names,
replies) are formatted into the line exactly as the callers passed them; the records
writer escapes the control characters of every whole line (kanmon.escape.for_log) before
it is written anywhere, and the fields keep the exact values. Never: do I/O, or parse a
line back into fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields as dc_fields
from typing import Any, ClassVar

from kanmon.units import format_duration

# RFC 3463 section 2: the subject of an enhanced status code.
REASON_CLASSES = {
    "0": "other", "1": "address", "2": "mailbox", "3": "system",
    "4": "network", "5": "protocol", "6": "content", "7": "policy",
}


def reason_class(enhanced: str | None) -> str:
    """'5.1.1' -> 'address'; None or garbage -> 'other'."""
    if not enhanced:
        return "other"
    parts = enhanced.split(".")
    return REASON_CLASSES.get(parts[1], "other") if len(parts) == 3 else "other"


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def _first(text: str) -> str:
    return text.split("\n", 1)[0]


class Event:
    """Base of the event types (frozen dataclasses below)."""

    KIND: ClassVar[str] = "info"
    _names: ClassVar[tuple[str, ...]] = ()  # the fields' names, set by _event
    __slots__ = ()

    def line(self) -> str:  # pragma: no cover - every type defines it
        raise NotImplementedError

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._names}

    def counts(self) -> tuple[tuple[str, int], ...]:
        """Counter increments this event stands for (kanmon.records.counters)."""
        return ()

    def __str__(self) -> str:
        return self.line()


EVENT_TYPES: dict[str, type[Event]] = {}


def _event(cls):
    """Register a type under its KIND (one type per kind)."""
    cls = dataclass(frozen=True, slots=True)(cls)
    cls._names = tuple(f.name for f in dc_fields(cls))
    assert cls.KIND not in EVENT_TYPES, cls.KIND
    EVENT_TYPES[cls.KIND] = cls
    return cls


def event_from_row(kind: str, text: str, detail: dict[str, Any] | None) -> Event:
    """A stored row back as a typed event; a row without fields (written before the
    fields existed, or by a type unknown here) is a Note or an Error of its text."""
    cls = EVENT_TYPES.get(kind)
    if cls is not None and detail is not None and cls not in FREE_TEXT:
        try:
            return cls(**detail)
        except TypeError:
            pass
    if kind == "error":
        return Error(text)
    if kind == "critical":
        return Critical(text)
    return Note(text, kind)


# -- free text ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Note(Event):
    """A line with no fields of its own (listeners started, POP3/IMAP logins, DNS
    monitor notes...). `kind` is kept for the few sources that still name one."""

    text: str
    kind: str = "info"

    @property
    def KIND(self) -> str:  # type: ignore[override]
        return self.kind

    def line(self) -> str:
        return self.text

    def fields(self) -> dict[str, Any]:
        return {}


EVENT_TYPES["info"] = Note

# Kinds of Notes whose lines are looked up as a set (the console's DNS and balancer pages
# find them by the events(kind, ts) index, not by searching every line's text).
DNSCHECK_KIND = "dnscheck"  # the periodic DNS check's lines ("dnscheck: ...")
BALANCER_KIND = "balancer"  # the balancer's lines ("balancer NAME: ...", "balancer: ...")


@_event
class Error(Event):
    """Something failed that an administrator should look at (alerts mail these)."""

    KIND = "error"
    text: str

    def line(self) -> str:
        return self.text

    def fields(self) -> dict[str, Any]:
        return {}


@_event
class Critical(Event):
    """A damaged file or lost state: alerts mail these as critical."""

    KIND = "critical"
    text: str

    def line(self) -> str:
        return self.text

    def fields(self) -> dict[str, Any]:
        return {}


FREE_TEXT = (Note, Error, Critical)  # types whose line is all there is: no fields stored


# -- SMTP sessions (no queue id) ---------------------------------------------------------------


@_event
class Connected(Event):
    KIND = "connect"
    client: str  # the client's name ("unknown" without a PTR)
    ip: str

    def line(self) -> str:
        return f"connect from {self.client}[{self.ip}]"

    def counts(self):
        return (("connections", 1),)


@_event
class Disconnected(Event):
    KIND = "disconnect"
    client: str
    ip: str

    def line(self) -> str:
        return f"disconnect from {self.client}[{self.ip}]"

    def counts(self):
        return (("disconnections", 1),)


@_event
class SessionCut(Event):
    """The server ended a session: timeout, too many errors, shutdown."""

    KIND = "session-cut"
    why: str
    state: str  # the session's state when it was cut
    client: str
    ip: str

    def line(self) -> str:
        return f"{self.why} after {self.state} from {self.client}[{self.ip}]"


@_event
class Refused(Event):
    """A command refused (`NOQUEUE: reject:`): MAIL, RCPT, DATA...; `check` names the
    check that refused it when one did."""

    KIND = "reject"
    stage: str  # the SMTP command
    client: str
    ip: str
    reply: str  # the reply as sent: "550 5.1.1 text"
    enhanced: str | None
    mail_from: str | None  # None: no transaction yet
    rcpt: str
    proto: str
    helo: str
    check: str = ""
    # History rows the refusal wrote (`kanmon stats` "rejected" and "rejected by check"): a
    # refused recipient 1, a message refused at DATA its recipients, a sender refused at
    # MAIL by a check 1, a protocol error (no recipient yet) 0. None: recorded before it
    # was counted.
    history_rows: int | None = None

    def line(self) -> str:
        detail = f"; from=<{self.mail_from}>" if self.mail_from is not None else ""
        if self.rcpt:
            detail += f" to=<{self.rcpt}>"
        check = f" check={self.check}" if self.check else ""
        return (f"NOQUEUE: reject: {self.stage} from {self.client}[{self.ip}]: {self.reply}{detail}"
                f" proto={self.proto} helo=<{self.helo}>{check}")

    def counts(self):
        rejected = (f"rejected|stage={self.stage}|class={reason_class(self.enhanced)}", 1)
        if not self.check:
            return (rejected,)
        return (rejected, (f"checks|check={self.check}|result={reply_result(self.reply)}", 1))


def reply_result(reply: str) -> str:
    """The result label of a check's refusal: "reject" (5xx) or "tempfail" (4xx)."""
    return "tempfail" if reply.startswith("4") else "reject"


@_event
class ConnectRefused(Event):
    """A connection refused before the greeting (limits, access); `check` names the
    check or limit that refused it when one did."""

    KIND = "reject-connect"
    ip: str
    reply: str
    enhanced: str | None
    why: str
    check: str = ""

    def line(self) -> str:
        check = f" check={self.check}" if self.check else ""
        return f"reject: connect from unknown[{self.ip}]: {self.reply} ({self.why}){check}"

    def counts(self):
        rejected = (f"rejected|stage=CONNECT|class={reason_class(self.enhanced)}", 1)
        if not self.check:
            return (rejected,)
        return (rejected, (f"checks|check={self.check}|result={reply_result(self.reply)}", 1))


@_event
class ProxyRefused(Event):
    """A PROXY header from a host not trusted to send one, or one that does not parse."""

    KIND = "reject-proxy"
    ip: str
    error: str = ""  # empty: the sender is not trusted

    def line(self) -> str:
        if self.error:
            return f"reject: bad PROXY header from {self.ip}: {self.error}"
        return f"reject: PROXY header from untrusted {self.ip}"


@_event
class EarlyTalker(Event):
    KIND = "reject-early"
    client: str
    ip: str
    size: int
    reply: str

    def line(self) -> str:
        return f"reject: early talker {self.client}[{self.ip}] sent {self.size} bytes before the greeting: {self.reply}"

    def counts(self):
        return ((f"checks|check=greet_pause|result={reply_result(self.reply)}", 1),)


@_event
class ProxyTimeout(Event):
    """A trusted balancer connected and sent no PROXY header in time: closed, nothing said."""

    KIND = "proxy-timeout"
    ip: str

    def line(self) -> str:
        return f"timeout waiting for the PROXY header from {self.ip}"


@_event
class TlsStarted(Event):
    """STARTTLS on an SMTP session we serve, or the TLS of one on an implicit-TLS port
    (submissions, 465: the same line, as sendmail logs both); `error` when a STARTTLS
    handshake failed."""

    KIND = "tls-in"
    client: str
    ip: str
    version: str = ""
    cipher: str = ""
    bits: int = 0
    error: str = ""

    def line(self) -> str:
        head = f"STARTTLS=server, relay={self.client} [{self.ip}], "
        if self.error:
            return head + f"error: {self.error}"
        return head + f"version={self.version}, verify=NO, cipher={self.cipher}, bits={self.bits}/{self.bits}"

    def counts(self):
        return () if self.error else (("tls_sessions_in", 1),)


@_event
class AuthSucceeded(Event):
    KIND = "auth"
    client: str
    ip: str
    mechanism: str
    user: str

    def line(self) -> str:
        return f"{self.client}[{self.ip}]: sasl_method={self.mechanism}, sasl_username={self.user}"


@_event
class AuthFailed(Event):
    """Wrong credentials (`blocked`: the throttle key now blocked), or an attempt refused
    without checking because the user or address is blocked (`refused`)."""

    KIND = "auth-failed"
    client: str
    ip: str
    mechanism: str
    user: str
    blocked: str = ""
    refused: bool = False

    def line(self) -> str:
        if self.refused:
            return f"warning: {self.client}[{self.ip}]: SASL {self.mechanism} blocked for user={self.user}: too many failures"
        # Postfix's wording, which fail2ban's stock postfix filter (mode auth) matches
        # (docs/operations.md).
        return (f"warning: {self.client}[{self.ip}]: SASL {self.mechanism} authentication failed: "
                f"authentication failure, sasl_username={self.user}"
                + (f"; blocked ({self.blocked})" if self.blocked else ""))


@_event
class LoginFailed(Event):
    """A failed POP3/IMAP login (`service` pop3 or imap), in Dovecot's wording, which
    fail2ban's stock dovecot filter matches. `attempts`: failed logins on this
    connection so far; `blocked`: the throttle key this failure blocked."""

    KIND = "login-failed"
    service: str
    user: str
    method: str
    ip: str
    attempts: int = 1
    blocked: str = ""

    def line(self) -> str:
        # The user name is the client's: "<" and ">" are replaced so it cannot close
        # user=<...> and smuggle a different rip= into the line.
        user = self.user.replace("<", "?").replace(">", "?")
        return (f"{self.service}-login: Aborted login (auth failed, {self.attempts} attempts): "
                f"user=<{user}>, method={self.method}, rip={self.ip}"
                + (f", blocked ({self.blocked})" if self.blocked else ""))


# -- messages (with a queue id) -------------------------------------------------------------------


@_event
class Accepted(Event):
    """A message is in the queue: received, written by kanmon itself (proto=internal,
    relay=local), or restored from a backup (proto=restore)."""

    KIND = "accepted"
    mail_from: str
    size: int
    nrcpts: int
    proto: str
    relay: str = ""  # "name [ip]" of the client, or "local"
    msgid: str | None = None  # None or "" (the message has none): not in the line
    auth: str = ""
    held: bool = False
    origin: str = ""  # for mail kanmon wrote itself: what wrote it (not in the line)

    def line(self) -> str:
        out = f"from=<{self.mail_from}>, size={self.size}, nrcpts={self.nrcpts}"
        if self.msgid:  # as Postfix's message-id= and sendmail's msgid=: only when the header is there
            out += f", msgid={self.msgid}"
        out += f", proto={self.proto}"
        if self.relay:
            out += f", relay={self.relay}"
        if self.auth:
            out += f", auth={self.auth}"
        if self.held:
            out += ", held"
        return out

    def counts(self):
        source = "internal" if self.proto == "internal" else "smtp"
        out = ((f"received|source={source}", 1), (f"received_bytes|source={source}", self.size))
        if source == "smtp" and self.proto.startswith(("ESMTPS", "UTF8SMTPS")):
            out += (("received_tls", 1),)
        return out


@_event
class QuarantineHeld(Event):
    """A check asked to quarantine the message (`reason`): it is held in the queue until
    an administrator releases it (`kanmon queue release`) or deletes it."""

    KIND = "quarantine-hold"
    reason: str

    def line(self) -> str:
        return f"held for quarantine: {self.reason}"


@_event
class AuthChecked(Event):
    """What the sender authentication checks found for a message from outside (SPF, DKIM,
    DMARC, ARC results; "" for one not checked) and what it did: none, tag or quarantine
    (a refusal is a `reject` event of the check). `results` is the Authentication-Results
    value written into the message."""

    KIND = "auth-results"
    spf: str
    dkim: str
    dmarc: str
    arc: str
    from_domain: str
    action: str
    results: str

    def line(self) -> str:
        parts = [f"{name}={value}" for name, value in
                 (("spf", self.spf), ("dkim", self.dkim), ("dmarc", self.dmarc), ("arc", self.arc)) if value]
        out = "authentication: " + " ".join(parts)
        if self.from_domain:
            out += f" header.from={self.from_domain}"
        if self.action != "none":
            out += f", action={self.action}"
        return out

    def counts(self):
        out = [(f"auth|method={m}|result={r}", 1) for m, r in
               (("spf", self.spf), ("dkim", self.dkim), ("dmarc", self.dmarc), ("arc", self.arc)) if r]
        if self.action != "none":
            out.append((f"auth_actions|action={self.action}", 1))
        return tuple(out)


@_event
class RuleMatched(Event):
    """A check's rule matched the message (`check` content: a [[content_profile.rule]]):
    what it does, what matched; `log_only`: recorded only, nothing changed."""

    KIND = "rule"
    check: str
    rule: str
    action: str
    detail: str
    log_only: bool = False

    def line(self) -> str:
        mode = " (log only: would " + self.action + ")" if self.log_only else f": {self.action}"
        return f"{self.check} rule {self.rule} matched{mode}; {self.detail}"


@_event
class ScannerFailed(Event):
    """A scanner (clamd, rspamd) failed to answer: what happened. Raises the `scanner` alert."""

    KIND = "scanner-failed"
    scanner: str
    error: str

    def line(self) -> str:
        return f"scanner {self.scanner} failed: {self.error}"


@_event
class ScannerRecovered(Event):
    """A scanner that failed answers again. Clears the `scanner` alert."""

    KIND = "scanner-ok"
    scanner: str

    def line(self) -> str:
        return f"scanner {self.scanner} answers again"


@_event
class ArchiveSkipped(Event):
    """[archive]: a copy was not kept (`why`: over quota - said once until copies resume -
    or a write error)."""

    KIND = "archive-skipped"
    where: str
    why: str

    def line(self) -> str:
        return f"archive copy not kept in {self.where}: {self.why}"


@_event
class Discarded(Event):
    """The message was accepted (250) and dropped, as a check asked (`reason`)."""

    KIND = "discard"
    reason: str

    def line(self) -> str:
        return f"discarded: {self.reason}"


@_event
class Quarantined(Event):
    """The message was accepted into the quarantine (`kind` admin or spam), for `reason`:
    it waits there for `kanmon quarantine release` or delete, or its retention."""

    KIND = "quarantine"
    reason: str
    kind: str = "admin"

    def line(self) -> str:
        return f"quarantined ({self.kind}): {self.reason}"


@_event
class QuarantineReleased(Event):
    """A quarantined message was released into the queue, by `by`, to `rcpts`."""

    KIND = "quarantine-release"
    by: str
    rcpts: str

    def line(self) -> str:
        return f"released from quarantine by {self.by} to {self.rcpts}"


@_event
class QuarantineDeleted(Event):
    """A quarantined message was deleted (by an administrator, or its retention ended)."""

    KIND = "quarantine-delete"
    by: str

    def line(self) -> str:
        return f"deleted from quarantine by {self.by}"


SENT, DEFERRED, BOUNCED, NOT_DRAINED = "Sent", "Deferred", "Bounced", "Not drained"
# The history status of a recipient whose message an administrator (or a maintenance job)
# deleted from the queue before it was final: "Deleted by administrator (SOURCE)".
DELETED = "Deleted"


@_event
class Delivery(Event):
    """One recipient's delivery attempt: `status` Sent, Deferred or Bounced (or, for
    `kanmon queue drain`, Not drained).

    `reply` is the reply as described for the log; `delay`/`xdelay` are seconds since
    the message arrived / since this attempt began (None: not in the line).
    """

    KIND = "delivery"
    rcpt: str
    status: str
    mailer: str
    dsn: str | None = None
    reply: str = ""
    relay: str = ""
    orig_rcpt: str = ""
    delay: float | None = None
    xdelay: float | None = None
    note: str = ""  # after a bounce's reply, in parentheses (lifetime expired, who returned it)
    tls: str = ""  # the outbound TLS session ("TLSv1.3 cipher verify=...")

    def line(self) -> str:
        parts = [f"to=<{self.rcpt}>"]
        if self.orig_rcpt:
            parts.append(f"orig_to=<{self.orig_rcpt}>")
        if self.delay is not None:
            parts.append(f"delay={format_duration(self.delay, 'clock')}")
        if self.xdelay is not None:
            parts.append(f"xdelay={format_duration(self.xdelay, 'clock')}")
        if self.mailer == "drain":
            parts.append(f"relay={self.relay}")
            parts.append("mailer=drain")
        else:
            parts.append(f"mailer={self.mailer}")
            if self.relay and self.relay != "local":
                parts.append(f"relay={self.relay}")
        if self.dsn is not None:
            parts.append(f"dsn={self.dsn}")
        note = f" ({self.note})" if self.note else ""
        if self.mailer == "drain":
            stat = f"{self.status} ({self.reply})"
        elif self.status == SENT:
            stat = "Sent" if self.mailer in ("local", "") else f"Sent ({self.reply})"
        else:
            stat = f"{self.status}: {self.reply}{note}"
        parts.append(f"stat={stat}")
        return ", ".join(parts)

    def counts(self):
        if self.status == SENT:
            return ((f"delivered|mailer={self.mailer or 'local'}", 1),)
        if self.status == DEFERRED:
            return ((f"deferred|class={reason_class(self.dsn)}", 1),)
        if self.status == BOUNCED:
            return ((f"bounced|class={reason_class(self.dsn)}", 1),)
        return ()


@_event
class DomainFailed(Event):
    """The destination domain's MX could not be resolved (applies to every recipient)."""

    KIND = "hop-domain"
    domain: str
    reply: str

    def line(self) -> str:
        return f"domain {self.domain}: {self.reply}"


@_event
class HopUnresolved(Event):
    """A configured next hop's name did not resolve; `note` says what comes next."""

    KIND = "hop-unresolved"
    relay: str
    reply: str
    note: str = ""

    def line(self) -> str:
        return f"relay={self.relay}: {self.reply}{self.note}"


@_event
class HopFailed(Event):
    """A server did not take the message in this attempt; `more`: another is tried."""

    KIND = "hop"
    relay: str
    reply: str
    more: bool = False

    def line(self) -> str:
        return f"relay={self.relay}, {self.reply}" + ("; trying next server" if self.more else "")


@_event
class TlsClient(Event):
    """STARTTLS on an outbound session: the TLS parameters, or why it is plaintext."""

    KIND = "tls-out"
    relay: str
    version: str = ""
    verify: str = ""
    cipher: str = ""
    bits: int = 0
    alg_bits: int = 0
    note: str = ""

    def line(self) -> str:
        if self.version:
            return (f"STARTTLS=client, relay={self.relay}, version={self.version}, verify={self.verify}, "
                    f"cipher={self.cipher}, bits={self.bits}/{self.alg_bits}")
        return f"STARTTLS=client, relay={self.relay}, {self.note}"


@_event
class TlsPolicyFailed(Event):
    """An outbound session did not meet the destination's TLS policy (MTA-STS, DANE or
    [[tls_policy]]): `enforced` means that server was not used; else (MTA-STS testing)
    the mail went anyway. `result` is the RFC 8460 result type."""

    KIND = "tls-policy"
    domain: str
    policy: str  # mta-sts | dane | tls_policy
    result: str
    relay: str
    reason: str
    enforced: bool = True

    def line(self) -> str:
        mode = "not delivered there" if self.enforced else "delivered anyway (policy in testing mode)"
        return f"TLS policy failure: domain={self.domain}, policy={self.policy}, relay={self.relay}, {self.result}: {self.reason}; {mode}"

    def counts(self):
        return ((f"tls_policy_failures|policy={self.policy}|result={self.result}", 1),)


@_event
class NoticeQueued(Event):
    """A delay, failure or success notice to the sender (RFC 3464), queued as `notice_id`."""

    KIND = "notice"
    notice: str  # failure | delay | success
    notice_id: str

    def line(self) -> str:
        return f"sender {self.notice} notification: {self.notice_id}"

    def counts(self):
        return ((f"notices|type={self.notice}", 1),)


@_event
class NoticeSkipped(Event):
    """No notice for a message from <> or for a notice (RFC 3461 6.2, no loops), or none
    because the sender's NOTIFY did not ask for it (why = "notify")."""

    KIND = "notice-skipped"
    action: str  # failed | delayed
    why: str = ""  # "": from <> or a notice; "notify": not asked for (RFC 3461 NOTIFY)

    def line(self) -> str:
        if self.why == "notify":
            return f"no notice ({self.action}) for some recipients: not asked for (NOTIFY)"
        return f"no notice ({self.action}) for a message from <> or a notice: dropped"


@_event
class Removed(Event):
    """Every recipient is final: the message left the queue."""

    KIND = "removed"

    def line(self) -> str:
        return "removed"


@_event
class QuotaNotice(Event):
    """An over-quota notice to a mailbox owner, queued as `notice_id`."""

    KIND = "quota-notice"
    address: str
    usage: int
    quota: int
    notice_id: str

    def line(self) -> str:
        return f"over-quota notice for <{self.address}> ({self.usage} of {self.quota} bytes): {self.notice_id}"


@_event
class CheckFailed(Event):
    """A check of the pipeline failed (raised, timed out) and its failure mode answered
    `reply` (tempfail by default, never a silent accept). Mailed as an error alert
    (ERROR_KINDS); the refusal itself is a Refused event naming the check."""

    KIND = "check-failed"
    check: str
    stage: str
    error: str
    reply: str

    def line(self) -> str:
        return f"warning: check {self.check} failed at {self.stage}: {self.error}; answered {self.reply}"

    def counts(self):
        return ((f"checks|check={self.check}|result=error", 1),)


@_event
class DnsblLookupFailed(Event):
    """A [[dnsbl]] zone did not answer about a client (timeout, server failure): the
    zone counts as not listed for it (like postscreen), the session goes on."""

    KIND = "dnsbl-failed"
    ip: str
    zone: str
    error: str

    def line(self) -> str:
        return f"warning: dnsbl {self.zone}: lookup of [{self.ip}] failed ({self.error}); counted as not listed"

    def counts(self):
        return (("checks|check=dnsbl|result=dnsfail", 1),)


@_event
class ProbeFailed(Event):
    """A check's probe (Check.refresh, e.g. the free-disk statvfs) raised; the check goes
    on answering from its last probe. Mailed as an error alert (ERROR_KINDS)."""

    KIND = "probe-failed"
    error: str  # "Type: message"

    def line(self) -> str:
        return f"check probe failed: {self.error}"


@_event
class EffectFailed(Event):
    """A side effect a check asked for (a quota notice...) was not carried out: its
    handler raised. Mailed as an error alert (ERROR_KINDS)."""

    KIND = "effect-failed"
    effect: str  # the effect's type name
    error: str  # "Type: message"

    def line(self) -> str:
        return f"check effect {self.effect} failed: {self.error}"


@_event
class EffectUnhandled(Event):
    """A check returned a side effect no handler is registered for (a wiring bug): not
    carried out. Mailed as an error alert (ERROR_KINDS)."""

    KIND = "effect-unhandled"
    effect: str  # the effect, as repr() shows it

    def line(self) -> str:
        return f"no handler for the check effect {self.effect}"


# Kinds an administrator is alerted about (kanmon.alerts: category critical).
ERROR_KINDS = ("error", "critical", CheckFailed.KIND, ProbeFailed.KIND, EffectFailed.KIND, EffectUnhandled.KIND,
               "reload-failed")  # ReloadFailed.KIND (defined below, with the administration events)


# -- administration ----------------------------------------------------------------------------------


@_event
class AdminAction(Event):
    """A queue operation by an administrator or a maintenance job, over several
    messages (`ids` as shown in the line: the first ones)."""

    KIND = "admin"
    action: str
    count: int
    source: str
    what: str
    shown: str

    def line(self) -> str:
        return f"admin: {self.action} {self.count} message(s) by `{self.source}` matching {self.what}: {self.shown or 'none'}"


ADMIN_VERBS = {"delete": "deleted", "hold": "held", "release": "released", "bounce": "returned to sender",
               "flush": "flushed", "requeue": "requeued", "restore": "restored", "drain": "drained"}


@_event
class AdminChanged(Event):
    """One message changed by an administrator (held, released, deleted...)."""

    KIND = "admin-message"
    action: str
    source: str

    def line(self) -> str:
        return f"{ADMIN_VERBS.get(self.action, self.action)} by administrator (`{self.source}`)"


@_event
class Backup(Event):
    KIND = "admin-backup"
    count: int
    target: str
    source: str

    def line(self) -> str:
        return f"admin: backup of {self.count} message(s) to {self.target} by `{self.source}`"


@_event
class MaintenanceRun(Event):
    """A maintenance job: started by the schedule (`matched` None; `catch_up`: at start,
    for a run missed while the server was down), its failure (`error`), or its result:
    `acted_on` messages, the first of them in `acted`."""

    KIND = "maintenance"
    job: str
    action: str = ""
    matched: int | None = None
    acted_on: int = 0
    acted: tuple[str, ...] | list[str] = ()
    catch_up: bool = False
    error: str = ""

    def line(self) -> str:
        if self.error:
            return f"maintenance {self.job}: failed: {self.error}"
        if self.matched is None:
            if self.catch_up:
                return f"maintenance {self.job}: catch-up run (a run was missed while the server was down)"
            return f"maintenance {self.job}: scheduled run"
        return (f"maintenance {self.job}: {self.action} matched {self.matched}, acted on {self.acted_on}"
                + (f": {' '.join(self.acted)}" if self.acted_on else ""))


# -- the node ----------------------------------------------------------------------------------------


@_event
class Recovery(Event):
    """The spool rescan at start: `removed` unacknowledged incoming files (None: the
    summary line with the queue size and corrupt entries)."""

    KIND = "recovery"
    queued: int = 0
    corrupt: int = 0
    removed: int | None = None

    def line(self) -> str:
        if self.removed is not None:
            return f"recovery: removed {self.removed} unacknowledged incoming file(s)"
        return f"recovery: {self.queued} message(s) in the queue, {self.corrupt} corrupt"


@_event
class Reload(Event):
    """A configuration reload took effect: new sessions get the new settings, sessions in
    progress finish under the old ones. (A refused reload is a ReloadFailed.)"""

    KIND = "reload"
    changed: str = ""  # the top-level config sections that changed, comma-separated

    def line(self) -> str:
        return f"reload: new configuration in effect (changed: {self.changed or 'nothing'})"


@_event
class ReloadFailed(Event):
    """A reload refused (invalid file) or failed while it prepared the new configuration
    (a port in use, a certificate that does not match its key, a missing file): the
    running configuration stays. Mailed as an error alert (ERROR_KINDS)."""

    KIND = "reload-failed"
    reason: str

    def line(self) -> str:
        return f"reload refused, the running configuration stays: {self.reason}"


@_event
class Stopped(Event):
    KIND = "stopped"

    def line(self) -> str:
        return "stopped"


# -- alerts ------------------------------------------------------------------------------------------


@_event
class Alert(Event):
    """An alert raised, suppressed (mailed recently), cleared, unknown (the node lost
    its state: not active any more until raised again), or undelivered (its mail bounced
    or expired; no change to whether it is active) (`kanmon alert list`).

    `text` is the whole alert text; `summary` the one-line text of this change;
    `mailed` False: its category is not mailed; `last_sent`: when it was last mailed;
    `test`: the test button's (`kanmon alert test`), never an active alert, whatever its key.
    """

    KIND = "alert"
    category: str
    key: str
    state: str  # raised | suppressed | cleared | unknown | undelivered (its mail bounced or expired)
    since: float
    text: str
    summary: str = ""
    mailed: bool = True
    last_sent: float | None = None
    test: bool = False

    def line(self) -> str:
        head = f"alert {self.category}/{self.key}"
        summary = _first(self.summary or self.text)
        if self.state == "cleared":
            return f"{head} cleared: {summary}"
        if self.state == "unknown":
            return f"{head} no longer known: {summary}"
        if self.state == "undelivered":
            return f"{head} mail not delivered: {summary}"
        if self.state == "suppressed":
            return f"{head} (already mailed {_stamp(self.last_sent or 0.0)}): {summary}"
        if not self.mailed:
            return f"{head} (category not mailed): {summary}"
        return f"{head}: {summary}"


@_event
class AlertMailed(Event):
    KIND = "alert-mail"
    category: str
    key: str
    subject: str
    test: bool = False  # the test button's (kanmon alert test waits for it)

    def line(self) -> str:
        return f"alert mail ({self.category}/{self.key}) queued: {self.subject}"


@_event
class AlertNotMailed(Event):
    KIND = "alert-not-mailed"
    why: str
    subject: str
    test: bool = False  # the test button's (kanmon alert test waits for it)

    def line(self) -> str:
        return f"alert not mailed ({self.why}): {self.subject}"


@_event
class AlertRequest(Event):
    """`kanmon alert test`: the running server mails a test alert of `category` (to `to`,
    when given, instead of [alerts] to)."""

    KIND = "alert-request"
    category: str
    to: str = ""  # `--to`: the address it goes to instead of [alerts] to

    def line(self) -> str:
        return f"test alert requested: {self.category}" + (f" to <{self.to}>" if self.to else "")


# -- syslog-style program names ------------------------------------------------------------------

# The part after "kanmon/" in a log line's tag (kanmon/smtpd[pid]), by event kind, the
# way Postfix names its daemons; kinds not listed are "kanmon/master".
COMPONENTS = {
    **dict.fromkeys(("connect", "disconnect", "session-cut", "reject", "reject-connect", "reject-proxy",
                     "reject-early", "proxy-timeout", "tls-in", "auth", "auth-failed", "accepted",
                     "check-failed", "effect-failed", "effect-unhandled", "quarantine-hold", "quarantine",
                     "rule", "discard", "scanner-failed", "scanner-ok", "archive-skipped"), "smtpd"),
    **dict.fromkeys(("delivery", "hop", "hop-domain", "hop-unresolved", "tls-out", "tls-policy"), "smtp"),
    **dict.fromkeys(("notice", "notice-skipped", "quota-notice"), "bounce"),
    **dict.fromkeys(("removed", "recovery"), "qmgr"),
    **dict.fromkeys(("admin", "admin-message", "admin-backup", "maintenance", "quarantine-release",
                     "quarantine-delete"), "admin"),
    **dict.fromkeys(("alert", "alert-mail", "alert-not-mailed", "alert-request", "probe-failed"), "alert"),
}


def component(event: Event) -> str:
    """The program name of an event's log line: kanmon/<component>."""
    if isinstance(event, LoginFailed):
        return event.service
    if isinstance(event, Delivery) and event.mailer == "local":
        return "local"
    if isinstance(event, FREE_TEXT):
        head = event.text[:5]
        if head in ("imap ", "pop3 "):
            return head[:4]
    return COMPONENTS.get(event.KIND, "master")
