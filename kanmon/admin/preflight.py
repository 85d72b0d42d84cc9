"""What `kanmon config check` looks at beyond the models: what `kanmon serve` will hit.

Role: given a validated Config (and, when there is one, the raw TOML it came from),
find what would make `kanmon serve` fail or misbehave on this host: listen addresses
that cannot be bound (unless the running node for this data_dir already holds them),
the same address in two sections, a certificate that does not match its key or has
expired, mailbox and alias names that collide case-insensitively, CIDRs written with
host bits set, files the service cannot read and a data_dir it cannot create.

Each finding names the key. Severity: "error" (serve would fail, or mail would go
wrong), "warning" (works, but probably not what was meant), "note" (said for clarity).

Trusts: the Config (already validated). Never: keep a socket bound (each test bind is
closed at once, nothing listens), create or change a file, or print anything (the
command does).
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import pwd
import re
import socket
import ssl
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kanmon.config import Config, balance_only, format_duration_setting


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | note
    key: str  # the config key it is about, e.g. "smtp.listen[0]"
    text: str

    def as_dict(self) -> dict:
        return asdict(self)


def model_warning(text: str) -> Finding:
    """A Config.warnings() line, "domain[0] (corp.example): ...", as a finding on its key."""
    m = re.match(r"^(\S+) \(([^)]*)\): (.*)$", text, re.S)
    if m:
        return Finding("warning", m.group(1), f"{m.group(2)}: {m.group(3)}")
    return Finding("warning", "(config)", text)


def exit_code(findings: Iterable[Finding]) -> int:
    """0: nothing to fix (notes only), 1: warnings only, 2: at least one error."""
    severities = {f.severity for f in findings}
    return 2 if "error" in severities else 1 if "warning" in severities else 0


def listeners(config: Config) -> list[tuple[str, tuple[str, int]]]:
    """(key, (host, port)) of every address kanmon serve listens on (a node that only
    balances has no SMTP listener: config.balance_only)."""
    out: list[tuple[str, tuple[str, int]]] = [] if balance_only(config) else [
        (f"smtp.listen[{i}]", a) for i, a in enumerate(config.smtp.listen)]
    for name in ("submission", "pop3", "imap", "managesieve"):
        section = getattr(config, name)
        if section is not None:
            for field in ("listen", "listen_tls"):
                out += [(f"{name}.{field}[{i}]", a) for i, a in enumerate(getattr(section, field))]
    if config.metrics.listen is not None:
        out.append(("metrics.listen", config.metrics.listen))
    if config.console is not None:
        out.append(("console.listen", config.console.listen))
    if config.balancer is not None:
        out += [(f"balancer.virtual_server[{i}].listen", vs.listen)
                for i, vs in enumerate(config.balancer.virtual_server)]
    return out


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family_and_wildcard(host: str) -> tuple[int | None, bool]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None, False
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), ip.is_unspecified


def check_duplicates(config: Config) -> list[Finding]:
    """The same address (or a wildcard and an address on the same port) in two places."""
    found = []
    seen: list[tuple[str, tuple[str, int]]] = []
    for key, addr in listeners(config):
        fam, wild = _family_and_wildcard(addr[0])
        for other_key, other in seen:
            if other[1] != addr[1]:
                continue
            ofam, owild = _family_and_wildcard(other[0])
            if other[0].lower() == addr[0].lower():
                found.append(Finding("error", key, f"{_text(addr)} is also {other_key}: one address, one listener"))
                break
            if fam is not None and fam == ofam and (wild or owild):
                found.append(Finding("error", key, f"{_text(addr)} overlaps {other_key} ({_text(other)}): "
                                                   "a wildcard address takes the port on every address"))
                break
        seen.append((key, addr))
    return found


def check_bindable(config: Config, ours: set[tuple[str, int]] | None = None) -> list[Finding]:
    """Bind (and close at once) each listen address; ours: addresses the running node
    for this data_dir holds, which are fine though busy."""
    ours = ours or set()
    found = []
    for key, addr in listeners(config):
        host, port = addr
        if (host, port) in ours:
            found.append(Finding("note", key, f"{_text(addr)} is held by the running kanmon"))
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            found.append(Finding("error", key, f"{host!r} does not resolve: {e.strerror}"))
            continue
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            sock.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                found.append(Finding("error", key, f"{_text(addr)} is in use by another program"
                                                   + (" (not by a running kanmon for this data_dir)" if not ours else "")))
            elif e.errno in (errno.EACCES, errno.EPERM):
                found.append(Finding("warning", key, f"{_text(addr)}: this user (uid {os.geteuid()}) may not bind it; "
                                                     "kanmon serve needs root or CAP_NET_BIND_SERVICE for ports below 1024"))
            elif e.errno == errno.EADDRNOTAVAIL:
                found.append(Finding("error", key, f"{_text(addr)}: {host} is not an address of this host"))
            else:
                found.append(Finding("error", key, f"{_text(addr)}: cannot bind: {e.strerror}"))
        finally:
            sock.close()
    return found


def check_certificate(config: Config, now: float | None = None) -> list[Finding]:
    """[tls] cert and key: readable, the same pair, and not expired (or expiring soon)."""
    if config.tls is None:
        speaks_tls = (config.console is not None and config.console.tls) or any(
            getattr(config, name) is not None for name in ("submission", "pop3", "imap", "managesieve"))
        if balance_only(config) and not speaks_tls:
            return []  # nothing of it speaks TLS (the balancer copies bytes, STARTTLS included)
        return [Finding("note", "tls", "no [tls]: kanmon serve uses a self-signed certificate in data_dir/tls")]
    cert, key = config.tls.cert, config.tls.key
    found = []
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        reason = "the key does not belong to the certificate" if "mismatch" in str(e).lower() else str(e)
        return [Finding("error", "tls.key", f"{key} and {cert}: {reason}")]
    except OSError as e:
        return [Finding("error", "tls.cert", f"{cert} or {key}: {e.strerror or e}")]
    from cryptography import x509  # noqa: PLC0415 - only with a [tls] section

    try:
        first = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (ValueError, OSError) as e:
        return [Finding("error", "tls.cert", f"{cert}: not a PEM certificate: {e}")]
    now_dt = dt.datetime.fromtimestamp(dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now,
                                       dt.timezone.utc)
    expires = first.not_valid_after_utc
    left = (expires - now_dt).total_seconds()
    if left <= 0:
        found.append(Finding("error", "tls.cert", f"{cert} expired on {expires:%Y-%m-%d %H:%M} UTC"))
    elif left < config.alerts.cert_expires_within:
        found.append(Finding("warning", "tls.cert", f"{cert} expires on {expires:%Y-%m-%d %H:%M} UTC, within "
                                                    f"alerts.cert_expires_within ({format_duration_setting(config.alerts.cert_expires_within)})"))
    if first.not_valid_before_utc > now_dt:
        found.append(Finding("error", "tls.cert", f"{cert} is not valid before {first.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"))
    return found


def check_names(config: Config) -> list[Finding]:
    """Mailboxes and aliases of one domain whose names differ only in case (one mailbox
    on disk, one address on the wire: RFC 5321 local parts are ours to fold, and we do)."""
    found = []
    for i, d in enumerate(config.domain):
        seen: dict[str, str] = {}
        for lp in d.mailboxes:  # already folded to lower case by the model
            if lp in seen:
                found.append(Finding("error", f"domain[{i}].mailboxes",
                                     f"{d.name}: mailbox {lp!r} is listed twice (names are case-insensitive)"))
            seen[lp] = "mailbox"
        aliases: dict[str, str] = {}
        for alias in d.aliases:
            folded = alias.lower()
            if folded in aliases:
                found.append(Finding("error", f"domain[{i}].aliases",
                                     f"{d.name}: aliases {aliases[folded]!r} and {alias!r} are one address "
                                     "(names are case-insensitive); merge them"))
            aliases[folded] = alias
    found += check_alias_targets(config)
    return found


def check_alias_targets(config: Config) -> list[Finding]:
    """An alias of the config whose target is an address of a local domain that is
    neither a mailbox nor an alias (of the config or the users file): RCPT accepts mail
    for the alias, and delivery then bounces it (550 5.1.1), to a sender outside."""
    from kanmon.userdb import quiet_directory  # noqa: PLC0415 - reads the users file: only here

    directory = quiet_directory(config)
    found = []
    for i, d in enumerate(config.domain):
        for alias, targets in d.aliases.items():
            for target in targets:
                address = target if "@" in target else f"{target}@{d.name}"
                if directory.is_unknown_local(address):
                    found.append(Finding("warning", f"domain[{i}].aliases",
                                         f"{d.name}: alias {alias!r} -> {address}: not a mailbox or alias of a local "
                                         "domain (mail to the alias is accepted, then bounced)"))
    return found


def _network_keys(raw: Any, prefix: str) -> Iterable[tuple[str, str]]:
    """(key, value) of every CIDR written in the raw TOML (relay_networks, trusted_proxies...)."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            key = f"{prefix}.{k}" if prefix else k
            if k in ("relay_networks", "trusted_proxies", "health_check_clients", "networks", "clients") \
                    and isinstance(v, list):
                for n, item in enumerate(v):
                    if isinstance(item, str) and "/" in item:
                        yield f"{key}[{n}]", item
            else:
                yield from _network_keys(v, key)
    elif isinstance(raw, list):
        for n, item in enumerate(raw):
            yield from _network_keys(item, f"{prefix}[{n}]")


