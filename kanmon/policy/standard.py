"""The standard checks, in order: what every kanmon listener asks before accepting mail.

Role: assemble the pipeline from the config (the composition roots kanmon.node and
kanmon.receiver call this, and pass in the I/O the checks must not import themselves).
Never: import a store or spool module (the usage function is passed in).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kanmon.config import Config
from kanmon.policy.access import LocalRecipientsCheck, RelayAccess, RelayAccessCheck
from kanmon.policy.authcheck import auth_checks
from kanmon.policy.client import ClientIdentityCheck
from kanmon.policy.content import ArchiveCopyCheck, ContentCheck
from kanmon.policy.scanners import ScannerCheck
from kanmon.policy.disk import FreeDiskCheck
from kanmon.policy.dnsbl import DnsblCheck
from kanmon.policy.limits import rate_checks
from kanmon.policy.dns import CheckResolver
from kanmon.policy.fromheader import FromHeaderCheck
from kanmon.policy.greylist import GreylistCheck
from kanmon.policy.helo import HeloResolvableCheck, HeloSyntaxCheck, OwnHeloCheck
from kanmon.policy.loop import LoopCheck
from kanmon.policy.pipeline import Check, Pipeline
from kanmon.policy.quota import QuotaCheck
from kanmon.policy.sender import SenderDomainCheck, SenderSpoofCheck
from kanmon.policy.verify import RecipientVerifyCheck
from kanmon.state.api import SharedState
from kanmon.userdb import Directory


def standard_checks(
    config: Config, *, quota_usage: Callable[[str, str], int] | None = None,
    free_disk: Callable[[], int] | None = None, state: SharedState | None = None,
    resolver: CheckResolver | None = None, directory: Directory | None = None,
    clock: Callable[[], float] | None = None,
) -> list[Check]:
    """quota_usage(domain, local) -> bytes (blocking); needed when a domain has a quota.
    free_disk() -> free bytes in data_dir (blocking); statvfs by default.
    state: the counters, caches and greylist shared by the receivers (kanmon.state.api);
    resolver: the checks' cached DNS. The composition roots always pass both; a
    pipeline built for a test that drives a session with bytes may omit them, and then
    has no DNS checks (client_ptr, sender_domain, helo_resolvable); a configured DNSBL
    without a resolver is a ValueError here, at build time.
    directory: mailboxes and aliases of the config and the users file (one is made when
    not given).
    clock: epoch seconds for the greylist, the verification cache and the rate counters
    (time.time by default; tests advance their own).

    DNSBL, greylisting and sender authentication are in the list only when configured (a
    [[dnsbl]] zone; a profile with greylist = true; a profile with spf, dkim or dmarc not
    "off"), so the accept path of a node without them is unchanged."""
    access = RelayAccess(config, directory)
    checks: list[Check] = [FreeDiskCheck(config, free_disk)]
    # Rate limits first: every request counts, whatever the later checks say.
    checks += rate_checks(config.session_profiles.values(), state, clock or time.time)
    checks += [RelayAccessCheck(access), LocalRecipientsCheck(access)]
    # HELO, client and sender checks decide at MAIL, cheapest first; client_ptr also
    # starts each client's lookup at connect and gives the Received: header its name.
    checks += [HeloSyntaxCheck(config), OwnHeloCheck(access)]
    if resolver is not None:
        checks += [ClientIdentityCheck(config, resolver, access), HeloResolvableCheck(config, resolver)]
    checks.append(SenderSpoofCheck(access))
    if config.submission is not None and config.submission.from_header != "any":  # authenticated users only
        checks.append(FromHeaderCheck(access, config.submission.from_header))
    auth = auth_checks(config, resolver, access) if resolver is not None else []
    if resolver is not None:
        checks.append(SenderDomainCheck(config, resolver))
        checks += [c for c in auth if hasattr(c, "mail")]  # SPF, after the cheaper sender checks
    if config.dnsbl and any(p.dnsbl_threshold > 0 for p in config.session_profiles.values()):
        if resolver is None:
            raise ValueError("[[dnsbl]] zones are configured: the DNSBL check needs a resolver")
        checks.append(DnsblCheck(config, resolver))
    if any(d.deliver == "relay" and d.verify != "none" for d in config.domain):
        checks.append(RecipientVerifyCheck(config, state=state, **({"clock": clock} if clock is not None else {})))
    if any(d.quota is not None for d in config.domain):
        if quota_usage is None:
            raise ValueError("a domain has a quota: the quota check needs a usage function")
        checks.append(QuotaCheck(config, quota_usage, access.directory.is_mailbox))
    checks.append(LoopCheck())
    checks += [c for c in auth if not hasattr(c, "mail")]  # DKIM, ARC, DMARC at the end of DATA
    if any(p.greylist for p in config.session_profiles.values()):
        # Last at RCPT: a recipient another check refuses is never greylisted first.
        if state is None:
            raise ValueError("a session profile greylists: the greylist check needs the shared state")
        checks.append(GreylistCheck(config, state, **({"clock": clock} if clock is not None else {})))
    # At the end of DATA, after every envelope check has passed: the scanners, then the
    # content rules (a virus decides before any rule).
    if config.antivirus.clamd or config.spam.rspamd:
        checks.append(ScannerCheck(config, access))
    if config.content_profile:
        checks.append(ContentCheck(config, access))
    if config.archive.to is not None:
        checks.append(ArchiveCopyCheck(config, access))
    return checks


def standard_pipeline(config: Config, **io: Any) -> Pipeline:
    """The standard checks, with each session profile's hook list made now (the hooks a
    profile switches off are not asked for its clients; a reload builds a new pipeline)."""
    return Pipeline(standard_checks(config, **io), config.session_profiles.values())


def relay_access(pipeline: Pipeline) -> RelayAccess | None:
    """The access tables the pipeline's relay checks use (None: a pipeline without them),
    for the listener's own questions (relay clients skip the pregreet test; the senders
    an authenticated user may use) to be answered from the same tables."""
    for check in pipeline.checks:
        if isinstance(check, (RelayAccessCheck, LocalRecipientsCheck)):
            return check.access
    return None
