"""A running kanmon node: starts the roles the config asks for, in order, reloads, stops.

Role: the composition root. Order at start: data_dir and records, spool recovery (so a
crash is repaired before anything listens), the queue manager with what recovery found,
then the listeners (in this process, or in `[server] workers` receiver processes) and
the other services. Order at stop: the queue manager and background tasks end, then the
services and listeners in reverse order of start (anything accepted meanwhile is in the
spool for the next start), then records (so every event is written).

A reload (SIGHUP, or `kanmon reload` over the control socket) keeps the core — records,
spool, queue manager, admin plane — and replaces the Frontend: every listener and the
services built on them. The new Frontend is prepared completely (sockets bound or
reused, certificate loaded, accounts opened, receiver processes listening) before the
old one stops accepting (receiver processes are replaced one at a time, each old one
retiring once its replacement listens); if a step fails the old one keeps serving and the failure is an
error event (alerted). The old Frontend then retires: its sessions finish under the
settings they started with, and it stops when the last one ends.

Trusts: a Config that passed validation. Never: start a listener before recovery; leave
a task that does not belong to the node; stop anything of the running configuration
before its successor is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import ssl
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from kanmon.admin.service import LOCK_WAIT, AdminPlane, say_lock_wait
from kanmon.admin.status import config_digest
from kanmon.agent import AgentPool, agent_count
from kanmon.children import pid_alive
from kanmon.balancer.service import BalancerService
from kanmon.clock import SystemClock
from kanmon.config import Config, ConfigError, balance_only, load_config, parse_config
from kanmon.control import DataDirLock, LockBusy
from kanmon.deliver.local import LocalDelivery
from kanmon.deliver.sieving import SieveFilter
from kanmon.deliver.smtp import SmtpDelivery
from kanmon.monitoring import Monitoring
from kanmon.dnscache import DnsCache
from kanmon.queue.manager import QueueManager
from kanmon.spool.index import Entry
from kanmon.spool import recycle
from kanmon.spool.recovery import recover_index
from kanmon.queue.notices import Notices
from kanmon.queue.pickup import Pickup
from kanmon.listeners import Address, ListenSockets, Prepared
from kanmon.metrics import MetricsServer
from kanmon.records.events import (
    BALANCER_KIND, DNSCHECK_KIND, DnsblLookupFailed, Recovery, Reload, ReloadFailed, ScannerFailed, ScannerRecovered, Stopped,
)
from kanmon.records.store import Records
from kanmon.store import index as mindex
from kanmon.store.maildir import forget_indexes
from kanmon.store.users import AuthThrottle, Users
from kanmon.spool.groupcommit import GroupCommitter
from kanmon.spool.store import CORRUPT_EVENT, Spool
from kanmon.clusterconfig import ClusterWatch, starting_config
from kanmon.state.backends import open_state
from kanmon import gcpolicy, sdnotify
from kanmon.privileges import PrivilegeError, drop_privileges, make_private
from kanmon.tlscert import server_cert_paths, server_context
from kanmon.userdb import Directory, UserFile, quiet_directory, users_path

if TYPE_CHECKING:
    from kanmon.receiver import ExitedShares, ReceiverPool
    from kanmon.smtp.server import SmtpServer

# The mail and store roles' listeners (SMTP server, accept checks, receiver processes,
# POP3/IMAP/ManageSieve) are imported by Frontend building only when the config has
# them: a node that only balances does not load them (docs/performance.md, idle RSS).



def read_config(source: str | None) -> tuple[Config, str | None]:
    """The config at `source` and the text it was parsed from (None: the embedded default)."""
    if source is None:
        return load_config(None), None
    try:
        text = Path(source).read_bytes().decode("utf-8")  # as it is (line ends too): its digest is the file's
    except (OSError, UnicodeDecodeError):
        return load_config(source), None  # raises the ConfigError that names the problem
    return parse_config(text, source), text


def os_reason(e: OSError) -> str:
    """An OSError as an administrator reads it: "cannot listen on ...: Address already in
    use", without Python's "[Errno 98]" before it."""
    return e.strerror if e.errno is not None and e.strerror and e.filename is None else str(e)


STATUS_REASON_MAX = 300  # characters of a refused reload's reason in the service manager's STATUS=


class ReloadError(Exception):
    """A reload that was refused or failed: the running configuration stays."""


def listen_addresses(config: Config, mail_roles: bool) -> list[Address]:
    """Every address the Frontend of `config` listens on (the balancer's are its own)."""
    out: list[Address] = []
    if mail_roles:
        out += list(config.smtp.listen)
        if config.submission is not None:
            out += list(config.submission.listen) + list(config.submission.listen_tls)
    for section in (config.pop3, config.imap, config.managesieve):
        if section is not None:
            out += list(section.listen) + list(section.listen_tls)
    if config.metrics.listen is not None:
        out.append(tuple(config.metrics.listen))
    if config.console is not None:
        out.append(tuple(config.console.listen))
    return out


def configure_index(config: Config) -> None:
    """Where the mailboxes' IMAP cache files live ([mailbox_index] directory)."""
    data_dir = Path(config.server.data_dir)
    directory = config.mailbox_index.directory
    mindex.configure(data_dir / "mailboxes", data_dir / directory if directory is not None else None)
    forget_indexes()


def has_mail_roles(config: Config) -> bool:
    """Not a node that only balances (config.balance_only)."""
    return not balance_only(config)


