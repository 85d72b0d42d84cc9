"""Configuration: TOML text -> validated, frozen models.

Role: the only place that reads kanmon's configuration file. Every key is declared
here with its type, default and a one-line description (the description is what
docs/configuration.md and `kanmon config reference` print).

Trusts: nothing. The file is operator input; every value is checked before any
listener starts (DESIGN.md promise 8). An unknown key, a bad address, CIDR, size or
duration is a ConfigError that names the key and, where it can be found, the line.

Never: start anything, touch the network, or create files (creating data_dir is the
server's job).
"""

from __future__ import annotations

import bisect
import datetime
import functools
import ipaddress
import re
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kanmon.configpath import DEFAULT_DATA_DIR
from kanmon.cron import parse_schedule

# ---------------------------------------------------------------------------
# Value types: durations ("30s", "5m", "4h", "3d"), sizes ("512KB", "1GB"),
# host:port endpoints and CIDR networks.

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """'30s' -> 30.0, '5m' -> 300.0, '0' -> 0.0. A bare number means seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is written like 30s, 5m, 4h or 3d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration is written like 30s, 5m, 4h or 3d")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration (write 30s, 5m, 4h or 3d)")
    number, unit = m.groups()
    if unit is None and float(number) != 0:
        raise ValueError(f"{value!r} needs a unit (30s, 5m, 4h or 3d)")
    return float(number) * _DURATION_UNITS[unit or "s"]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.I)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: Any) -> int:
    """'512KB' -> 512000, '50MB' -> 50000000, '1GiB' -> 1073741824; a bare integer is bytes."""
    if isinstance(value, bool):
        raise ValueError("a size is written like 512KB, 50MB or 1GB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size is written like 512KB, 50MB or 1GB")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size (write 512KB, 50MB or 1GB)")
    number, unit = m.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def parse_hostport(value: Any) -> tuple[str, int]:
    """'127.0.0.1:2525' -> ('127.0.0.1', 2525); '[::1]:25' -> ('::1', 25).

    The host must be an IP address or a DNS name; the port 1..65535.
    """
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = f"{value[0]}:{value[1]}"
    if not isinstance(value, str):
        raise ValueError("an endpoint is written ip:port, e.g. 127.0.0.1:2525")
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]\s]+):(\d+)$", value)
    if not m:
        raise ValueError(f"{value!r} is not ip:port (e.g. 127.0.0.1:2525 or [::1]:2525)")
    host, port_text = m.groups()
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} is out of range 1..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.match(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$", host):
            raise ValueError(f"{value!r}: {host!r} is neither an IP address nor a host name") from None
    return (host, port)


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("a network is written in CIDR form, e.g. 192.0.2.0/24")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR network (e.g. 192.0.2.0/24)") from None


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HostPort = Annotated[tuple[str, int], BeforeValidator(parse_hostport)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(parse_network)]


def _profile_name(v: str) -> str:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", v):
        raise ValueError(f"{v!r} is not a profile name (letters, digits, _ . -)")
    return v


ProfileName = Annotated[str, AfterValidator(_profile_name)]  # a session or content profile's name

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}$")

AuthAction = Literal["off", "none", "tag", "quarantine", "reject"]
DmarcAction = Literal["off", "none", "honor", "tag"]
TlsPolicy = Literal["none", "opportunistic", "required", "verify", "smtps"]


class Section(BaseModel):
    """Base of every section: unknown keys are errors; values are frozen after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------
# Sections


class ServerSection(Section):
    hostname: str = Field("mx1.example.test", description="Name in the SMTP banner, EHLO and Received: headers")
    data_dir: Path = Field(Path(DEFAULT_DATA_DIR), description="Spool, mailboxes, records and logs live here")
    workers: int = Field(
        1, ge=0, le=64,
        description="SMTP receiver processes beside the main one (queue, delivery); 0: all in one process",
    )
    delivery_workers: int | None = Field(
        None, ge=0, le=64,
        description="Delivery agent processes (Maildir and SMTP) the main process hands deliveries to; "
        "default 0: the main process delivers (agents cost more CPU than they save on 2 cores: docs/performance.md)",
    )
    user: str | None = Field(
        None, description="Started as root: run as this user, keeping only the right to bind ports below 1024",
    )
    group: str | None = Field(None, description="The group to run as (default: the user's primary group)")
    authserv_id: str | None = Field(None, description="Our name in Authentication-Results headers (default: hostname)")

    @field_validator("authserv_id")
    @classmethod
    def _authserv_id(cls, v: str | None) -> str | None:
        if v is not None and not _DOMAIN_RE.match(v.lower()):
            raise ValueError(f"{v!r} is not a host name")
        return v.lower() if v is not None else v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not _DOMAIN_RE.match(v.lower()):
            raise ValueError(f"{v!r} is not a host name")
        return v.lower()


class SmtpSection(Section):
    listen: list[HostPort] = Field(
        default_factory=lambda: [("127.0.0.1", 2525)], description="One or more ip:port to accept SMTP on"
    )
    max_message_size: Size = Field(50_000_000, description="Largest message accepted (advertised as SIZE)")
    max_recipients: int = Field(1000, ge=100, description="Recipients per message (RFC 5321 4.5.3.1.8: at least 100)")
    max_connections: int = Field(1000, ge=1, description="Concurrent SMTP connections in all (all receivers; submission counts its own)")
    max_connections_per_ip: int = Field(50, ge=1, description="Concurrent SMTP connections from one client IP")
    relay_networks: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8")],
        description="Clients in these networks may send to any domain",
    )
    min_free_disk: Size = Field(1_000_000_000, description="Below this much free space in data_dir, MAIL gets 452 4.3.1")
    command_timeout: Duration = Field(
        300.0, gt=0, description="Time allowed for each complete command line (RFC 5321 4.5.3.2.7)"
    )
    data_timeout: Duration = Field(600.0, gt=0, description="Idle time allowed inside DATA")
    session_timeout: Duration = Field(3600.0, gt=0, description="Total time one SMTP session may last")
    max_errors: int = Field(10, ge=1, description="Bad commands before the connection is closed with 421")
    greet_pause: Duration = Field(
        0.5, description="Clients outside relay_networks that talk before the banner within this wait get 554 5.5.1; 0: off",
    )
    trusted_proxies: list[Network] = Field(
        default_factory=list, description="Balancers allowed to send a PROXY protocol header (v1/v2)"
    )
    health_check_clients: list[Network] = Field(
        default_factory=list,
        description="Monitors (a FortiGate TCP health check, a balancer's probe): greeted at once, and a connection "
        "of theirs that ends before it sends anything writes no connect/disconnect lines (one that talks is logged)",
    )


class TlsSection(Section):
    cert: Path = Field(description="PEM certificate chain offered by STARTTLS")
    key: Path = Field(description="PEM private key of that certificate")
    handshake_timeout: Duration = Field(
        10.0, gt=0, description="Time a client has to complete a TLS handshake (implicit TLS ports and STARTTLS)",
    )

    @field_validator("cert", "key")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        try:
            found = v.is_file()
        except OSError as e:  # a directory on its path this user cannot search (run as the service's user)
            raise ValueError(f"file {str(v)!r} cannot be reached by this user: {e.strerror or e}") from None
        if not found:
            raise ValueError(f"file {str(v)!r} does not exist")
        return v


class DomainSection(Section):
    name: str = Field(description="A domain we receive mail for")
    deliver: Literal["local", "relay"] = Field("local", description="local: mailboxes on this node; relay: forward to servers")
    mailboxes: list[str] = Field(default_factory=list, description="Local parts that have a mailbox (deliver = local)")
    aliases: dict[str, list[str]] = Field(
        default_factory=dict, description="Local part -> mailboxes (or full addresses) it expands to"
    )
    servers: list[HostPort] = Field(
        default_factory=list, description="deliver = relay: next hops in order; the rest are alternates"
    )
    tls: TlsPolicy = Field("opportunistic", description="TLS towards the servers: none|opportunistic|required|verify|smtps")
    quota: Size | None = Field(None, description="Per-mailbox quota in this domain; over it, RCPT gets 452 4.2.2")
    verify: Literal["none", "list", "callout"] = Field(
        "none", description="deliver = relay: how RCPT is verified: none | list (mailboxes, aliases, recipients_file) | callout"
    )
    verify_unreachable: Literal["tempfail", "accept"] = Field(
        "tempfail", description="verify = callout: when the servers cannot answer, RCPT gets 450 4.1.1 (tempfail) or is accepted"
    )
    recipients_file: Path | None = Field(
        None, description="verify = list: more valid recipients, one address a line (re-read when it changes)"
    )
    verify_positive_ttl: Duration = Field(31 * 86400.0, gt=0, description="verify = callout: a recipient found valid is cached this long")
    verify_negative_ttl: Duration = Field(3 * 3600.0, gt=0, description="verify = callout: a recipient refused is cached this long")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not _DOMAIN_RE.match(v):
            raise ValueError(f"{v!r} is not a domain name")
        return v

    @field_validator("mailboxes")
    @classmethod
    def _mailboxes(cls, v: list[str]) -> list[str]:
        for lp in v:
            if not _LOCAL_RE.match(lp) or lp.startswith(".") or lp.endswith(".") or ".." in lp or "/" in lp:
                raise ValueError(f"{lp!r} is not a usable mailbox name")
        return [lp.lower() for lp in v]

    @model_validator(mode="after")
    def _consistent(self) -> DomainSection:
        if self.deliver == "relay" and not self.servers:
            raise ValueError(f"domain {self.name!r}: deliver = \"relay\" needs servers = [\"host:port\", ...]")
        if self.deliver != "relay" and self.verify != "none":
            raise ValueError(f"domain {self.name!r}: verify applies to deliver = \"relay\" (a local domain knows its mailboxes)")
        if self.recipients_file is not None and self.verify != "list":
            raise ValueError(f"domain {self.name!r}: recipients_file is read by verify = \"list\" only")
        if self.deliver == "local":
            known = set(self.mailboxes)
            for alias, targets in self.aliases.items():
                if alias.lower() in known:
                    raise ValueError(f"alias {alias!r} has the same name as a mailbox")
                for t in targets:
                    if "@" not in t and t.lower() not in known:
                        raise ValueError(f"alias {alias!r} points at {t!r}, which is not a mailbox of {self.name}")
        return self