def check_networks(raw: dict | None) -> list[Finding]:
    """192.0.2.5/24 means 192.0.2.0/24 to kanmon: probably not what was meant."""
    found = []
    for key, value in _network_keys(raw or {}, ""):
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError:
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                continue  # the model already refused it
            found.append(Finding("warning", key, f"{value!r} has host bits set: kanmon reads it as {net}"))
    return found


def _service_user_note(config: Config) -> Finding | None:
    me = _user_name(os.geteuid())
    wanted = getattr(config.server, "user", None)
    if wanted and wanted != me:
        try:
            pwd.getpwnam(wanted)
            exists = ""
        except KeyError:
            exists = ", which does not exist yet"
        return Finding("note", "server.user", f"files were checked as the current user {me}, not as "
                                              f"server.user = {wanted!r}{exists}")
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def service_files(config: Config) -> list[tuple[str, Path]]:
    """(key, path) of every file kanmon serve reads (besides its config and data_dir)."""
    files = []
    if config.tls is not None:
        files += [("tls.cert", config.tls.cert), ("tls.key", config.tls.key)]
    if config.outbound.ca_file is not None:
        files.append(("outbound.ca_file", config.outbound.ca_file))
    if config.dnscheck.dkim_key is not None:
        files.append(("dnscheck.dkim_key", config.dnscheck.dkim_key))
    files += [(f"dkim[{i}].key", config.dkim_key_path(d)) for i, d in enumerate(config.dkim) if d.active]
    files += [(f"domain[{i}].recipients_file", d.recipients_file)
              for i, d in enumerate(config.domain) if d.recipients_file is not None]
    if config.records.password_file is not None:  # read by every process that reaches PostgreSQL
        files.append(("records.password_file", config.records.password_file))
    return [(key, Path(path)) for key, path in files]