class Frontend:
    """The listeners and the services on them, built from one config; replaced whole by a
    reload. Every member has start(), retire() (stop accepting, let sessions finish,
    stop) and stop()."""

    def __init__(self, config: Config):
        self.config = config
        self.services: list = []
        self.smtp: SmtpServer | None = None
        self.receivers: ReceiverPool | None = None
        self.dups: list = []  # socket duplicates handed to the services (closed if unused)
        self._started: list | None = None  # what start() started (None: start() never ran)

    async def start(self, replacing: Frontend | None = None) -> None:
        """Start every service. replacing: the Frontend a reload replaces; its receiver
        processes are replaced one at a time (ReceiverPool.start). If a service fails,
        a first start stops what started; a reload gives the old receivers back and
        leaves what started to retire() (sessions it accepted meanwhile finish)."""
        old_pool = replacing.receivers if replacing is not None else None
        self._started = []
        try:
            for service in self.services:
                if service is self.receivers:
                    self._started.append(service)  # retire() ends whatever of it started
                    await service.start(replacing=old_pool)
                else:
                    await service.start()
                    self._started.append(service)
        except BaseException:
            if replacing is not None:
                if old_pool is not None:
                    await old_pool.restore()
                raise
            for service in reversed(self._started):
                with contextlib.suppress(Exception):
                    await service.stop()
            self.close_dups()
            raise

    async def retire(self) -> None:
        services = self.services if self._started is None else self._started
        await asyncio.gather(*(s.retire() for s in services), return_exceptions=True)
        self.close_dups()

    async def stop(self) -> None:
        services = self.services if self._started is None else self._started
        for service in reversed(services):
            with contextlib.suppress(Exception):
                await service.stop()
        self.close_dups()

    def close_dups(self) -> None:
        for sock in self.dups:
            sock.close()  # a no-op for those their server closed already