# ---------------------------------------------------------------------------
# Outbound DKIM signing (RFC 6376, RFC 8463): [[dkim]] keys of our domains
# (docs/authentication.md, "Signing outgoing mail").

DKIM_DEFAULT_HEADERS = [
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "list-id", "list-unsubscribe",
    "list-unsubscribe-post",
]
DKIM_DEFAULT_OVERSIGN = ["from", "reply-to", "subject", "date", "to", "cc"]
_SELECTOR_RE = re.compile(r"^(?=.{1,63}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_FIELD_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 2.2: printable, no colon


class DkimSection(Section):
    """[[dkim]]: one signing key of one of our domains. Mail from relay_networks and
    authenticated users (and the notices kanmon writes) whose From domain is this domain,
    or below it, is signed at acceptance with the active key(s) of the domain."""

    domain: str = Field(description="The signing domain (d=); mail whose From domain is this one or a subdomain is signed")
    selector: str = Field(description="The selector (s=): the key is published at <selector>._domainkey.<domain>")
    key: Path | None = Field(
        None, description="Private key, PEM (kanmon dkim keygen writes it); default <data_dir>/dkim/<domain>.<selector>.key",
    )
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = Field(
        "rsa-sha256", description="rsa-sha256 (RSA, 2048 bits from keygen) or ed25519-sha256 (RFC 8463)",
    )
    active: bool = Field(
        True, description="This key signs; false: configured and published but not signing yet (rotation)",
    )
    headers: list[str] = Field(
        default_factory=lambda: list(DKIM_DEFAULT_HEADERS), description="Header fields signed (each instance present)",
    )
    oversign: list[str] = Field(
        default_factory=lambda: list(DKIM_DEFAULT_OVERSIGN),
        description="Header fields signed once more than present, so that none can be added later",
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not _DOMAIN_RE.match(v):
            raise ValueError(f"{v!r} is not a domain name")
        return v

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        v = v.lower()
        if not _SELECTOR_RE.match(v):
            raise ValueError(f"{v!r} is not a selector (letters, digits, hyphens; dots between labels)")
        return v

    @field_validator("headers", "oversign")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for name in v:
            if not _FIELD_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a header field name")
            if name.lower() not in out:
                out.append(name.lower())
        return out

    @model_validator(mode="after")
    def _signs_from(self) -> DkimSection:
        if "from" not in self.headers and "from" not in self.oversign:  # RFC 6376 5.4
            raise ValueError("headers must include \"from\" (RFC 6376 5.4: the From field is always signed)")
        return self


# ---------------------------------------------------------------------------
# Edge policy: IP policies choose a session profile; profiles say which checks and
# limits apply (docs/policy.md).


class SessionProfileSection(Section):
    """[[session_profile]]: a named set of limits and checks. A key left out keeps the
    value of the [smtp] key of the same name, else the built-in profile's (docs/policy.md)."""

    name: ProfileName = Field(description='Name referenced by [[ip_policy]]; "default" and "trusted" redefine the built-in ones')
    max_connections_per_ip: int | None = Field(None, ge=1, description="Concurrent connections from one client address (all receivers)")
    connections_per_minute: int | None = Field(None, ge=0, description="New connections per client address per minute; 0: no limit")
    max_messages_per_session: int | None = Field(None, ge=0, description="Messages in one session; 0: no limit")
    max_recipients: int | None = Field(None, ge=1, description="Recipients per message")
    messages_per_hour: int | None = Field(None, ge=0, description="Messages per client address per hour; 0: no limit")
    recipients_per_hour: int | None = Field(None, ge=0, description="Recipients per client address per hour; 0: no limit")
    max_message_size: Size | None = Field(None, ge=1, description="Largest message accepted (advertised as SIZE)")
    max_header_size: Size | None = Field(None, ge=0, description="Largest header block; 0: no limit but max_message_size")
    max_ehlo: int | None = Field(None, ge=0, description="EHLO/HELO commands per session; 0: no limit")
    max_noop: int | None = Field(None, ge=0, description="NOOP commands per session; 0: no limit")
    max_rset: int | None = Field(None, ge=0, description="RSET commands per session; 0: no limit")
    max_errors: int | None = Field(None, ge=1, description="Bad commands before the connection is closed with 421")
    greet_pause: Duration | None = Field(None, description="Pregreet test: clients talking before the banner get 554 5.5.1; 0: off")
    idle_timeout: Duration | None = Field(None, gt=0, description="Time allowed for each command (default: [smtp] command_timeout)")
    bare_newline: Literal["reject", "normalize"] | None = Field(
        None, description="A bare LF: reject (550 5.5.2, against smuggling) or normalize to CRLF"
    )
    sender_domain_check: bool | None = Field(None, description="The sender's domain must resolve (501 5.1.8; 451 4.1.8 while DNS fails)")
    strict_syntax: bool | None = Field(None, description="MAIL FROM/RCPT TO without <> are refused (501 5.5.4)")
    own_domain_spoof: Literal["reject", "accept"] | None = Field(
        None, description="A sender in one of our domains from this client, unauthenticated: reject (550 5.7.1) or accept"
    )
    require_ptr: bool | None = Field(None, description="Clients without a forward-confirmed reverse DNS name get 450 4.7.1 at MAIL")
    helo_required: bool | None = Field(None, description="MAIL before HELO/EHLO is refused (503 5.5.1); always so, whatever this says")
    helo_strict: bool | None = Field(None, description="The HELO name must be a fully-qualified host name or an address literal (504 / 501 5.5.2 at MAIL)")
    helo_resolvable: bool | None = Field(None, description="The HELO name must have an A or AAAA record (450 4.7.1 at MAIL while it does not)")
    reject_own_helo: bool | None = Field(None, description="A HELO with our own name or address is refused (550 5.7.1)")
    dnsbl_threshold: int | None = Field(None, ge=0, description="Refuse a client whose [[dnsbl]] weights add up to this; 0: no DNSBL")
    greylist: bool | None = Field(None, description="Greylist new (client network, sender, recipient) triplets")
    greylist_delay: Duration | None = Field(None, description="A retry is accepted this long after the first try")
    greylist_window: Duration | None = Field(None, gt=0, description="...and until this long after it (then the triplet starts over)")
    greylist_remember: Duration | None = Field(None, gt=0, description="A triplet that passed is remembered this long after its last use")
    greylist_pass_count: int | None = Field(None, ge=0, description="A client network that passed this many triplets skips greylisting; 0: never")
    # Sender authentication of mail from outside (docs/authentication.md).
    spf: AuthAction | None = Field(None, description="What an SPF fail (or softfail) does: off | none (header only) | tag | quarantine | reject")
    dkim: AuthAction | None = Field(None, description="What a failing DKIM signature does: off | none (header only) | tag | quarantine | reject")
    dmarc: DmarcAction | None = Field(None, description="DMARC: off | none (header only) | honor (apply the domain's p=/sp=) | tag")
    arc_trusted: list[str] | None = Field(None, description="ARC sealers (domains) whose valid chain overrides a DMARC failure")
    auth_tag: str | None = Field(None, max_length=64, description="Subject prefix of the tag action")

    @field_validator("arc_trusted")
    @classmethod
    def _arc_domains(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = []
        for d in v:
            d = d.lower().rstrip(".")
            if not _DOMAIN_RE.match(d):
                raise ValueError(f"{d!r} is not a domain name")
            out.append(d)
        return out


class SessionProfile(BaseModel):
    """A resolved session profile: every value set (built-in, then [smtp], then the
    [[session_profile]] block). Made by Config.session_profiles; read, never changed."""

    model_config = ConfigDict(frozen=True)

    name: str
    max_connections_per_ip: int
    connections_per_minute: int
    max_messages_per_session: int
    max_recipients: int
    messages_per_hour: int
    recipients_per_hour: int
    max_message_size: int
    max_header_size: int
    max_ehlo: int
    max_noop: int
    max_rset: int
    max_errors: int
    greet_pause: float
    idle_timeout: float
    bare_newline: Literal["reject", "normalize"]
    sender_domain_check: bool
    strict_syntax: bool
    own_domain_spoof: Literal["reject", "accept"]
    require_ptr: bool
    helo_required: bool
    helo_strict: bool
    helo_resolvable: bool
    reject_own_helo: bool
    dnsbl_threshold: int
    greylist: bool
    greylist_delay: float
    greylist_window: float
    greylist_remember: float
    greylist_pass_count: int
    spf: AuthAction
    dkim: AuthAction
    dmarc: DmarcAction
    arc_trusted: tuple[str, ...]
    auth_tag: str


# The built-in profiles' values for the keys [smtp] does not have (docs/policy.md).
# "default": every client not in relay_networks, not authenticated, matched by no
# [[ip_policy]]; "trusted": relay_networks and authenticated submission.
_DEFAULT_PROFILE: dict[str, Any] = {
    "connections_per_minute": 0,
    "max_messages_per_session": 100,
    "messages_per_hour": 0,
    "recipients_per_hour": 0,
    "max_header_size": 1_000_000,
    "max_ehlo": 3,
    "max_noop": 10,
    "max_rset": 20,
    "bare_newline": "reject",
    "sender_domain_check": True,
    "strict_syntax": False,
    "own_domain_spoof": "reject",
    "require_ptr": False,
    "helo_required": False,
    "helo_strict": False,
    "helo_resolvable": False,
    "reject_own_helo": True,
    "dnsbl_threshold": 1,
    "greylist": False,
    "greylist_delay": 300.0,
    "greylist_window": 2 * 86400.0,
    "greylist_remember": 36 * 86400.0,
    "greylist_pass_count": 5,
    # Sender authentication is off until the administrator turns it on (an upgrade must
    # not start tagging or refusing mail; docs/authentication.md).
    "spf": "off",
    "dkim": "off",
    "dmarc": "off",
    "arc_trusted": (),
    "auth_tag": "[SUSPECT]",
}
_TRUSTED_PROFILE: dict[str, Any] = {
    **_DEFAULT_PROFILE,
    "max_messages_per_session": 0,
    "max_ehlo": 0,
    "max_noop": 0,
    "max_rset": 0,
    "greet_pause": 0.0,
    "bare_newline": "normalize",
    "sender_domain_check": False,
    "own_domain_spoof": "accept",
    "reject_own_helo": False,
    "dnsbl_threshold": 0,
    "greylist": False,
}
BUILTIN_PROFILES = ("default", "trusted")


class IpPolicySection(Section):
    """[[ip_policy]]: clients from these networks get this session profile; the first
    policy that matches wins."""

    source: list[Network] = Field(min_length=1, description="Client networks (CIDR) this policy applies to")
    profile: str = Field(description="The [[session_profile]] name (or default / trusted)")
    content_profile: str | None = Field(
        None, description="The [[content_profile]] for mail from these clients (a [[recipient_policy]] naming one wins)"
    )


class DnsblSection(Section):
    """[[dnsbl]]: a DNS blocklist zone asked about each client address."""

    zone: str = Field(description="The zone (e.g. zen.spamhaus.org); the client 192.0.2.1 is looked up as 1.2.0.192.<zone>")
    weight: int = Field(1, ge=1, description="Added to the client's score when listed (compared with dnsbl_threshold)")
    match: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/24")],
        description="Answers that count as listed (addresses or networks); others are ignored",
    )

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not _DOMAIN_RE.match(v):
            raise ValueError(f"{v!r} is not a DNS zone")
        return v


class DnsblAllowlistSection(Section):
    networks: list[Network] = Field(default_factory=list, description="Clients in these networks are never looked up in a [[dnsbl]]")


class RecipientPolicySection(Section):
    """[[recipient_policy]]: which session profile applies to a transaction, by
    direction, sender and recipient; the first that matches wins."""

    direction: Literal["inbound", "outbound"] = Field(
        "inbound", description="inbound: the recipient is in one of our domains; outbound: it is not"
    )
    sender: str = Field("*@*", description="Envelope sender pattern (* and ? wildcards, case-insensitive)")
    recipient: str = Field("*@*", description="Recipient pattern (* and ? wildcards, case-insensitive)")
    session_profile: str | None = Field(None, description="The [[session_profile]] whose checks apply to these recipients")
    content_profile: str | None = Field(None, description="The [[content_profile]] whose rules apply to mail for these recipients")

    @field_validator("sender", "recipient")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if "@" not in v or any(c.isspace() or ord(c) < 32 for c in v):
            raise ValueError(f"{v!r} is not an address pattern (write local@domain with * and ?, e.g. *@corp.example)")
        return v.lower()



# -- content profiles (kanmon/content/, docs/content.md) ----------------------------------

ContentAction = Literal["accept", "tag", "add_header", "score", "quarantine", "reject", "discard", "redirect", "bcc"]
ATTACHMENT_CLASSES = ("executable", "script", "macro", "archive", "encrypted", "disk_image")


class TextMatch(Section):
    """A condition written as a table: keywords and/or a regular expression."""

    keywords: list[str] = Field(default_factory=list, description="Any of these words (case-insensitive, full/half width alike)")
    regex: str | None = Field(None, description="A Python regular expression searched in the decoded text (case-insensitive)")

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is not a regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _something(self) -> TextMatch:
        if not self.keywords and self.regex is None:
            raise ValueError("write keywords = [...] or regex = \"...\"")
        return self


def _text_match(value: Any) -> Any:
    """A condition value: a word, a list of words, or a table {keywords, regex}."""
    if isinstance(value, str):
        return {"keywords": [value]}
    if isinstance(value, list):
        return {"keywords": value}
    return value


TextCondition = Annotated[TextMatch, BeforeValidator(_text_match)]


class ContentRuleSection(Section):
    """[[content_profile.rule]]: conditions on one message and what to do when they match.
    With match = "all" (the default) every condition written must hold; with "any", one."""

    name: str = Field(description="Named in events, history, the quarantine and `kanmon rules test`")
    match: Literal["all", "any"] = Field("all", description="all: every condition must hold; any: one is enough")
    sender: TextCondition | None = Field(None, description="Envelope sender contains (keywords) or matches (regex)")
    recipient: TextCondition | None = Field(None, description="Any envelope recipient contains / matches")
    from_outside: bool | None = Field(None, description="true: the client is neither in relay_networks nor authenticated")
    authenticated: bool | None = Field(None, description="true: the client authenticated (submission)")
    header: dict[str, TextCondition] | None = Field(None, description="{ Header-Name = [...] }: the decoded header field contains / matches")
    subject: TextCondition | None = Field(None, description="The decoded Subject contains / matches")
    body: TextCondition | None = Field(None, description="The text of the message (every text part decoded, HTML reduced to text)")
    attachment_name: list[str] | None = Field(None, description="Glob patterns on attachment names, e.g. [\"*.exe\", \"*.pdf.*\"] (also inside archives)")
    attachment_type: list[str] | None = Field(
        None, description="MIME types (application/zip, image/*) or classes: " + ", ".join(ATTACHMENT_CLASSES) + " (by content, not name)"
    )
    size_over: Size | None = Field(None, description="The message is larger than this")
    action: ContentAction = Field(description="accept | tag | add_header | score | quarantine | reject | discard | redirect | bcc")
    log_only: bool = Field(False, description="Only record that the rule matched (and what it would have done)")
    tag: str | None = Field(None, description="tag: the Subject prefix (default: the profile's tag)")
    add_header: str | None = Field(None, description="add_header (or with tag): a field \"Name: value\" to add")
    score: float = Field(0.0, description="score: added to the message's score")
    reply: str | None = Field(None, description="reject: the reply text after 550 5.7.1")
    address: str | None = Field(None, description="redirect / bcc: the address that gets the message")

    @model_validator(mode="after")
    def _consistent(self) -> ContentRuleSection:
        conditions = (self.sender, self.recipient, self.from_outside, self.authenticated, self.header, self.subject,
                      self.body, self.attachment_name, self.attachment_type, self.size_over)
        if all(c is None for c in conditions):
            raise ValueError(f"rule {self.name!r} has no condition (it would match every message)")
        if self.action in ("redirect", "bcc") and not (self.address and "@" in self.address):
            raise ValueError(f"rule {self.name!r}: action {self.action} needs address = \"user@domain\"")
        if self.action == "score" and not self.score:
            raise ValueError(f"rule {self.name!r}: action score needs score = N")
        if self.add_header is not None and not re.match(r"^[!-9;-~]+:[ \t]*[^\r\n]*$", self.add_header):
            raise ValueError(f"rule {self.name!r}: add_header {self.add_header!r} is not \"Name: value\" on one line")
        if self.action == "add_header" and self.add_header is None:
            raise ValueError(f"rule {self.name!r}: action add_header needs add_header = \"Name: value\"")
        for t in self.attachment_type or ():
            if "/" not in t and t not in ATTACHMENT_CLASSES:
                raise ValueError(f"rule {self.name!r}: attachment_type {t!r} is neither a MIME type nor one of {', '.join(ATTACHMENT_CLASSES)}")
        return self


class ContentProfileSection(Section):
    """[[content_profile]]: ordered rules, attachment policies and scanner settings for
    the content of a message (checked at the end of DATA)."""

    name: ProfileName = Field(description="Referenced by [[recipient_policy]] content_profile; \"inbound\" and \"outbound\" apply by direction")
    tag: str = Field("[SPAM]", description="Subject prefix of a tag action")
    encrypted_archive: Literal["accept", "tag", "quarantine", "reject"] = Field(
        "quarantine", description="An encrypted archive (antivirus cannot see inside it; the \"PPAP\" habit)"
    )
    archive_limit: Literal["accept", "tag", "quarantine", "reject"] = Field(
        "quarantine", description="An archive beyond a bound (depth, files, size, compression ratio): a zip bomb"
    )
    virus: Literal["quarantine", "reject"] = Field("quarantine", description="A message the antivirus scanner finds infected")
    scanner_failure: Literal["tempfail", "accept_and_tag"] = Field(
        "tempfail", description="A scanner down or too slow: 451 4.7.1 (the client retries), or accept with a header"
    )
    quarantine_score: float | None = Field(None, description="Quarantine when the score reaches this")
    reject_score: float | None = Field(None, description="Reject (550 5.7.1) when the score reaches this")
    rule: list[ContentRuleSection] = Field(default_factory=list, description="The rules, in order ([[content_profile.rule]] tables)")

    @model_validator(mode="after")
    def _unique_rules(self) -> ContentProfileSection:
        names = [r.name for r in self.rule]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"content_profile {self.name!r}: rule {name!r} is defined twice")
        return self


def _scanner_address(v: str | None) -> str | None:
    if v is None:
        return v
    from urllib.parse import urlsplit  # noqa: PLC0415

    if v.startswith("unix:"):
        if not v[5:].startswith("/"):
            raise ValueError(f"{v!r}: a unix socket is written unix:/absolute/path")
    elif v.startswith("http://"):
        if not urlsplit(v).hostname:
            raise ValueError(f"{v!r} has no host")
    else:
        parse_hostport(v)
    return v


class AntivirusSection(Section):
    """[antivirus]: clamd scans every message at the end of DATA (docs/content.md)."""

    clamd: str | None = Field(None, description='clamd\'s socket: "unix:/run/clamav/clamd.ctl" or "127.0.0.1:3310"; unset: no scanning')
    timeout: Duration = Field(60.0, gt=0, description="A scan that takes longer counts as a scanner failure")
    max_size: Size = Field(25 * 1024 * 1024, ge=1, description="clamd's StreamMaxLength: larger messages are not scanned (a header says so)")
    max_scans: int = Field(8, ge=1, description="Scans at once (more wait their turn)")

    @field_validator("clamd")
    @classmethod
    def _clamd(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("http://"):
            raise ValueError(f"{v!r}: clamd is a unix socket or host:port, not a URL")
        return _scanner_address(v)


class SpamSection(Section):
    """[spam]: Rspamd scores every message at the end of DATA (docs/content.md)."""

    rspamd: str | None = Field(None, description='Rspamd\'s normal worker: "http://127.0.0.1:11333"; unset: no spam scoring')
    timeout: Duration = Field(30.0, gt=0, description="A check that takes longer counts as a scanner failure")
    max_size: Size = Field(20 * 1024 * 1024, ge=1, description="Larger messages are not scored")

    @field_validator("rspamd")
    @classmethod
    def _rspamd(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("http://"):
            raise ValueError(f"{v!r}: write http://host:port")
        return _scanner_address(v)


class ArchiveSection(Section):
    """[archive]: a copy of every accepted message (journaling), to a Maildir or an address."""

    maildir: Path | None = Field(None, description="Keep the copies in this Maildir (DIR/new), one file a message")
    to: str | None = Field(None, description="Or send the copies to this address (an added recipient)")
    direction: Literal["both", "inbound", "outbound"] = Field(
        "both", description="inbound: from outside; outbound: from relay_networks and authenticated users"
    )
    domains: list[str] = Field(default_factory=list, description="Only mail from or to these domains; empty: all")
    quota: Size | None = Field(None, ge=1, description="maildir: stop copying past this size (the archive alert warns before)")

    @model_validator(mode="after")
    def _one_target(self) -> ArchiveSection:
        if self.maildir is not None and self.to is not None:
            raise ValueError("set maildir or to, not both")
        if self.to is not None and ("@" not in self.to or any(c.isspace() or ord(c) < 32 for c in self.to)):
            raise ValueError(f"to = {self.to!r} is not an address")
        if self.quota is not None and self.maildir is None:
            raise ValueError("quota applies to maildir")
        return self

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return [d.lower().rstrip(".") for d in v]

    @property
    def enabled(self) -> bool:
        return self.maildir is not None or self.to is not None

    def applies(self, mail_from: str, rcpts: list[str], from_outside: bool) -> str:
        """The message's direction when it is to be archived, else ""."""
        direction = "inbound" if from_outside else "outbound"
        if not self.enabled or self.direction not in ("both", direction):
            return ""
        if self.domains:
            addrs = [mail_from, *rcpts]
            if not any(a.rpartition("@")[2].lower() in self.domains for a in addrs):
                return ""
        return direction


class QuarantineSection(Section):
    """[quarantine]: how long quarantined messages are kept and when recipients get a digest."""

    keep: Duration = Field(30 * 86400.0, gt=0, description="Quarantined messages are deleted this long after they arrived")
    digest: str | None = Field(
        None, description='When each recipient gets a list of their spam quarantine (cron syntax, e.g. "0 8 * * *"); unset: no digest'
    )
    digest_from: str = Field("", description="Sender of the digest (default: postmaster@<server.hostname>)")

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        return parse_schedule(v) if v is not None else None


class OutboundSection(Section):
    smarthost: list[HostPort] = Field(
        default_factory=list, description="Mail for other domains goes here, in order; empty: by MX"
    )
    tls: TlsPolicy = Field("opportunistic", description="TLS for outbound mail: none|opportunistic|required|verify|smtps")
    ca_file: Path | None = Field(None, description="CA bundle for tls = verify (default: the system's)")
    mx_port: int = Field(25, ge=1, le=65535, description="Port used for MX delivery (tests point it elsewhere)")
    max_per_destination: int = Field(
        20, ge=1, description="Concurrent connections per next hop (address and port), cached idle ones included"
    )
    connection_cache: bool = Field(
        True, description="Keep an SMTP session open after a delivery for the next message to the same next hop (like Postfix smtp_connection_cache_on_demand)"
    )
    connection_cache_time: Duration = Field(2.0, gt=0, description="A cached session unused this long is closed (Postfix smtp_connection_cache_time_limit)")
    connection_reuse_time: Duration = Field(300.0, gt=0, description="A session open this long is not reused again (Postfix smtp_connection_reuse_time_limit)")
    connection_reuse_count: int = Field(100, ge=1, description="Messages sent over one session at most (Postfix smtp_connection_reuse_count_limit)")
    connection_cache_size: int = Field(100, ge=1, description="Idle sessions kept in all, per delivery process; the one idle longest makes room")
    connect_timeout: Duration = Field(30.0, gt=0, description="Time to connect and get the greeting")
    command_timeout: Duration = Field(300.0, gt=0, description="Time for a reply to MAIL/RCPT/EHLO (RFC 5321 4.5.3.2)")
    data_timeout: Duration = Field(600.0, gt=0, description="Time for the reply after the final dot (RFC 5321 4.5.3.2.6)")
    bind_address: str | None = Field(None, description="Local address outgoing connections leave from (like smtp_bind_address)")
    source_ips: list[str] = Field(default_factory=list, description="Addresses our outgoing mail leaves from (for dns check)")
    mta_sts: bool = Field(False, description="MX delivery honours the destination's MTA-STS policy (RFC 8461; docs/outbound-tls.md)")

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address") from None
        return v


class TlsPolicyEntry(Section):
    """One [[tls_policy]] row: the TLS an MX delivery to this domain must have (like
    Postfix smtp_tls_policy_maps; it overrides MTA-STS and DANE for the domain)."""

    domain: str = Field(description="Destination domain (exact; \".example.com\" also matches its subdomains)")
    level: Literal["none", "opportunistic", "required", "verify"] = Field(
        description="none | opportunistic (Postfix may) | required (encrypt) | verify (a certificate valid for the MX name)"
    )
    fingerprints: list[str] = Field(
        default_factory=list,
        description="\"sha256:HEX\" of the server's certificate or of its public key (SPKI); one must match (level required or verify)",
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not _DOMAIN_RE.match(v.removeprefix(".")):
            raise ValueError(f"{v!r} is not a domain name")
        return v

    @field_validator("fingerprints")
    @classmethod
    def _fingerprints(cls, v: list[str]) -> list[str]:
        out = []
        for fp in v:
            algo, _, digest = fp.strip().partition(":")
            digest = digest.replace(":", "").lower()
            if algo.lower() != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{fp!r} is not sha256:<64 hex digits>")
            out.append(f"sha256:{digest}")
        return out

    @model_validator(mode="after")
    def _pins_need_tls(self) -> TlsPolicyEntry:
        if self.fingerprints and self.level not in ("required", "verify"):
            raise ValueError(f"tls_policy {self.domain!r}: fingerprints need level = \"required\" or \"verify\"")
        return self


class DnsSection(Section):
    servers: list[HostPort] = Field(default_factory=list, description="DNS servers to ask; empty: the system resolver")
    timeout: Duration = Field(5.0, gt=0, description="Time for one DNS query")
    dnssec: Literal["off", "trust-ad"] = Field(
        "off", description="trust-ad: the servers are validating resolvers we trust (local); their AD bit enables DANE"
    )
    cache_entries: int = Field(
        10_000, ge=0, description="Answers the node's DNS cache keeps (positive and negative, each for its TTL; "
        "`kanmon dns cache`); 0: no cache, every lookup asks the servers"
    )


class QueueSection(Section):
    retry: str = Field("5m..1h", description="first..max retry interval; doubling, jittered")
    warn_after: Duration = Field(4 * 3600.0, description='A delay notice to the sender after this; "0" = never')
    warn_every: Duration = Field(0.0, description='Repeat the delay notice this often (sendmail\'s "every 4h"); "0" = once')
    lifetime: Duration = Field(3 * 86400.0, description='Then a failure notice; "0" = a temporary failure bounces at once')
    min_attempts: int | None = Field(
        None, ge=1, description='Attempts before a message can expire (default: 2 with lifetime "0", else 1)'
    )
    max_active: int = Field(10_000, ge=10, description="Messages held in memory by the queue manager at once")
    suspend_delivery: bool = Field(False, description="Accept and queue mail but deliver nothing (maintenance, benchmarks)")

    @field_validator("retry")
    @classmethod
    def _retry(cls, v: str) -> str:
        parse_retry(v)
        return v

    @property
    def retry_bounds(self) -> tuple[float, float]:
        return parse_retry(self.retry)

    @property
    def attempts_before_expiry(self) -> int:
        """min_attempts, or its default: 2 with lifetime "0" (a greylisting server's one
        retry after the first interval), otherwise 1."""
        if self.min_attempts is not None:
            return self.min_attempts
        return 2 if self.lifetime == 0 else 1


def parse_retry(value: str) -> tuple[float, float]:
    """'5m..1h' -> (300, 3600)."""
    first, sep, last = value.partition("..")
    if not sep:
        raise ValueError(f"{value!r}: write first..max, e.g. 5m..1h")
    lo, hi = parse_duration(first), parse_duration(last)
    if lo <= 0 or hi < lo:
        raise ValueError(f"{value!r}: first must be > 0 and not above max")
    return lo, hi


class DnsCheckSection(Section):
    every: Duration | None = Field(None, description="Run the DNS health check inside kanmon serve this often")
    domains: list[str] = Field(default_factory=list, description="Domains to check (default: every [[domain]])")
    ips: list[str] = Field(default_factory=list, description="Our outgoing IPs (default: outbound.source_ips)")
    helo: str | None = Field(None, description="Name we announce (default: server.hostname)")
    dkim_selector: str | None = Field(None, description="DKIM selector whose record is checked")
    dkim_key: Path | None = Field(None, description="Our DKIM key (PEM, private or public) to compare with DNS")


class RecordsSection(Section):
    keep: Duration = Field(90 * 86400.0, description='Event log and history older than this are pruned daily; "0" = keep all')
    url: str | None = Field(
        None,
        description='PostgreSQL shared by several nodes, "postgresql://user@host:port/db" (libpq options such as '
                    '?sslmode=verify-full&sslrootcert=... pass through): every event, history row and counter is also '
                    "written there with the node's name (docs/cluster.md); none: this node's SQLite only",
    )
    password_file: Path | None = Field(
        None, description="File holding the PostgreSQL password (else libpq's PGPASSFILE or ~/.pgpass)"
    )
    node: str | None = Field(
        None, description="This node's name in the shared records (default: server.hostname)", min_length=1, max_length=64
    )

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        if parts.password:
            raise ValueError("must not hold the password: put it in password_file (or PGPASSFILE)")
        return v

    @field_validator("node")
    @classmethod
    def _node_name(cls, v: str | None) -> str | None:
        if v is not None and not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("letters, digits, '-', '_' and '.' only")
        return v


class ClusterSection(Section):
    node: str = Field(
        ..., min_length=1, max_length=64,
        description="This node's name in the cluster: it applies the configuration pushed with `kanmon cluster push` "
                    "(with its [node.NAME] overlay) to the shared records' database ([records] url), docs/cluster.md",
    )

    @field_validator("node")
    @classmethod
    def _node_name(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("letters, digits, '-', '_' and '.' only")
        return v


class LogSection(Section):
    to: list[Literal["file", "syslog"]] = Field(
        default_factory=lambda: ["file"],
        description='Where event lines go: "file" (data_dir/log/kanmon.log), "syslog" (the local syslog socket; '
                    "journald reads it too), both, or none",
    )
    syslog_socket: str = Field("/dev/log", description="The local syslog datagram socket")
    facility: Literal["mail", "daemon", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7"] = Field(
        "mail", description="Syslog facility of the lines"
    )
    rotate_size: Size | None = Field(None, description="Rotate the log file when it grows past this size; unset: never")
    rotate_age: Duration | None = Field(None, description="Rotate the log file when it is older than this; unset: never")
    rotate_keep: int = Field(7, ge=1, le=1000, description="Rotated files kept (kanmon.log.1 ... kanmon.log.N)")

    @field_validator("to")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a destination is named twice")
        return v


class MetricsSection(Section):
    listen: HostPort | None = Field(None, description="ip:port serving Prometheus metrics at /metrics; unset: off")


ALERT_CATEGORIES = ("critical", "disk", "queue", "delivery", "ha", "archive", "expiry", "dns", "scanner", "records")
AlertCategoryName = Literal["critical", "disk", "queue", "delivery", "ha", "archive", "expiry", "dns", "scanner",
                            "records"]


class Reminder(Section):
    """[[alerts.reminder]]: a date of the administrator's own (a contract, a licence, a domain)."""

    what: str = Field(min_length=1, max_length=200, description='What is due, as the alert says it: "renew the support contract"')
    due: datetime.date = Field(description='The day it is due: "2027-03-31" (local time)')
    before: Duration = Field(30 * 86400.0, description="expiry: start reminding this long before the day")

    @field_validator("what")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must be one line of text without control characters")
        return v


class AlertsSection(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    to: list[str] = Field(default_factory=list, description="Alert mail goes to these addresses; empty: log and stderr only")
    from_: str = Field("", alias="from", description="From: header of alert mail (default: kanmon@<server.hostname>); the envelope sender is <>")
    min_interval: Duration = Field(3600.0, description="The same alert is mailed at most once per interval (expiry: expiry_every)")
    disk_free_below: Size | None = Field(None, description="disk: free space in data_dir under this (default: smtp.min_free_disk)")
    queue_size_above: int = Field(1000, ge=1, description="queue: more messages than this in the queue")
    queue_oldest_above: Duration = Field(
        4 * 3600.0, gt=0, description="queue: the oldest message not on hold waited longer than this"
    )
    deferred_ratio_above: float = Field(
        0.5, ge=0, le=1, description="delivery: share of deferred results over the last hour (at least 10 results)"
    )
    archive_used_above: float = Field(
        0.9, gt=0, le=1,
        description="archive: share of the `[archive] quota` the archive maildir uses (checked every minute)"
    )
    cert_expires_within: Duration = Field(14 * 86400.0, description="expiry: our TLS certificate expires within this")
    dkim_rotate_after: Duration | None = Field(
        None, description="expiry: a DKIM key ([dnscheck] dkim_key, active [[dkim]] keys) is older than this, by its file's time; unset: off"
    )
    expiry_every: Duration = Field(86400.0, gt=0, description="expiry alerts are mailed at most once per this while they last")
    categories: list[AlertCategoryName] = Field(
        default_factory=lambda: list(ALERT_CATEGORIES),
        description='Categories mailed; the others are only logged ("certificate" is read as "expiry")',
    )
    reminder: list[Reminder] = Field(default_factory=list, description="The administrator's own due dates (expiry alerts)")

    @field_validator("categories", mode="before")
    @classmethod
    def _renamed_category(cls, v: Any) -> Any:
        """"certificate" was the category of certificate expiry before `expiry` took it over."""
        if isinstance(v, list):
            return ["expiry" if c == "certificate" else c for c in v]
        return v

    @model_validator(mode="after")
    def _unique_reminders(self) -> AlertsSection:
        seen: set[str] = set()
        for r in self.reminder:
            if r.what in seen:
                raise ValueError(f"reminder {r.what!r} is listed twice")
            seen.add(r.what)
        return self

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            local, at, domain = a.rpartition("@")
            if not at or not local or not _DOMAIN_RE.match(domain.lower()):
                raise ValueError(f"{a!r} is not a mail address")
        return v

    @field_validator("from_")
    @classmethod
    def _sender(cls, v: str) -> str:
        if v:
            local, at, domain = v.rpartition("@")
            if not at or not local or not _DOMAIN_RE.match(domain.lower()):
                raise ValueError(f"{v!r} is not a mail address")
        return v


# The message filters: one vocabulary for `kanmon queue` commands (as flags of the same
# names: --from, --older-than, --body) and [[maintenance]] jobs (as keys). The matching is
# kanmon.admin.filters'; docs/queue.md describes each.

_BOUND_RE = re.compile(r"^\s*(>=|<=|>|<)?\s*(.+?)\s*$")


def parse_bound(value: Any, parse_number=None) -> tuple[str, float]:
    """'>1MB' -> ('>', 1000000); '<=3' -> ('<=', 3); a bare value means 'at least' ('>=').

    parse_number turns the number part into a number (parse_size for sizes); without it
    the value is a whole count.
    """
    if isinstance(value, bool):
        raise ValueError("write a comparison like >5, <=3 or 100KB")
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("write a comparison like >5, <=3 or 100KB")
    m = _BOUND_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a comparison (write >5, <=3 or 100KB)")
    op, number = m.group(1) or ">=", m.group(2)
    if parse_number is not None:
        return op, float(parse_number(number))
    if not number.isdigit():
        raise ValueError(f"{value!r}: {number!r} is not a whole number")
    return op, float(int(number))


def parse_size_bound(value: Any) -> tuple[str, float]:
    return parse_bound(value, parse_size)


def _check_size_bound(value: Any) -> Any:
    parse_size_bound(value)
    return str(value)  # kept as written, for display; matchers parse it with the same function


def _check_count_bound(value: Any) -> Any:
    parse_bound(value)
    return str(value)


def _check_regex(value: Any) -> Any:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{value!r} is not a regular expression: {e}") from None
    return value


Regex = Annotated[str, BeforeValidator(_check_regex)]
SizeBound = Annotated[str, BeforeValidator(_check_size_bound)]
CountBound = Annotated[str, BeforeValidator(_check_count_bound)]

QUEUE_STATES = ("active", "deferred", "hold", "corrupt", "all")


class QueueFilter(Section):
    """Which messages a queue command or a maintenance job acts on; all given must match."""

    from_: str | None = Field(None, alias="from", description='Sender: a glob (`*@example.com`) or a substring; "<>" is the null sender')
    to: str | None = Field(None, description="A recipient not yet delivered: a glob or a substring")
    domain: str | None = Field(None, description="A recipient not yet delivered is in this domain")
    older_than: Duration | None = Field(None, description="Arrived longer ago than this")
    reason: Regex | None = Field(None, description="Any reply of any attempt for a recipient not yet delivered matches this regex")
    subject: Regex | None = Field(None, description="The Subject (decoded) matches this regex")
    header: Regex | None = Field(None, description='A header line ("Name: value", decoded) matches this regex')
    body: Regex | None = Field(None, description="The text of the first 64 KB (decoded; a DSN's text and Diagnostic-Code too) matches this regex")
    size: SizeBound | None = Field(None, description='Message size: ">1MB", "<=100KB"; a bare size means at least that')
    attempts: CountBound | None = Field(None, description='Delivery attempts so far: ">=5", "<2"; a bare number means at least that')

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def criteria(self) -> dict[str, Any]:
        """The given filters, by their vocabulary names (`from`, `older_than`, ...)."""
        return {f.alias or n: getattr(self, n) for n, f in type(self).model_fields.items()
                if n in QueueFilter.model_fields and getattr(self, n) is not None}


FILTER_NAMES = tuple(f.alias or n for n, f in QueueFilter.model_fields.items())


class MaintenanceJob(QueueFilter):
    """[[maintenance]]: a queue operation `kanmon serve` runs on a cron schedule (docs/queue.md)."""

    name: str | None = Field(None, description="Name for logs and `kanmon maintenance run NAME` (default: job<index>)")
    schedule: str = Field(description='When, in cron syntax: "minute hour day-of-month month day-of-week", local time')
    action: Literal["delete", "hold", "bounce", "flush"] = Field(description="delete, hold, bounce or flush")
    state: Literal["deferred", "hold", "all"] = Field("deferred", description="Which messages it looks at: deferred, hold or all")
    catch_up: bool = Field(False, description="A run missed while the server was down runs once at start (like anacron)")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return parse_schedule(v)

    @model_validator(mode="after")
    def _bounded(self) -> MaintenanceJob:
        if self.action != "flush" and not self.criteria():
            raise ValueError(f"action = {self.action!r} needs a filter such as older_than, reason, from or body "
                             "(it would act on the whole queue)")
        return self


class ListenerPair(Section):
    listen: list[HostPort] = Field(default_factory=list, description="Plain listeners (STARTTLS offered)")
    listen_tls: list[HostPort] = Field(default_factory=list, description="Implicit TLS listeners (RFC 8314)")


class SubmissionSection(ListenerPair):
    max_connections_per_ip: int | None = Field(
        None, ge=1,
        description="Concurrent submission connections from one client address (all receivers); "
                    "default: the client's session profile's ([smtp] max_connections_per_ip, 50)",
    )

    from_header: Literal["any", "own", "own_or_alias"] = Field(
        "own_or_alias",
        description='The From: header of an authenticated user\'s message: "own" (only the user\'s address), '
                    '"own_or_alias" (also an alias that delivers to the user), "any"; else 553 5.7.1 at DATA',
    )


class MailboxAccessSection(ListenerPair):
    """[pop3] and [imap]: their listeners and the limits of their connections."""

    max_connections: int = Field(1000, ge=1, description="Concurrent connections in all (counted from accept)")
    max_connections_per_ip: int = Field(
        50, ge=1, description="Concurrent connections from one client address (counted from accept, TLS handshake included)",
    )
    login_timeout: Duration = Field(
        60.0, gt=0, description="A connection not logged in this long after it opened is closed, whatever it sends",
    )


class Pop3Section(MailboxAccessSection):
    pass


class ImapSection(MailboxAccessSection):
    pass


class MailboxIndexSection(Section):
    """[mailbox_index]: where the mail store keeps the IMAP cache file of each folder."""

    directory: Path | None = Field(
        None,
        description="Keep the cache files under this directory (mirroring mailboxes/, as Dovecot's INDEX=) "
                    "instead of beside each Maildir folder, e.g. on a faster disk; relative: below data_dir",
    )


class SieveSection(Section):
    """[sieve]: users' filters run at local delivery (docs/sieve.md)."""

    enabled: bool = Field(True, description="Run each user's active Sieve script at local delivery")
    max_script_size: Size = Field(65536, ge=1, le=1024 * 1024, description="Largest script a user may store")
    max_scripts: int = Field(20, ge=1, le=1000, description="Scripts one user may store")
    max_redirects: int = Field(4, ge=0, le=32, description="Redirects one script may make for one message")


class ManageSieveSection(MailboxAccessSection):
    """[managesieve]: where users' mail clients edit their scripts (RFC 5804, port 4190,
    STARTTLS with the node's certificate)."""


class HealthCheck(Section):
    type: Literal["tcp", "smtp", "http", "ping"] = Field("smtp", description="tcp | smtp | http | ping")
    interval: Duration = Field(10.0, gt=0, description="Time between checks")
    timeout: Duration = Field(2.0, gt=0, description="Time one check may take")
    retries: int = Field(3, ge=1, description="Failed checks in a row before a server is down (alias of fall)")
    fall: int | None = Field(None, ge=1, description="Failed checks in a row before down (default: retries)")
    rise: int = Field(1, ge=1, description="Passed checks in a row before up again")
    path: str = Field("/", description="http: path to ask for")
    host: str | None = Field(None, description="http: Host header")


class RealServer(Section):
    address: HostPort = Field(description="ip:port of a real server")
    mode: Literal["active", "standby", "disabled"] = Field("active", description="active | standby | disabled")
    weight: int = Field(1, ge=0, description="Share for the weighted method")
    max_connections: int = Field(0, ge=0, description="0 = unlimited")


class VirtualServer(Section):
    name: str = Field(description="Name in logs and status")
    listen: HostPort = Field(description="The virtual address clients connect to")
    method: Literal["source-ip-hash", "round-robin", "weighted", "first-alive", "least-rtt", "least-session"] = Field(
        "first-alive", description="How a real server is chosen"
    )
    proxy_protocol: bool = Field(False, description="Send a PROXY protocol v2 header to the real server")
    health: HealthCheck = Field(default_factory=HealthCheck, description="Health check of the real servers")
    connect_timeout: Duration = Field(5.0, gt=0, description="Time to connect to a real server")
    idle_timeout: Duration = Field(600.0, gt=0, description="A spliced connection idle this long is closed")
    real: list[RealServer] = Field(default_factory=list, description="[[balancer.virtual_server.real]] tables")


# [console]: the web console and its HTTP API (kanmon.console, docs/console.md).

def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve anywhere: plain HTTP needs a loopback address


class ConsoleSection(Section):
    listen: HostPort = Field(("127.0.0.1", 8443), description="ip:port of the web console and /api/v1")
    tls: bool = Field(True, description="HTTPS with the [tls] certificate (or the self-signed one); false: plain HTTP, "
                                        "allowed only on a loopback address (a reverse proxy on this host)")
    session_timeout: Duration = Field(1800.0, gt=0, description="A console session ends after this long without a request")
    session_lifetime: Duration = Field(12 * 3600.0, gt=0, description="A console session ends this long after its login, "
                                                                      "however active")
    max_upload: Size = Field(1024 ** 3, ge=1, description="Largest queue backup the console takes for a restore "
                                                          "(a larger upload answers 413)")
    public_url: str = Field("", description="Base URL at which recipients reach this console (e.g. "
                                            "\"https://mail.example.jp:8443\"): the quarantine digest then carries a "
                                            "signed release and delete link per message, to /q/...; empty: no links")

    @model_validator(mode="after")
    def _plain_only_on_loopback(self) -> ConsoleSection:
        if not self.tls and not _is_loopback(self.listen[0]):
            raise ValueError(f"listen: plain HTTP (tls = false) is allowed only on a loopback address, not "
                             f"{self.listen[0]}: passwords and session cookies would cross the network in clear")
        if self.session_timeout > self.session_lifetime:
            raise ValueError("session_timeout must not be longer than session_lifetime")
        if self.public_url:
            u = urlsplit(self.public_url)
            if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
                raise ValueError(f"public_url {self.public_url!r}: an http(s) URL with a host and no query is needed")
        return self


class BalancerSection(Section):
    virtual_server: list[VirtualServer] = Field(default_factory=list, description="[[balancer.virtual_server]] tables")
    processes: int = Field(
        0, ge=0, le=64,
        description="Processes that accept and forward connections, sharing the listening sockets and the health "
                    "state; 0: one per CPU core",
    )
    backlog: int = Field(4096, ge=1, le=65535, description="Listen backlog of each virtual address (as HAProxy's default; "
                                                           "the kernel caps it at net.core.somaxconn)")
    splice: bool = Field(True, description="A connection that has carried 256 KiB one way goes on with splice(2) "
                                           "through a pipe where the system has it (Linux): its bytes no longer pass "
                                           "through Python")


class Config(Section):
    server: ServerSection = Field(default_factory=ServerSection, description="Identity and storage")
    smtp: SmtpSection = Field(default_factory=SmtpSection, description="The SMTP listener (port 25 role)")
    tls: TlsSection | None = Field(None, description="Certificate for STARTTLS; without it a self-signed pair is made")
    domain: list[DomainSection] = Field(default_factory=list, description="Our domains ([[domain]] tables)")
    outbound: OutboundSection = Field(default_factory=OutboundSection, description="Mail for every other domain")
    dns: DnsSection = Field(default_factory=DnsSection, description="How kanmon resolves MX/A/AAAA")
    tls_policy: list[TlsPolicyEntry] = Field(
        default_factory=list, description="TLS required per destination domain for MX delivery ([[tls_policy]] tables)"
    )
    queue: QueueSection = Field(default_factory=QueueSection, description="Retries, delay notices, bounces")
    dnscheck: DnsCheckSection = Field(default_factory=DnsCheckSection, description="DNS health check")
    submission: SubmissionSection | None = Field(None, description="Authenticated submission (RFC 6409)")
    pop3: Pop3Section | None = Field(None, description="POP3 access to mailboxes")
    imap: ImapSection | None = Field(None, description="IMAP access to mailboxes")
    sieve: SieveSection = Field(default_factory=SieveSection, description="Users' Sieve filters at local delivery")
    managesieve: ManageSieveSection | None = Field(None, description="ManageSieve (RFC 5804): users edit their filters")
    mailbox_index: MailboxIndexSection = Field(
        default_factory=MailboxIndexSection, description="The per-folder cache files IMAP answers from",
    )
    balancer: BalancerSection | None = Field(None, description="Virtual addresses in front of real servers")
    maintenance: list[MaintenanceJob] = Field(default_factory=list, description="Scheduled queue maintenance ([[maintenance]] tables)")
    records: RecordsSection = Field(default_factory=RecordsSection, description="Event log and history retention")
    cluster: ClusterSection | None = Field(
        None, description="Apply the configuration pushed to the shared records' database (docs/cluster.md)")
    log: LogSection = Field(default_factory=LogSection, description="Log lines: own file, syslog, rotation")
    metrics: MetricsSection = Field(default_factory=MetricsSection, description="Prometheus metrics endpoint")
    alerts: AlertsSection = Field(default_factory=AlertsSection, description="Alert mail to the administrator")
    ip_policy: list[IpPolicySection] = Field(
        default_factory=list, description="Session profile by client network, first match wins ([[ip_policy]] tables)"
    )
    session_profile: list[SessionProfileSection] = Field(
        default_factory=list, description="Named limits and checks for SMTP clients ([[session_profile]] tables)"
    )
    dnsbl: list[DnsblSection] = Field(default_factory=list, description="DNS blocklists asked about clients ([[dnsbl]] tables)")
    dnsbl_allowlist: DnsblAllowlistSection = Field(
        default_factory=DnsblAllowlistSection, description="Clients never looked up in a DNS blocklist"
    )
    recipient_policy: list[RecipientPolicySection] = Field(
        default_factory=list, description="Profiles by direction, sender and recipient ([[recipient_policy]] tables)"
    )
    dkim: list[DkimSection] = Field(default_factory=list, description="DKIM signing keys of our domains ([[dkim]] tables)")
    content_profile: list[ContentProfileSection] = Field(
        default_factory=list, description="Content rules and attachment policies ([[content_profile]] tables, docs/content.md)"
    )
    quarantine: QuarantineSection = Field(default_factory=QuarantineSection, description="Quarantine retention and digests")
    antivirus: AntivirusSection = Field(default_factory=AntivirusSection, description="Virus scanning with clamd")
    spam: SpamSection = Field(default_factory=SpamSection, description="Spam scoring with Rspamd")
    archive: ArchiveSection = Field(default_factory=ArchiveSection, description="A copy of every message (journaling)")
    console: ConsoleSection | None = Field(None, description="The web console and HTTP API (docs/console.md); unset: off")

    @model_validator(mode="after")
    def _cluster_needs_shared_records(self) -> Config:
        if self.cluster is not None and not self.records.url:
            raise ValueError("cluster: needs [records] url (the database the configuration is pushed to)")
        return self

    @model_validator(mode="after")
    def _unique_domains(self) -> Config:
        seen: set[str] = set()
        for d in self.domain:
            if d.name in seen:
                raise ValueError(f"domain {d.name!r} is listed twice")
            seen.add(d.name)
        names = [job.name for job in self.maintenance if job.name]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"maintenance job name {name!r} is used twice")
        profiles = [p.name for p in self.session_profile]
        for i, name in enumerate(profiles):
            if name in profiles[:i]:
                raise ValueError(f"session_profile[{i}].name: profile {name!r} is defined twice")
        known = set(profiles) | set(BUILTIN_PROFILES)
        for i, pol in enumerate(self.ip_policy):
            if pol.profile not in known:
                raise ValueError(f"ip_policy[{i}].profile: no session profile named {pol.profile!r}")
        for i, rpol in enumerate(self.recipient_policy):
            if rpol.session_profile is not None and rpol.session_profile not in known:
                raise ValueError(f"recipient_policy[{i}].session_profile: no session profile named {rpol.session_profile!r}")
        tls_domains = [t.domain for t in self.tls_policy]
        for i, name in enumerate(tls_domains):
            if name in tls_domains[:i]:
                raise ValueError(f"tls_policy[{i}].domain: {name!r} is listed twice")
        contents = [p.name for p in self.content_profile]
        for i, name in enumerate(contents):
            if name in contents[:i]:
                raise ValueError(f"content_profile[{i}].name: profile {name!r} is defined twice")
        for i, ipol in enumerate(self.ip_policy):
            if ipol.content_profile is not None and ipol.content_profile not in contents:
                raise ValueError(f"ip_policy[{i}].content_profile: no content profile named {ipol.content_profile!r}")
        for i, rpol in enumerate(self.recipient_policy):
            if rpol.content_profile is not None and rpol.content_profile not in contents:
                raise ValueError(f"recipient_policy[{i}].content_profile: no content profile named {rpol.content_profile!r}")
        zones = [z.zone for z in self.dnsbl]
        for i, zone in enumerate(zones):
            if zone in zones[:i]:
                raise ValueError(f"dnsbl[{i}].zone: zone {zone!r} is listed twice")
        for name, prof in self.session_profiles.items():
            if prof.greylist_delay >= prof.greylist_window:
                raise ValueError(f"session_profile {name!r}: greylist_delay must be shorter than greylist_window")
        self._check_dkim()
        return self

    def _check_dkim(self) -> None:
        """One entry per selector of a domain, and at most one active key per domain and
        algorithm (two active keys of different algorithms sign twice, RFC 8463 8)."""
        seen: set[tuple[str, str]] = set()
        active: dict[tuple[str, str], int] = {}
        for i, d in enumerate(self.dkim):
            if (d.domain, d.selector) in seen:
                raise ValueError(f"dkim[{i}].selector: selector {d.selector!r} of {d.domain} is listed twice")
            seen.add((d.domain, d.selector))
            if d.active:
                if (d.domain, d.algorithm) in active:
                    j = active[(d.domain, d.algorithm)]
                    raise ValueError(
                        f"dkim[{i}].active: {d.domain} already has an active {d.algorithm} key (dkim[{j}], selector "
                        f"{self.dkim[j].selector!r}); set active = false on the one that is not signing yet"
                    )
                active[(d.domain, d.algorithm)] = i

    def dkim_key_path(self, entry: DkimSection) -> Path:
        """Where a [[dkim]] entry's private key is: its key, else the file keygen writes."""
        if entry.key is not None:
            return entry.key
        return dkim_default_key_path(self.server.data_dir, entry.domain, entry.selector)

    @functools.cached_property
    def session_profiles(self) -> dict[str, SessionProfile]:
        """Every profile by name, resolved: the built-in "default" and "trusted" and each
        [[session_profile]]. A value comes from the block, else from the [smtp] key of the
        same name, else from the built-in profile ("trusted" for trusted, else "default")."""
        smtp = self.smtp
        from_smtp = {
            "max_connections_per_ip": smtp.max_connections_per_ip,
            "max_recipients": smtp.max_recipients,
            "max_message_size": smtp.max_message_size,
            "max_errors": smtp.max_errors,
            "greet_pause": smtp.greet_pause,
            "idle_timeout": smtp.command_timeout,
        }
        blocks = {p.name: p for p in self.session_profile}
        out: dict[str, SessionProfile] = {}
        for name in (*BUILTIN_PROFILES, *(n for n in blocks if n not in BUILTIN_PROFILES)):
            values = {**from_smtp, **(_TRUSTED_PROFILE if name == "trusted" else _DEFAULT_PROFILE)}
            block = blocks.get(name)
            if block is not None:
                values.update(block.model_dump(exclude_none=True, exclude={"name"}))
            out[name] = SessionProfile(name=name, **values)
        return out

    def warnings(self) -> list[str]:
        """What is valid but probably not meant (`kanmon config check` prints these)."""
        out = []
        for i, d in enumerate(self.domain):
            if d.deliver == "relay" and d.verify == "none" and (d.mailboxes or d.aliases):
                out.append(
                    f"domain[{i}] ({d.name}): mailboxes/aliases of a relay domain are used only with verify = \"list\";"
                    " with verify = \"none\" any recipient is accepted (and unknown ones bounce later)"
                )
        return out

    def find_domain(self, name: str) -> DomainSection | None:
        name = name.lower().rstrip(".")
        for d in self.domain:
            if d.name == name:
                return d
        return None


def dkim_default_key_path(data_dir: Path, domain: str, selector: str) -> Path:
    """`kanmon dkim keygen`'s default file: <data_dir>/dkim/<domain>.<selector>.key."""
    return Path(data_dir) / "dkim" / f"{domain}.{selector}.key"


# ---------------------------------------------------------------------------
# Loading


class ConfigError(Exception):
    """A configuration that cannot be used; str() names the key (and line)."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "list[", "tuple[", "json-or")):
            continue  # pydantic's internal validator names
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_SCALAR = re.compile(r"[^,\]}\r\n#]+")  # a number, boolean or date-time: up to what ends it


def _toml_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Where each thing of a (valid) TOML text is written: its path as pydantic names it
    (("content_profile", 0, "rule", 5, "action"), ("smtp", "listen", 1)) -> line number.

    A key is at the line of its `key =`; an array element at the line where it starts;
    a table at the line of its header ([x], [[x]]; a table that only dotted keys make, at
    their first line). Each [[a.b]] is counted under the element of [[a]] it follows.
    """
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    lines: dict[tuple[Any, ...], int] = {}
    arrays: dict[tuple[Any, ...], int] = {}  # [[header]] path (with the indices above it) -> tables so far
    n = len(text)

    def line_at(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    def blank(pos: int, newline: bool = True) -> int:
        while pos < n:
            c = text[pos]
            if c in " \t" or (newline and c in "\r\n"):
                pos += 1
            elif c == "#":
                while pos < n and text[pos] != "\n":
                    pos += 1
            else:
                break
        return pos

    def string(pos: int) -> int:
        """The end of the string at pos."""
        q = text[pos]
        if text.startswith(q * 3, pos):
            i = pos + 3
            while not text.startswith(q * 3, i):
                if i >= n:
                    raise ValueError("unterminated string")
                i += 2 if q == '"' and text[i] == "\\" else 1
            end = i + 3
            while end < n and end < i + 5 and text[end] == q:  # up to two quotes end the content
                end += 1
            return end
        i = pos + 1
        while text[i] != q:
            i += 2 if q == '"' and text[i] == "\\" else 1
        return i + 1

    def key(pos: int) -> tuple[tuple[str, ...], int]:
        parts: list[str] = []
        while True:
            pos = blank(pos, newline=False)
            if text[pos] in "\"'":
                end = string(pos)
                parts.append(tomllib.loads("k = " + text[pos:end])["k"])  # escapes decoded as TOML does
                pos = end
            else:
                m = _TOML_BARE_KEY.match(text, pos)
                if not m:
                    raise ValueError(f"no key at {pos}")
                parts.append(m.group())
                pos = m.end()
            pos = blank(pos, newline=False)
            if text[pos] != ".":
                return tuple(parts), pos
            pos += 1

    def value(pos: int, path: tuple[Any, ...]) -> int:
        c = text[pos]
        if c in "\"'":
            return string(pos)
        if c == "[":
            pos, i = blank(pos + 1), 0
            while text[pos] != "]":
                lines[path + (i,)] = line_at(pos)
                pos = blank(value(pos, path + (i,)))
                if text[pos] == ",":
                    pos = blank(pos + 1)
                i += 1
            return pos + 1
        if c == "{":
            pos = blank(pos + 1)
            while text[pos] != "}":
                pos = blank(key_value(pos, path))
                if text[pos] == ",":
                    pos = blank(pos + 1)
            return pos + 1
        m = _TOML_SCALAR.match(text, pos)
        if not m:
            raise ValueError(f"no value at {pos}")
        return m.end()

    def key_value(pos: int, table: tuple[Any, ...]) -> int:
        line = line_at(pos)
        parts, pos = key(pos)
        for k in range(1, len(parts) + 1):
            lines.setdefault(table + parts[:k], line)
        if text[pos] != "=":
            raise ValueError(f"no = at {pos}")
        return value(blank(pos + 1, newline=False), table + parts)

    def header(parts: tuple[str, ...], line: int, array: bool) -> tuple[Any, ...]:
        path: tuple[Any, ...] = ()
        for k, part in enumerate(parts):
            path += (part,)
            last = k == len(parts) - 1
            if last and array:
                lines.setdefault(path, line)
                arrays[path] = arrays.get(path, 0) + 1
                path += (arrays[path] - 1,)
            elif path in arrays:  # [a.b] or [[a.b]] after [[a]]: in a's last element
                path += (arrays[path] - 1,)
            if last:
                lines[path] = line
            else:
                lines.setdefault(path, line)
        return path

    table: tuple[Any, ...] = ()
    pos = blank(0)
    while pos < n:
        if text[pos] == "[":
            array = text.startswith("[[", pos)
            line = line_at(pos)
            parts, pos = key(pos + (2 if array else 1))
            close = "]]" if array else "]"
            if not text.startswith(close, pos):
                raise ValueError(f"no {close} at {pos}")
            pos += len(close)
            table = header(parts, line, array)
        else:
            pos = key_value(pos, table)
        pos = blank(pos)
    return lines


def _is_pydantic_tag(part: str) -> bool:
    """A name pydantic puts in an error's location that is not a key: the member of a union
    (`TextMatch`, `list[str]`, `str`), a validator (`function-after[...]`)."""
    return "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "none")


def _line_of(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """The line of the innermost part of loc that is written in the text: the key itself, or
    for a key that is missing the table it is missing from. None when not even the
    outermost part is written (nothing to point at)."""
    path: tuple[Any, ...] = ()
    found = None
    for part in loc:
        if path + (part,) in lines:
            path += (part,)
            found = lines[path]
        elif not (isinstance(part, str) and _is_pydantic_tag(part)):
            break
    return found


def balance_only(config: Config) -> bool:
    """A config with [balancer] and neither [smtp] nor a [[domain]] is a node that only
    balances (docs/balancer.md, step 2): no SMTP listener, no mail roles."""
    return config.balancer is not None and "smtp" not in config.model_fields_set and not config.domain


def toml_line_finder(text: str) -> Callable[[tuple[Any, ...]], int | None]:
    """loc -> the line of `text` where the key pydantic names by loc is written (or the
    table it is missing from); None when the text does not hold it."""
    try:
        lines = _toml_lines(text)
    except (IndexError, ValueError, RecursionError):  # tomllib read it: a case the scanner does not know
        lines = {}
    return lambda loc: _line_of(lines, loc)


def parse_config(text: str, source: str = "<config>",
                 line_of: Callable[[tuple[Any, ...]], int | None] | None = None) -> Config:
    """Parse and validate TOML text; raise ConfigError naming every bad key. line_of: where
    an error's key is written, when `text` was made from another file (a cluster's file
    with a node's overlay, kanmon.clusterconfig); by default, its line in `text`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        if line_of is None:
            line_of = toml_line_finder(text)
        messages = []
        for err in e.errors():
            loc = err["loc"]
            where = _loc_text(loc)
            line = line_of(loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            at = f" (line {line})" if line else ""
            if where == "(top level)" and re.match(r"^[a-z_]+\[\d+\]\.[a-z_]+: ", msg):
                where, msg = msg.split(": ", 1)  # a check across sections names its key itself
            messages.append(f"{source}: {where}{at}: {msg}")
        raise ConfigError(messages) from None


def load_config(path: str | Path | None) -> Config:
    """The config at path, or the embedded default when path is None."""
    if path is None:
        return parse_config(default_config_text(), "<embedded default>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    return parse_config(text, str(p))


def default_config_text() -> str:
    return resources.files("kanmon").joinpath("default.toml").read_text(encoding="utf-8")


def example_config_text() -> str:
    return resources.files("kanmon").joinpath("example.toml").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# Reference documentation, generated from the models above.


_KIND_OF_PARSER = {parse_duration: "duration", parse_size: "size", parse_hostport: "ip:port", parse_network: "CIDR",
                   _check_regex: "regex", _check_size_bound: "size comparison", _check_count_bound: "count comparison"}
_PLAIN_TYPES = {str: "text", int: "integer", float: "number", bool: "true | false", Path: "path"}


def _kind(annotation: Any, metadata: list[Any] = ()) -> str:
    """How the reference names a value's type: duration, size, ip:port, CIDR, text,
    integer, `local | relay` for choices, "list of ...", "... (optional)"."""
    for m in [*metadata, *getattr(annotation, "__metadata__", ())]:
        kind = _KIND_OF_PARSER.get(getattr(m, "func", None))
        if kind:
            return kind
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _kind(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_kind(a) for a in rest)
        return f"{text} (optional)" if len(rest) < len(args) else text
    if origin is list:
        return f"list of {_kind(args[0])}"
    if origin is dict:
        return f"table: {_kind(args[0])} -> {_kind(args[1])}"
    return _PLAIN_TYPES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def format_duration_setting(seconds: float) -> str:
    """A duration as the config writes it: 300.0 -> '5m', 0.5 -> '500ms', 0 -> '0'."""
    if seconds == 0:
        return "0"
    for unit in ("w", "d", "h", "m", "s", "ms"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{round(n)}{unit}"
    return f"{seconds}s"


def format_size_setting(n: int) -> str:
    """A size as the config writes it: 50000000 -> '50MB', 1048576 -> '1MiB', 100 -> '100B'."""
    for unit in ("TB", "TiB", "GB", "GiB", "MB", "MiB", "KB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def _setting_text(value: Any, kind: str) -> str:
    """A default value in the config's own syntax (TOML, durations and sizes as written)."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) and kind.startswith(("list of", "ip:port")) and not (
        kind.startswith("ip:port") and len(value) == 2 and isinstance(value[1], int)
    ):
        inner = kind.removeprefix("list of ")
        return "[" + ", ".join(_setting_text(v, inner) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_setting_text(v, '')}" for k, v in value.items()) + "}"
    if kind.startswith("duration"):
        return f'"{format_duration_setting(value)}"'
    if kind.startswith("size"):
        return f'"{format_size_setting(value)}"'
    if kind.startswith("ip:port"):
        host, port = value
        return f'"[{host}]:{port}"' if ":" in host else f'"{host}:{port}"'
    if isinstance(value, (str, Path, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return f'"{value}"'
    return str(value)


def _cell(text: str) -> str:
    """Markdown table cell text: a `|` would end the cell."""
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """docs/configuration.md's key table, made from the models (a test keeps them equal)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `kanmon/config.py` by `kanmon config reference`; a test checks that this",
        "file matches the code. Durations: `30s`, `5m`, `4h`, `3d`. Sizes: `512KB`, `50MB`, `1GB`",
        "(`KiB`/`MiB`/`GiB` for powers of two). Endpoints: `ip:port` or `[ipv6]:port`.",
        "",
        "Size units are decimal: `KB` is 1000 bytes, `MB` 1000 KB, `GB` 1000 MB; `KiB`, `MiB`",
        "and `GiB` are 1024 bytes, 1024 KiB and 1024 MiB (case does not matter; a bare number is",
        "bytes). FortiMail's limits are binary, though its GUI writes them KB: its 10240 KB",
        "message size limit is `10MiB` (10,485,760 bytes) and a 32 KB header limit is `32KiB`.",
        "Copying such a limit from FortiMail, write `KiB`/`MiB`: `10MB` would be 10,000,000 bytes,",
        "and a message FortiMail took could be refused here.",
        "",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        subsections = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = getattr(ann, "__args__", None)
            sub = None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                sub = ann
            elif inner:
                for a in inner:
                    if isinstance(a, type) and issubclass(a, BaseModel):
                        sub = a
                    elif getattr(a, "__args__", None):
                        for b in a.__args__:
                            if isinstance(b, type) and issubclass(b, BaseModel):
                                sub = b
            if sub is not None:
                is_list = "list[" in repr(ann)
                subsections.append((name, sub, is_list, field.description or ""))
                continue
            kind = _kind(ann, field.metadata)
            if field.is_required():
                default = "(required)"
            elif field.default_factory is not None:
                default = _setting_text(field.default_factory(), kind)
            else:
                default = _setting_text(field.default, kind)
            rows.append(f"| `{field.alias or name}` | {_cell(kind)} | `{_cell(default)}` | {_cell(field.description or '')} |")
        if rows:
            lines.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for name, sub, is_list, desc in subsections:
            full = f"{prefix}.{name}" if prefix else name
            header = f"[[{full}]]" if is_list else f"[{full}]"
            lines.extend([f"## `{header}`", "", desc, ""])
            walk(sub, full)

    walk(Config, "")
    return "\n".join(lines).rstrip() + "\n"