def check_files(config: Config) -> list[Finding]:
    """Files kanmon serve reads, and data_dir, checked with the current user's rights."""
    found = []
    for key, path in service_files(config):
        try:
            exists = Path(path).exists()
        except OSError as e:  # a directory on the way it cannot search
            found.append(Finding("error", key, f"{path} cannot be reached by {_user_name(os.geteuid())}: "
                                               f"{e.strerror or e}"))
            continue
        if not exists:
            found.append(Finding("error", key, f"{path} does not exist"))
        elif not os.access(path, os.R_OK):
            found.append(Finding("error", key, f"{path} is not readable by {_user_name(os.geteuid())}"))
    data_dir = Path(config.server.data_dir)
    if data_dir.exists():
        if not data_dir.is_dir():
            found.append(Finding("error", "server.data_dir", f"{data_dir} is not a directory"))
        elif not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
            found.append(Finding("error", "server.data_dir", f"{data_dir} is not writable by {_user_name(os.geteuid())}"))
    else:
        parent = next((p for p in data_dir.absolute().parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            found.append(Finding("note", "server.data_dir", f"{data_dir} does not exist yet; kanmon serve creates it"))
        else:
            found.append(Finding("warning", "server.data_dir", f"{data_dir} does not exist and "
                                                               f"{_user_name(os.geteuid())} cannot create it in {parent}"))
    note = _service_user_note(config)
    if note is not None:
        found.append(note)
    return found


def raw_toml(path: str | None) -> dict | None:
    """The file's TOML as written (None for the embedded default or an unreadable file)."""
    if path is None:
        return None
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def preflight(config: Config, raw: dict | None = None, ours: set[tuple[str, int]] | None = None,
              bind: bool = True) -> list[Finding]:
    """Every check above and the model's own warnings (Config.warnings()), errors first."""
    found = [*map(model_warning, config.warnings()), *check_duplicates(config)]
    if bind:
        found += check_bindable(config, ours)
    found += check_certificate(config) + check_names(config) + check_networks(raw) + check_files(config)
    order = {"error": 0, "warning": 1, "note": 2}
    return sorted(found, key=lambda f: order[f.severity])