class Node:
    def __init__(
        self,
        config: Config,
        *,
        echo: TextIO | None = None,
        clock=None,
        fsync: bool = True,
        auth_throttle=None,
        workers: int = 0,
        delivery_workers: int = 0,
        config_source: str | None = None,
        config_text: str | None = None,
        data_dir_lock: DataDirLock | None = None,
    ):
        """workers: SMTP receiver processes (kanmon.receiver); 0 receives in this process.
        delivery_workers: delivery agent processes (kanmon.agent); 0 delivers in this process.
        config_source: the config file the receivers load and a reload reads (None: the
        embedded default). config_text: the text `config` was parsed from (the receivers
        get a snapshot of it). data_dir_lock: <data_dir>/kanmon.lock, taken already
        (`kanmon serve`, before its event loop); None: the admin plane takes it."""
        cluster_start = None
        if config.cluster is not None:  # the pushed version this node applied last, kept on its disk
            config, config_text, cluster_start = starting_config(config, config_text)
        self.auth_throttle = auth_throttle
        self.config_text = config_text
        self._generation = 0
        self.workers = workers
        self.delivery_workers = delivery_workers
        self.agents: AgentPool | None = None
        self._draining: dict[asyncio.Task, AgentPool] = {}  # agent pools a reload replaced, finishing
        self.config_source = config_source
        self.data_dir_lock = data_dir_lock
        self.config = config
        self.echo = echo
        self.clock = clock or SystemClock()
        self.fsync = fsync
        self.data_dir = Path(config.server.data_dir)
        self.records: Records | None = None
        self.spool: Spool | None = None
        self.queue: QueueManager | None = None
        self.dns_cache: DnsCache | None = None  # the mail role's (delivery and the checks)
        self.frontend: Frontend | None = None
        self.services: list = []  # the core's services: admin plane, monitoring, balancer
        self.listen = ListenSockets()
        self.started = asyncio.Event()
        self.ready = False  # /readyz: start finished and no reload in progress
        self._tg: asyncio.TaskGroup | None = None
        self._background: dict[str, asyncio.Task] = {}
        self._retiring: dict[asyncio.Task, Frontend] = {}
        self._retiring_balancers: dict[asyncio.Task, BalancerService] = {}  # replaced by a reload, finishing
        self.cluster_watch = ClusterWatch(self, (ReloadError,), cluster_start) if config.cluster is not None else None
        self._reload_lock = asyncio.Lock()
        self._reloads_asked = 0  # reload_file calls not yet ended (a SIGHUP and `kanmon reload` may overlap)
        self._reload_seq = 0  # reload_file calls so far
        self._reload_status = ""  # STATUS= of the call asked last, once it has ended
        self._old_remotes: list[SmtpDelivery] = []
        self.balancer: BalancerService | None = None
        self._exited_shares: ExitedShares | None = None  # with receiver processes: their gauge cleanup

    def _records_failed(self, text: str, key: str = "database") -> None:
        """From a records writer thread: raise the `records` alert on the loop (or
        once monitoring has started, for a failure at start). key: "database" (this
        node's SQLite records) or "shared database" (PostgreSQL, [records] url); each is
        resolved by its own "takes writes again" event (kanmon.alerts.RECOVERIES)."""
        self._records_failures[key] = text
        monitoring = getattr(self, "monitoring", None)
        if monitoring is not None:
            self._loop.call_soon_threadsafe(self._raise_records_alert)

    def _raise_records_alert(self) -> None:
        if getattr(self, "monitoring", None) is None:
            return
        while self._records_failures:
            key, text = self._records_failures.popitem()
            self.monitoring.alerts.raise_alert("records", key, text)

    def _directory(self) -> Directory:
        """The mailboxes and aliases of the running config and the users file (local
        delivery and the injector ask; a reload's new config is seen at once)."""
        directory = self._local_directory
        if directory is None or directory.config is not self.config:
            directory = quiet_directory(self.config)
            self._local_directory = directory
        return directory

    def _quota_of(self, domain: str) -> int | None:
        """The per-mailbox quota of a local domain in the running config (delivery asks)."""
        for d in self.config.domain:
            if d.name == domain and d.deliver != "relay":
                return d.quota
        return None

    def _sieve_settings(self) -> tuple[int, int, bool]:
        """[sieve] of the running config (delivery asks, so a reload applies at once)."""
        sv = self.config.sieve
        return sv.max_redirects, sv.max_script_size, sv.enabled

    # -- what a reload keeps ------------------------------------------------------------

    def _build(self) -> None:
        config = self.config
        # Private before anything is opened (DESIGN.md promise 10): what an older version
        # left readable is corrected and said in an event once the records are open.
        corrected = make_private(self.data_dir)
        self._loop = asyncio.get_running_loop()
        self._records_failures: dict[str, str] = {}  # records alerts to raise, by key
        # A records database that refuses writes (locked, deleted): the batches are kept in
        # the spill journal; the administrator hears of it (a `records` alert). The node
        # also writes what ended processes (receivers, a crashed run) left spilled.
        self.records = Records(self.data_dir, config.server.hostname, echo=self.echo, log=config.log,
                               on_failure=self._records_failed, replay_others=True, shared=config.records,
                               on_shared_failure=partial(self._records_failed, key="shared database"))
        if corrected:
            self.records.emit(f"data_dir {self.data_dir}: made private (0700 directories, 0600 files), were readable "
                              f"by others: {', '.join(corrected)}", kind="warning")
        self.committer = GroupCommitter(self.data_dir, fsync=self.fsync)
        self.spool = Spool(self.data_dir, fsync=self.fsync, committer=self.committer)
        records = self.records
        # An entry refused while running (queue manager, admin): a critical event (alerted).
        self.spool.on_corrupt = lambda qid, why: records.emit(CORRUPT_EVENT.format(why), qid, "critical")
        self.spool.on_refused = lambda text: records.emit(text, kind="error")  # a spool file moved aside
        configure_index(config)
        self._local_directory: Directory | None = None
        self.local = LocalDelivery(self.data_dir, self.committer, quota_of=self._quota_of,
                                   is_mailbox=lambda address: self._directory().wait_deliverable(address))
        self.dns_cache = DnsCache(config.dns.cache_entries)
        self.remote = SmtpDelivery(config, self.records.record, data_dir=self.data_dir, dns_cache=self.dns_cache,
                                   clock=self.clock)
        self.queue = QueueManager(
            config, self.spool, self.records, self.local, self.remote.deliver_route,
            clock=self.clock, notices=Notices(config),
        )
        # Mail kanmon queues itself goes where RCPT TO would send it (aliases, mailboxes).
        self.queue.injector.expand = lambda address: self._directory().expand(address)
        # Users' Sieve filters at local delivery: what they send enters through the injector.
        self.local.sieve = SieveFilter(self.data_dir, config.server.hostname, self.queue.injector.inject,
                                       self.records.emit, clock=self.clock.now, settings=self._sieve_settings)
        self.local.sieve.unknown_local = lambda address: self._directory().is_unknown_local(address)
        self.mail_roles = has_mail_roles(config)
        if not self.mail_roles:
            self.workers = 0
            self.delivery_workers = 0
        # Shared state (rate counters, verification cache, greylist) is one database in
        # data_dir that the receiver processes open too, or PostgreSQL shared with the other
        # nodes ([records] url); it stays across reloads.
        self.state = open_state(config, self.data_dir)
        # The local sendmail command's maildrop (kanmon.queue.pickup), read through the injector.
        self.pickup = (Pickup(self.data_dir, self.queue.injector, self.records, config.server.hostname,
                              config.smtp.max_message_size) if self.mail_roles else None)
        self.throttle = self.auth_throttle or AuthThrottle(state=self.state)  # shared with the receivers
        # Queue operations: the data_dir lock (taken here, before recovery), the
        # control socket and [[maintenance]] jobs (kanmon.admin.service).
        self.admin = AdminPlane(self)
        self.services.append(self.admin)
        # Monitoring: alerts, metrics, records retention (kanmon.monitoring).
        self.monitoring = Monitoring(self)
        self.services.append(self.monitoring)
        # The balancer role: virtual addresses in front of real servers.
        if config.balancer is not None:
            self.balancer = self._balancer(config)
            self.services.append(self.balancer)

    def _balancer(self, config: Config) -> BalancerService:
        assert self.records is not None
        records = self.records

        def emit(text: str, queue_id: str | None = None) -> None:  # its lines, found by their kind
            records.emit(text, queue_id, kind=BALANCER_KIND)

        return BalancerService(config, emit, self.monitoring.alerts.incident)

    # -- what a reload replaces ---------------------------------------------------------

    @property
    def smtp(self) -> SmtpServer | None:
        return self.frontend.smtp if self.frontend else None

    @property
    def receivers(self) -> ReceiverPool | None:
        return self.frontend.receivers if self.frontend else None

    def _frontend(self, config: Config, prepared: Prepared, workers: int, text: str | None) -> Frontend:
        """Build (not start) the listeners of `config` on the prepared sockets. Raises
        OSError/ssl.SSLError/ValueError (a certificate that does not load, say)."""
        assert self.records is not None and self.queue is not None and self.spool is not None
        fe = Frontend(config)

        def socks(addresses, implicit_tls: bool) -> list:
            out = []
            for address in addresses:
                sock = prepared.dup(tuple(address))
                fe.dups.append(sock)
                out.append((sock, implicit_tls))
            return out

        try:
            for path in server_cert_paths(config):
                if not os.access(path, os.R_OK):  # ssl's own error does not name the file
                    raise OSError(f"cannot read {path}: " + ("missing" if not os.path.exists(path) else "permission denied"))
            tls_context = server_context(config)
            mail_roles = has_mail_roles(config)
            # Mailboxes and aliases: the config's and the users file's (followed while running).
            directory = Directory(config, UserFile(users_path(config),
                                                   on_error=partial(self.records.emit, kind="error")))
            users = Users(config, directory=directory)
            if mail_roles:
                from kanmon.policy.dns import CheckResolver  # noqa: PLC0415 - see the note at the imports
                from kanmon.policy.dnsbl import dnsbl_effect_handlers  # noqa: PLC0415
                from kanmon.policy.quota import quota_effect_handlers  # noqa: PLC0415
                from kanmon.policy.scanners import scanner_effect_handlers  # noqa: PLC0415
                from kanmon.policy.standard import standard_pipeline  # noqa: PLC0415
                from kanmon.smtp.server import SmtpServer, SubmissionAuth  # noqa: PLC0415
                from kanmon.store.maildir import mailbox_usage  # noqa: PLC0415
                from kanmon.store.quota import QuotaNotices  # noqa: PLC0415

                # The accept checks; the I/O they need (mailbox usage) and their effects
                # (quota notices) are passed in here, so policy/ imports no store module.
                # Over-quota notices from listeners in this process enter through the
                # queue's injector. The checks' DNS resolver caches per configuration.
                pipeline = standard_pipeline(config, quota_usage=partial(mailbox_usage, self.data_dir),
                                             state=self.state, resolver=CheckResolver.from_config(config, cache=self.dns_cache),
                                             directory=directory, clock=self.clock.now)
                effects = quota_effect_handlers(QuotaNotices(self.data_dir, self.queue.injector))
                records = self.records
                effects.update(dnsbl_effect_handlers(
                    lambda e: records.record(DnsblLookupFailed(e.ip, e.zone, e.error))))
                effects.update(scanner_effect_handlers(
                    lambda e: records.record(ScannerFailed(e.scanner, e.error) if e.error else ScannerRecovered(e.scanner))))
                if workers:
                    fe.receivers = self._receiver_pool(config, socks, workers, text)
                    fe.services.append(fe.receivers)
                else:
                    fe.smtp = SmtpServer(
                        config, pipeline, self.spool, self.records, self.queue.submit_nowait, tls_context,
                        clock=self.clock.now, effects=effects, sockets=socks(config.smtp.listen, False),
                    )
                    fe.services.append(fe.smtp)
                    sub = config.submission
                    if sub is not None:
                        fe.services.append(SmtpServer(
                            config, pipeline, self.spool, self.records, self.queue.submit_nowait, tls_context,
                            clock=self.clock.now, submission=True, auth=SubmissionAuth(users, self.throttle),
                            effects=effects, sockets=socks(sub.listen, False) + socks(sub.listen_tls, True),
                        ))
            # The store role: POP3, IMAP (each only when configured).
            if config.pop3 is not None:
                from kanmon.store.pop3 import Pop3Service  # noqa: PLC0415

                fe.services.append(Pop3Service(
                    config, tls_context, users, self.throttle, self.records.emit,
                    sockets=socks(config.pop3.listen, False) + socks(config.pop3.listen_tls, True)))
            if config.imap is not None:
                from kanmon.store.imap import ImapService  # noqa: PLC0415

                fe.services.append(ImapService(
                    config, tls_context, users, self.throttle, self.records.emit,
                    sockets=socks(config.imap.listen, False) + socks(config.imap.listen_tls, True)))
            if config.managesieve is not None:
                from kanmon.store.managesieve import ManageSieveService  # noqa: PLC0415

                fe.services.append(ManageSieveService(
                    config, tls_context, users, self.throttle, self.records.emit,
                    sockets=socks(config.managesieve.listen, False) + socks(config.managesieve.listen_tls, True)))
            if config.metrics.listen is not None:
                host, port = config.metrics.listen
                (sock, _), = socks([config.metrics.listen], False)
                fe.services.append(MetricsServer(self.monitoring.metrics, host, port, self.records.emit,
                                                 sock=sock, ready=lambda: self.ready))
            if config.console is not None:
                # The web console (imported only when configured: the web stack costs a
                # node without it nothing).
                from kanmon.console.service import ConsoleServer  # noqa: PLC0415

                (sock, _), = socks([config.console.listen], False)
                fe.services.append(ConsoleServer(self, config, sock, tls_context if config.console.tls else None))
        except BaseException:
            fe.close_dups()
            raise
        return fe

    def _receiver_pool(self, config: Config, socks, workers: int, text: str | None) -> ReceiverPool:
        """The SMTP/submission sockets (bound by the node, errors show at start) handed
        to the receiver processes."""
        from kanmon.receiver import ExitedShares, ReceiverPool  # noqa: PLC0415 - only with [server] workers

        plan = [(a, "smtp", False) for a in config.smtp.listen]
        if config.submission is not None:
            plan += [(a, "submission", False) for a in config.submission.listen]
            plan += [(a, "submission", True) for a in config.submission.listen_tls]
        sockets = [sock for sock, _tls in socks([a for a, _r, _t in plan], False)]
        listeners = [{"fd": s.fileno(), "role": role, "tls": tls} for s, (_a, role, tls) in zip(sockets, plan)]
        assert self.queue is not None and self.records is not None
        source, snapshot = self._config_snapshot("receivers", text)
        if self._exited_shares is None:  # one for the node: a reload's pools share it
            self._exited_shares = ExitedShares(self.state, self.records.emit)
        shares = self._exited_shares

        async def receiver_exited(pid: int) -> None:
            shares.add(str(pid))  # the connections it held are gone (in the background: the state may be down)
            # The DATA it was spilling (never answered 250) would otherwise stay until the next start.
            assert self.spool is not None
            for path in self.spool.incoming.glob(f"data-{pid:x}.*"):
                path.unlink(missing_ok=True)

        return ReceiverPool(source, listeners, sockets, workers, self.queue.submit_nowait,
                            self.records.emit, quiet=self.echo is None, own_config_file=snapshot,
                            on_exit=receiver_exited, on_start=lambda pid: shares.started(str(pid)))

    def _config_snapshot(self, kind: str, text: str | None) -> tuple[str | None, bool]:
        """(config source, is a private snapshot) for child processes: they load exactly
        the text this process validated, not the file, which may have changed since."""
        if text is None:
            return self.config_source, False
        self._generation += 1
        if self._generation == 1:
            _remove_dead_snapshots(self.data_dir)
        path = self.data_dir / f".{kind}-{os.getpid()}-{self._generation}.toml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return str(path), True

    def _agent_pool(self, count: int, text: str | None) -> AgentPool:
        """The delivery agents of the config `text` (kanmon.agent); not started."""
        assert self.queue is not None and self.records is not None
        source, snapshot = self._config_snapshot("agents", text)

        def server_used(destination: str, used: str, failed: list[tuple[str, str]]) -> None:
            hook = self.remote.on_server_used  # the failover alerts (kanmon.monitoring sets it)
            if hook is not None:
                hook(destination, used, failed)

        return AgentPool(source, count, self.queue.submit_nowait, self.records.emit, on_server_used=server_used,
                         quiet=self.echo is None, fsync=self.fsync, own_config_file=snapshot)

    # -- start, run, stop ---------------------------------------------------------------

    def recover(self) -> None:
        assert self.spool and self.records and self.queue
        # The admin's queue walks (list, summary, filtered actions) read memory from now on.
        self.spool.keep_index()
        refused: list[tuple[str, int]] = []
        schedule = self.queue.schedule_recovered

        def recovered(e: Entry, refused_lines: int) -> None:
            # Each message is in the index (a compact entry, kanmon.spool.index) and goes
            # to the schedule: a million deferred messages are never all in memory as
            # whole envelopes and journals.
            if refused_lines:
                refused.append((e.queue_id, refused_lines))
            schedule(e.queue_id, e.hold, e.next_attempt)

        def fell_back(why: str) -> None:
            self.records.emit(why, None, "error")

        # A big spool is read by child processes on every core (kanmon.spool.recovery).
        count, corrupt, removed = recover_index(self.spool, recovered, on_fallback=fell_back)
        for qid, why in corrupt:
            self.records.emit(CORRUPT_EVENT.format(why), qid, "critical")
        if removed:
            self.records.record(Recovery(removed=removed))
        for qid, n in refused:  # a torn last line after a crash, or damage: skipped
            self.records.emit(f"recovery: warning: {n} journal line(s) refused and skipped",
                              qid, "error")  # damaged stored state: alerted like an error
        self.records.record(Recovery(count, len(corrupt)))

    async def run(self) -> None:
        """Start everything, then wait until cancelled; stop in order."""
        self._build()
        assert self.records and self.queue
        try:
            self.recover()
            started = []
            try:
                # The admin plane first: its control socket answers (a `kanmon reload` waits
                # for the start to finish) from the moment a listener accepts.
                for service in (self.admin, self.monitoring):
                    await service.start()
                    started.append(service)
                self._raise_records_alert()  # a records failure before monitoring was there
                prepared = self.listen.prepare(listen_addresses(self.config, self.mail_roles))
                try:
                    frontend = self._frontend(self.config, prepared, self.workers, self.config_text)
                except BaseException:
                    self.listen.abort(prepared)
                    raise
                self.listen.commit(prepared)
                if self.workers:
                    # What the receivers of a run that crashed held is held by nobody.
                    try:
                        await self.state.submit(self.state.gauges.clear)
                    except Exception as e:  # noqa: BLE001 - shared state down (PostgreSQL): start anyway
                        self.records.emit(f"shared state: cannot clear this node's connection counts: {e}",
                                          kind="error")
                await frontend.start()
                self.frontend = frontend
                for service in self.services:
                    if service not in started:
                        await service.start()
                        started.append(service)
                if not self.mail_roles:
                    # A node that only balances: what start built lives as long as the
                    # process; out of the cyclic GC's sight, the collections that every
                    # forwarded connection's allocations set off stay small.
                    gc.freeze()
                self.started.set()
                self.ready = True
                async with asyncio.TaskGroup() as tg:  # until cancelled
                    self._tg = tg
                    tg.create_task(self.queue.run())
                    tg.create_task(self._sweep_recycled())
                    if self.delivery_workers:
                        tg.create_task(self._start_agents(self.delivery_workers, self.config_text))
                    if self.pickup is not None:
                        tg.create_task(self.pickup.run())
                    self._start_background({"monitoring", "maintenance", "dnscheck", "quarantine"})
                    if self.cluster_watch is not None:  # the configuration pushed to the cluster
                        tg.create_task(self.cluster_watch.run())
            finally:
                self.ready = False
                self._tg = None
                await self._stop_agents()
                await self._stop_frontends()
                if self._exited_shares is not None:
                    await self._exited_shares.close()
                await self._stop_balancers()  # the one running now may have come with a reload
                for service in reversed(started):
                    if not isinstance(service, BalancerService):
                        await service.stop()
                self.listen.close()
        except asyncio.CancelledError:
            pass
        finally:
            self.queue.close()
            await self.remote.close()
            for remote in self._old_remotes:
                await remote.close()
            self.spool.close()
            self.committer.close()
            self.state.close()
            self.records.record(Stopped())
            self.records.close()
            self.admin.close()  # release the data_dir lock last

    async def _sweep_recycled(self) -> None:
        """Queue files kept for reuse that no new message took for a minute are removed
        (kanmon.spool.recycle): a delivered message's bytes do not stay on disk."""
        assert self.spool is not None
        recycler = self.spool.recycler
        while True:
            await asyncio.sleep(recycle.SWEEP_EVERY)
            await asyncio.to_thread(recycler.sweep)

    async def _start_agents(self, count: int, text: str | None) -> None:
        """The delivery agents start once the node serves (they cost its start nothing on a
        busy machine); until every one is ready, and if they cannot start (a critical
        event), this process delivers."""
        assert self.records is not None and self.queue is not None
        pool = self._agent_pool(count, text)
        self.agents = pool  # a stop meanwhile stops it
        try:
            await pool.start()
        except OSError as e:
            if self.agents is pool:
                self.agents = None
                self.records.emit(f"delivery agents: {e}; delivering in the main process", kind="critical")
            return
        if self.agents is pool:
            self.queue.agents = pool
            self.records.emit(f"delivery agents: {count} ready (pid {', '.join(map(str, pool.pids()))})")

    async def _stop_agents(self) -> None:
        """The queue manager has stopped: deliveries still in an agent end unfinished
        (nothing journaled; delivered after the next start)."""
        pools = list(self._draining.values()) + ([self.agents] if self.agents is not None else [])
        for task in list(self._draining):
            task.cancel()
        self._draining.clear()
        for pool in pools:
            await pool.stop()
        self.agents = None
        if self.queue is not None:
            self.queue.agents = None

    async def _stop_frontends(self) -> None:
        for task, frontend in list(self._retiring.items()):
            task.cancel()
            # On purpose: a second stop landing here is swallowed too. It still reaches the
            # task awaited (cancelled already), and the shutdown goes on to its end: each
            # frontend stopped, receivers told to stop (not killed), sessions given 421.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await frontend.stop()  # sessions still open after a reload end with the node
        self._retiring.clear()
        if self.frontend is not None:
            await self.frontend.stop()

    def _start_background(self, names: set[str]) -> None:
        """(Re)start the node's background tasks `names` in its TaskGroup."""
        assert self._tg is not None and self.records is not None
        for name in names:
            old = self._background.pop(name, None)
            if old is not None:
                old.cancel()
            if name == "monitoring":
                coro = self.monitoring.run()
            elif name == "maintenance":
                coro = self.admin.run_maintenance()
            elif name == "quarantine":
                coro = self.admin.run_quarantine()
            elif self.config.dnscheck.every:  # dnscheck
                from kanmon.dnscheck.monitor import DnsMonitor  # noqa: PLC0415 - only with [dnscheck] every

                records = self.records
                monitor = DnsMonitor(self.config, lambda text: records.emit(text, kind=DNSCHECK_KIND),
                                     self.monitoring.dns_alert(), self.clock)
                self.dns_monitor = monitor  # the console shows its last round
                coro = monitor.run()
            else:
                continue
            self._background[name] = self._tg.create_task(coro)

    # -- reload -------------------------------------------------------------------------

    async def reload_request(self) -> dict:
        """The control socket's "reload": a reply {"ok": ..., "result"|"error": ...}."""
        try:
            result = await self.reload_file()
        except ReloadError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "result": result}

    async def reload_file(self) -> dict:
        """Read and validate the config file again, then reload() it: SIGHUP and `kanmon
        reload` (the control socket). The service manager hears of it (sd_notify):
        RELOADING=1 before, READY=1 after, with a STATUS= that says a refusal. Reloads asked
        while one runs (they take their turns) get one READY=1, when the last has ended:
        the manager's reload is not over while one still waits. Its STATUS= is the one of
        the reload asked last (it read the file as it is now)."""
        sdnotify.reloading()
        self._reloads_asked += 1
        self._reload_seq += 1
        seq = self._reload_seq
        status = "reload failed; serving the previous configuration"
        try:
            result = await self._reload_file()
            status = f"serving as {self.config.server.hostname}"
            return result
        except ReloadError as e:
            reason = re.sub(r"[\x00-\x1f\x7f]+", " ", str(e))  # one line: a newline would start another assignment
            status = f"reload refused: {reason[:STATUS_REASON_MAX]}; serving the previous configuration"
            raise
        finally:
            self._reloads_asked -= 1
            if seq == self._reload_seq:
                self._reload_status = status
            if not self._reloads_asked:
                sdnotify.ready(self._reload_status)

    async def _reload_file(self) -> dict:
        try:
            new, text = read_config(self.config_source)
        except ConfigError as e:
            self._refused("; ".join(e.messages))
        if self.cluster_watch is not None:  # the version the cluster gives this node, as at a restart
            result = await self.cluster_watch.reload_local(new, text)
        else:
            result = await self.reload(new, text)
        admin = getattr(self, "admin", None)
        if admin is not None:  # `kanmon status`: the digest of the local file as read
            admin.config_sha256 = config_digest(self.config_source, text)
        return result

    def _refused(self, reason: str):
        if self.records is not None:
            self.records.record(ReloadFailed(reason))
        raise ReloadError(reason)

    async def reload(self, new: Config, text: str | None = None) -> dict:
        """Prepare `new` completely, then switch to it; ReloadError (and an error event)
        with the old configuration still serving if any step fails."""
        await self.started.wait()
        if self._tg is None or self.frontend is None:
            self._refused("the node is stopping")
        async with self._reload_lock:
            self.ready = False
            try:
                return await self._reload(new, text)
            finally:
                self.ready = self._tg is not None

    async def _reload(self, new: Config, text: str | None) -> dict:
        old = self.config
        assert self.records is not None and self.queue is not None and self.frontend is not None
        if Path(new.server.data_dir).resolve() != self.data_dir.resolve():
            self._refused(f"[server] data_dir changed to {new.server.data_dir}: "
                          "the spool and records cannot move on a reload (restart kanmon)")
        if not has_mail_roles(new) and self.mail_roles or has_mail_roles(new) and not self.mail_roles:
            self._refused("a node that only balances and a mail node differ too much for a reload (restart kanmon)")
        workers = self.workers
        if self.workers == old.server.workers:  # the count follows the config
            workers = new.server.workers
        delivery_workers = self.delivery_workers
        if self.mail_roles and self.delivery_workers == agent_count(old.server.delivery_workers):
            delivery_workers = agent_count(new.server.delivery_workers)
        # New agents (another count, or another config to deliver by) are ready before
        # any delivery goes to them; the old ones then finish what they have.
        replace_agents = delivery_workers != self.delivery_workers or bool(delivery_workers and new != old)
        agents = None
        if replace_agents and delivery_workers:
            try:
                agents = self._agent_pool(delivery_workers, text)
                await agents.start()
            except OSError as e:
                self._refused(f"delivery agents: {os_reason(e)}")
        try:
            prepared = self.listen.prepare(listen_addresses(new, self.mail_roles))
        except OSError as e:
            if agents is not None:
                await agents.stop()
            self._refused(os_reason(e))
        frontend = None
        try:
            frontend = self._frontend(new, prepared, workers, text)
            await frontend.start(replacing=self.frontend)
        except BaseException:
            if frontend is not None:
                self._retire(frontend)  # what it started accepts no more; its sessions finish
            if agents is not None:
                await agents.stop()
            self._refuse_failed_start(prepared)
        # The new Frontend accepts on every address; the old one stops accepting and
        # retires (its listening sockets that the new config still lists stay open).
        self.listen.commit(prepared)
        configure_index(new)
        retiring, self.frontend = self.frontend, frontend
        self.workers = workers
        self.config_text = text
        self._retire(retiring)
        if replace_agents:
            draining, self.agents = self.agents, agents
            self.queue.agents = agents
            if draining is not None:
                task = asyncio.ensure_future(draining.drain())
                self._draining[task] = draining
                task.add_done_callback(lambda t: self._draining.pop(t, None))
        self.delivery_workers = delivery_workers
        changed = self._reconfigure_core(old, new)
        self.records.record(Reload(", ".join(changed) or "nothing"))
        return {"config": self.config_source or "<embedded default>", "changed": changed,
                "listening": [f"{h}:{p}" for h, p in self.listen.held]}

    def _retire(self, frontend: Frontend) -> None:
        """Let `frontend` retire in the background (cancelled and stopped at node stop)."""
        task = asyncio.ensure_future(frontend.retire())
        self._retiring[task] = frontend
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    def _refuse_failed_start(self, prepared: Prepared):
        """In an except clause of a reload: free what was bound for it and refuse it."""
        try:
            raise
        except ssl.SSLError as e:
            self.listen.abort(prepared)
            self._refused(f"the TLS certificate and key do not load: {e}")
        except OSError as e:
            self.listen.abort(prepared)
            self._refused(os_reason(e))
        except Exception as e:  # noqa: BLE001 - whatever fails, the old configuration stays
            self.listen.abort(prepared)
            self._refused(f"{type(e).__name__}: {e}")
        except BaseException:
            self.listen.abort(prepared)
            raise

    def _reconfigure_core(self, old: Config, new: Config) -> list[str]:
        """The parts that stay across a reload take the new settings; the background
        tasks whose sections changed restart. Returns the top-level sections that changed."""
        assert self.queue is not None and self.records is not None
        changed = [name for name in type(new).model_fields if getattr(old, name) != getattr(new, name)]
        self.config = new
        replaced = bool({"server", "outbound", "dns", "tls", "domain"} & set(changed))
        self.remote.flush_sessions(retire=replaced)  # cached outbound sessions end at a reload
        if replaced:
            self._old_remotes.append(self.remote)  # deliveries in flight finish on it; closed at stop
            if old.dns != new.dns:
                self.dns_cache.max_entries = new.dns.cache_entries
                self.dns_cache.flush()  # other servers, other answers
            self.remote = SmtpDelivery(new, self.records.record, data_dir=self.data_dir, dns_cache=self.dns_cache,
                                       clock=self.clock)
            self.remote.on_server_used = self.monitoring.alerts.on_server_used
        self.queue.reconfigure(new, self.remote.deliver_route, Notices(new))
        self.admin.reconfigure()
        if "log" in changed:  # the receivers started for `new` log the new way already
            self.records.reconfigure_log(new.log)
        restart = set()
        if changed:
            # Any section: the alerts read far more than [alerts] (the disk threshold's
            # default [smtp] min_free_disk, [archive] quota, [[dkim]] and [dnscheck]
            # keys, [tls], [[domain]] for their recipients...), and a list of them goes
            # stale with the next threshold. Rebuilding is cheap: the alert state goes
            # on, and the first round of checks runs at once with the new values.
            self.monitoring.reconfigure(new)
            restart.add("monitoring")
        if "maintenance" in changed:
            restart.add("maintenance")
        if "quarantine" in changed:
            restart.add("quarantine")
        if {"dnscheck", "dns", "domain"} & set(changed):
            restart.add("dnscheck")
        if restart:
            self._start_background(restart)
        if "balancer" in changed:
            self.spawn_balancer_swap(old, new)
        return changed

    def spawn_balancer_swap(self, old: Config, new: Config) -> None:
        """The balancer of `new` starts (after the rest of the reload) on the listening
        sockets of the running one, which then retires: it takes no new connection and
        its open ones run to their end (promise 8). If the new one cannot start, the
        running one goes on serving as it was."""
        async def swap() -> None:
            assert self.records is not None
            previous = self.balancer
            candidate = None
            if new.balancer is not None:
                candidate = self._balancer(new)
                try:
                    await candidate.start(replacing=previous)
                except (OSError, ValueError, ConfigError) as e:
                    self.records.record(ReloadFailed(f"balancer: {e}; the previous balancer configuration stays"))
                    return
                except Exception as e:  # noqa: BLE001 - the running balancer goes on
                    self.records.emit(f"balancer: cannot start after the reload: {type(e).__name__}: {e}; "
                                      "the previous balancer configuration stays", kind="critical")
                    return
            self.balancer = candidate
            if previous is not None:
                self.services.remove(previous)
                self._retire_balancer(previous)
            if candidate is not None:
                self.services.append(candidate)

        assert self._tg is not None
        self._tg.create_task(swap())

    def _retire_balancer(self, balancer: BalancerService) -> None:
        """Let a replaced balancer's connections finish in the background (stopped with the node)."""
        task = asyncio.ensure_future(balancer.retire())
        self._retiring_balancers[task] = balancer
        task.add_done_callback(lambda t: self._retiring_balancers.pop(t, None))

    async def _stop_balancers(self) -> None:
        """At node stop: the running balancer and those still retiring after a reload."""
        for task, balancer in list(self._retiring_balancers.items()):
            await balancer.stop()  # closes what is left; retire() then returns
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._retiring_balancers.clear()
        if self.balancer is not None:
            await self.balancer.stop()

    def describe(self) -> str:
        """What the operator sees at start: listeners, where mail goes, where data lives."""
        c = self.config
        lines = [f"kanmon: {c.server.hostname}, data in {self.data_dir.resolve()}"]
        if self.mail_roles:
            for host, port in c.smtp.listen:
                lines.append(f"kanmon: SMTP on {host}:{port} (STARTTLS offered)")
        running = self.balancer.real_modes() if self.balancer is not None else {}
        for vs in c.balancer.virtual_server if c.balancer else []:
            modes = running.get(vs.name, {})

            def mode_text(address: str, configured: str) -> str:
                mode = modes.get(address, configured)  # an administrator's mode, kept across restarts
                return mode if mode == configured else f"{mode}, as an administrator set it; configured {configured}"

            reals = ", ".join(f"{r.address[0]}:{r.address[1]} ({mode_text(f'{r.address[0]}:{r.address[1]}', r.mode)})"
                              for r in vs.real)
            lines.append(f"kanmon: balancer {vs.name} on {vs.listen[0]}:{vs.listen[1]} ({vs.method}) -> {reals}")
        for section, name in ((c.submission, "submission"), (c.pop3, "POP3"), (c.imap, "IMAP"),
                              (c.managesieve, "ManageSieve")):
            if section is not None:
                for host, port in section.listen:
                    lines.append(f"kanmon: {name} on {host}:{port} (STARTTLS)")
                for host, port in section.listen_tls:
                    lines.append(f"kanmon: {name} on {host}:{port} (implicit TLS)")
        if c.console is not None:
            host, port = c.console.listen
            lines.append(f"kanmon: console on {'https' if c.console.tls else 'http'}://{host}:{port}/")
        if c.metrics.listen is not None:
            host, port = c.metrics.listen
            lines.append(f"kanmon: metrics on http://{host}:{port}/metrics")
        try:  # the mailboxes of the config and of the users file (kanmon user add)
            boxes = self._directory().tables().mailboxes
        except Exception:  # noqa: BLE001 - the banner must not stop the start; the config's then
            boxes = {}
        for d in c.domain:
            if d.deliver == "local":
                lines.append(
                    f"kanmon: mail for @{d.name} ({_mailboxes_text(d.mailboxes, boxes.get(d.name))}) -> "
                    f"{(self.data_dir / 'mailboxes' / d.name).resolve()}/<mailbox>/new/"
                )
            else:
                hops = ", ".join(f"{h}:{p}" for h, p in d.servers)
                lines.append(f"kanmon: mail for @{d.name} -> relayed to {hops}")
        out = c.outbound
        if not self.mail_roles:
            pass  # a node that only balances takes no mail
        elif out.smarthost:
            lines.append("kanmon: other domains -> smarthost " + ", ".join(f"{h}:{p}" for h, p in out.smarthost))
        else:
            lines.append("kanmon: other domains -> by MX (relay_networks: "
                         + ", ".join(str(n) for n in c.smtp.relay_networks) + ")")
        return "\n".join(lines)


BANNER_MAILBOXES = 5  # mailboxes named in the start-up banner per domain; past them, counted


def _mailboxes_text(in_config, all_boxes) -> str:
    """A local domain's mailboxes for the banner: named (the first few), how many in all,
    and how many of them come from the users file (users.json, `kanmon user add`)."""
    names = sorted(all_boxes if all_boxes is not None else in_config)
    if not names:
        return "no mailboxes"
    from_file = len(set(names) - set(in_config))
    text = ", ".join(names[:BANNER_MAILBOXES]) + (", ..." if len(names) > BANNER_MAILBOXES else "")
    count = f"{len(names)} mailbox{'es' if len(names) != 1 else ''}"
    return f"{text}: {count}" + (f", {from_file} from users.json" if from_file else "")


def run_node(config: Config, config_source: str | None = None, echo: TextIO | None = sys.stdout) -> int:
    """`kanmon serve`: run until SIGINT/SIGTERM; SIGHUP reloads the config file.

    Reload (DESIGN.md promise 8): Node.reload prepares the new configuration completely
    before anything of the old one stops; a bad file or a failed step is refused with an
    error event and the running configuration stays. Sessions in progress are not cut.
    `kanmon reload` asks over the control socket and reads the outcome.
    """
    # Started as root with [server] user: become that user before anything is opened
    # (kanmon.privileges), keeping only the right to bind ports below 1024.
    os.umask(0o077)  # what is created without an explicit mode (SQLite's own files) is private too
    try:
        switched = drop_privileges(config.server.user, config.server.group, Path(config.server.data_dir))
    except (PrivilegeError, OSError) as e:
        print(f"kanmon: cannot start: {e}", file=sys.stderr)
        return 1
    if switched and echo is not None:
        print(f"kanmon: {switched}", file=echo, flush=True)
    # Another kanmon holding the data_dir (a server stopping for a restart, an offline admin
    # command): waited for here, before the event loop, where SIGTERM and Ctrl-C end the
    # wait at once. The lock is taken here and kept: the node's admin plane holds it from
    # then on (no moment between the wait and the start when another process could take
    # it, and no probe that takes it for a moment, which would refuse another's try).
    lock = DataDirLock(Path(config.server.data_dir))
    try:
        lock.acquire(LOCK_WAIT, on_wait=say_lock_wait)
    except LockBusy as e:
        print(f"kanmon: cannot start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError:  # no data_dir yet (made at start), or unreadable: the node's own acquire() says what is wrong
        pass
    try:
        return _serve(config, config_source, echo, lock)
    finally:
        lock.release()  # normally the node's admin plane did, after the spool closed


def _serve(config: Config, config_source: str | None, echo: TextIO | None, lock: DataDirLock) -> int:
    """run_node's event loop, the data_dir lock taken (or not: lock.held)."""
    try:
        import uvloop  # noqa: PLC0415 - optional, faster event loop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run

    async def keep_watchdog_fed(interval: float) -> None:
        while True:  # the loop answering is what systemd's WatchdogSec= checks
            sdnotify.watchdog()
            await asyncio.sleep(interval)

    async def main() -> int:
        interval = sdnotify.watchdog_interval()
        feeder = asyncio.ensure_future(keep_watchdog_fed(interval)) if interval else None
        try:
            return await serve()
        finally:
            sdnotify.stopping()
            if feeder is not None:
                feeder.cancel()

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        text = None
        if config_source is not None:  # what the receivers will load: the text validated here
            try:
                again, text = read_config(config_source)
                if again != config:
                    text = None  # changed since it was checked: the receivers read the file
            except ConfigError:
                text = None
        node = Node(config, echo=echo, workers=config.server.workers,
                    delivery_workers=agent_count(config.server.delivery_workers),
                    config_source=config_source, config_text=text, data_dir_lock=lock)
        task = asyncio.ensure_future(node.run())
        reloads: set[asyncio.Task] = set()

        async def on_hup() -> None:
            try:
                result = await node.reload_file()  # tells the service manager (sd_notify)
            except ReloadError as e:
                print(f"kanmon: reload refused, the running configuration stays: {e}", file=sys.stderr, flush=True)
                return
            gcpolicy.resettle()  # what the old configuration held may be collected
            print(f"kanmon: reloaded (changed: {', '.join(result['changed']) or 'nothing'})", flush=True)

        def hup() -> None:
            t = asyncio.ensure_future(on_hup())
            reloads.add(t)
            t.add_done_callback(reloads.discard)

        def on_stop() -> None:
            sdnotify.stopping()
            task.cancel()

        def on_usr1() -> None:
            if node.records is not None:
                node.records.reopen_log()  # after logrotate moved the file

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, hup)
        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
        waiter = asyncio.ensure_future(node.started.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        pid_file = Path(config.server.data_dir) / "kanmon.pid"
        if waiter in done:
            fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            print(node.describe(), flush=True)
            # What start-up built (recovered index entries too) out of the collector's sight.
            gcpolicy.settle_after_start()
            sdnotify.ready(f"serving as {config.server.hostname}")
        else:
            waiter.cancel()
        try:
            await task
        except (OSError, ValueError) as e:  # a file the config names, refused (recipients_file, ...)
            if waiter in done and not isinstance(e, OSError):
                raise  # after the start: not the config's refusal, the traceback is wanted
            print(f"kanmon: {'stopped' if waiter in done else 'cannot start'}: {e}", file=sys.stderr)
            return 1
        except asyncio.CancelledError:
            pass
        finally:
            for t in list(reloads):
                t.cancel()
        pid_file.unlink(missing_ok=True)
        return 0

    return runner(main())


def _remove_dead_snapshots(data_dir: Path) -> None:
    """Config snapshots a node wrote for its receivers and delivery agents are removed
    when it stops; one killed (kill -9, a crash) leaves them. Remove those whose process
    is gone."""
    for path in [*data_dir.glob(".receivers-*-*.toml"), *data_dir.glob(".agents-*-*.toml")]:
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            path.unlink(missing_ok=True)
