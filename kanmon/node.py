"""A running kanmon node: starts the roles the config asks for, in order, and stops them.

Role: the composition root. Order at start: data_dir and records, spool recovery (so a
crash is repaired before anything listens), the queue manager with what recovery found,
then the listeners (in this process, or in `[server] workers` receiver processes) and
the other services. Order at stop: the queue manager and background tasks end, then the
services and listeners in reverse order of start (anything accepted meanwhile is in the
spool for the next start), then records (so every event is written).

Trusts: a Config that passed validation. Never: start a listener before recovery; leave
a task that does not belong to the node's TaskGroup.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import TextIO

from kanmon.admin.service import AdminPlane
from kanmon.balancer.service import BalancerService
from kanmon.clock import SystemClock
from kanmon.config import Config, ConfigError, load_config
from kanmon.deliver.local import LocalDelivery
from kanmon.dnscheck.monitor import DnsMonitor
from kanmon.deliver.smtp import SmtpDelivery
from kanmon.monitoring import Monitoring
from kanmon.policy.quota import quota_effect_handlers
from kanmon.policy.dns import CheckResolver
from kanmon.policy.dnsbl import dnsbl_effect_handlers
from kanmon.policy.standard import standard_pipeline
from kanmon.queue.manager import QueueManager
from kanmon.queue.notices import Notices
from kanmon.queue.pickup import Pickup
from kanmon.receiver import ReceiverPool, bind_listener
from kanmon.records.events import DnsblLookupFailed, Recovery, Reload, Stopped
from kanmon.records.store import Records
from kanmon.smtp.server import SmtpServer, SubmissionAuth
from kanmon.store.imap import ImapService
from kanmon.store.maildir import mailbox_usage
from kanmon.store.pop3 import Pop3Service
from kanmon.store.quota import QuotaNotices
from kanmon.store.users import AuthThrottle, Users
from kanmon.spool.groupcommit import GroupCommitter
from kanmon.spool.store import Spool
from kanmon.state.sqlite import SqliteState
from kanmon import sdnotify
from kanmon.privileges import PrivilegeError, drop_privileges
from kanmon.tlscert import server_context
from kanmon.userdb import Directory, UserFile, users_path


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
        config_source: str | None = None,
    ):
        """workers: SMTP receiver processes (kanmon.receiver); 0 receives in this process.
        config_source: the config file the receivers load (None: the embedded default)."""
        self.auth_throttle = auth_throttle
        self.workers = workers
        self.config_source = config_source
        self.receivers: ReceiverPool | None = None
        self.config = config
        self.echo = echo
        self.clock = clock or SystemClock()
        self.fsync = fsync
        self.data_dir = Path(config.server.data_dir)
        self.records: Records | None = None
        self.spool: Spool | None = None
        self.queue: QueueManager | None = None
        self.smtp: SmtpServer | None = None
        self.services: list = []
        self.started = asyncio.Event()

    def _build(self) -> None:
        config = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.records = Records(self.data_dir, config.server.hostname, echo=self.echo, log=config.log)
        self.committer = GroupCommitter(self.data_dir, fsync=self.fsync)
        self.spool = Spool(self.data_dir, fsync=self.fsync, committer=self.committer)
        self.local = LocalDelivery(self.data_dir, self.committer)
        self.remote = SmtpDelivery(config, self.records.record)
        self.queue = QueueManager(
            config, self.spool, self.records, self.local, self.remote.deliver_route,
            clock=self.clock, notices=Notices(config),
        )
        self.tls_context = server_context(config)
        # The accept checks; the I/O they need (mailbox usage) and their effects (quota
        # notices) are passed in here, so policy/ imports no store module. Over-quota
        # notices from listeners in this process enter through the queue's injector.
        # Shared state (rate counters, verification cache, greylist) is one database in
        # data_dir that the receiver processes open too; the checks' DNS resolver caches
        # for this process. Mailboxes and aliases: the config's and the users file's
        # (followed while running).
        self.state = SqliteState(self.data_dir)
        self.check_resolver = CheckResolver.from_config(config)
        self.directory = Directory(config, UserFile(users_path(config), on_error=partial(self.records.emit, kind="error")))
        self.pipeline = standard_pipeline(config, quota_usage=partial(mailbox_usage, self.data_dir),
                                          state=self.state, resolver=self.check_resolver, directory=self.directory,
                                          clock=self.clock.now)
        self.quota_notices = QuotaNotices(self.data_dir, self.queue.injector)
        effects = quota_effect_handlers(self.quota_notices)
        effects.update(dnsbl_effect_handlers(lambda e: self.records.record(DnsblLookupFailed(e.ip, e.zone, e.error))))
        # A config with only [server] and [balancer] is a node that only balances.
        self.mail_roles = not (config.balancer is not None and "smtp" not in config.model_fields_set
                               and not config.domain)
        if not self.mail_roles:
            self.workers = 0
        elif not self.workers:
            self.smtp = SmtpServer(
                config, self.pipeline, self.spool, self.records, self.queue.submit_nowait, self.tls_context,
                clock=self.clock.now, effects=effects,
            )
        # The store role: accounts, submission, POP3, IMAP (each only when configured).
        self.users = Users(config, directory=self.directory)
        self.throttle = self.auth_throttle or AuthThrottle()
        if config.submission is not None and not self.workers and self.mail_roles:
            sub = config.submission
            self.services.append(SmtpServer(
                config, self.pipeline, self.spool, self.records, self.queue.submit_nowait, self.tls_context,
                clock=self.clock.now, submission=True, auth=SubmissionAuth(self.users, self.throttle), effects=effects,
                listeners=[(h, p, False) for h, p in sub.listen] + [(h, p, True) for h, p in sub.listen_tls],
            ))
        if config.pop3 is not None:
            self.services.append(Pop3Service(config, self.tls_context, self.users, self.throttle, self.records.emit))
        if config.imap is not None:
            self.services.append(ImapService(config, self.tls_context, self.users, self.throttle, self.records.emit))
        # The local sendmail command's maildrop (kanmon.queue.pickup), read through the injector.
        self.pickup = (Pickup(self.data_dir, self.queue.injector, self.records, config.server.hostname,
                              config.smtp.max_message_size) if self.mail_roles else None)
        # Queue operations: the data_dir lock (taken here, before recovery), the
        # control socket and [[maintenance]] jobs (kanmon.admin.service).
        self.admin = AdminPlane(self)
        self.services.append(self.admin)
        # Monitoring: alerts, metrics endpoint, records retention (kanmon.monitoring).
        self.monitoring = Monitoring(self)
        self.services.append(self.monitoring)
        # The balancer role: virtual addresses in front of real servers.
        if config.balancer is not None:
            self.services.append(
                BalancerService(config, self.records.emit, self.monitoring.alerts.incident)
            )

    def recover(self) -> None:
        assert self.spool and self.records and self.queue
        entries, corrupt, removed = self.spool.recover()
        for qid, why in corrupt:
            self.records.emit(f"corrupt queue file moved to spool/corrupt/: {why}", qid, "critical")
        if removed:
            self.records.record(Recovery(removed=removed))
        for e in entries:
            if e.state.refused:  # a torn last line after a crash, or damage: skipped
                self.records.emit(f"recovery: warning: {e.state.refused} journal line(s) refused and skipped",
                                  e.queue_id, "error")  # damaged stored state: alerted like an error
        self.queue.load_recovered(entries)
        self.records.record(Recovery(len(entries), len(corrupt)))

    async def run(self) -> None:
        """Start everything, then wait until cancelled; stop in order."""
        self._build()
        assert self.records and self.queue
        try:
            self.recover()
            started = []
            try:
                if self.smtp is not None:
                    await self.smtp.start()
                    started.append(self.smtp)
                if self.workers:
                    self.receivers = self._receiver_pool()
                    await self.receivers.start()
                    started.append(self.receivers)
                for service in self.services:
                    await service.start()
                    started.append(service)
                self.started.set()
                async with asyncio.TaskGroup() as tg:  # until cancelled
                    tg.create_task(self.queue.run())
                    tg.create_task(self.monitoring.run())
                    tg.create_task(self.admin.run_maintenance())
                    if self.pickup is not None:
                        tg.create_task(self.pickup.run())
                    if self.config.dnscheck.every:
                        monitor = DnsMonitor(self.config, self.records.emit, self.monitoring.dns_alert(), self.clock)
                        tg.create_task(monitor.run())
            finally:
                for service in reversed(started):
                    await service.stop()
        except asyncio.CancelledError:
            pass
        finally:
            self.queue.close()
            await self.remote.close()
            self.spool.close()
            self.committer.close()
            self.state.close()
            self.records.record(Stopped())
            self.records.close()
            self.admin.close()  # release the data_dir lock last

    def _receiver_pool(self) -> ReceiverPool:
        """Bind every SMTP/submission socket here (errors show at start), then hand them
        to the receiver processes."""
        c = self.config
        plan = [(h, p, "smtp", False) for h, p in c.smtp.listen]
        if c.submission is not None:
            plan += [(h, p, "submission", False) for h, p in c.submission.listen]
            plan += [(h, p, "submission", True) for h, p in c.submission.listen_tls]
        sockets = []
        try:
            for host, port, _role, _tls in plan:
                sockets.append(bind_listener(host, port))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        listeners = [{"fd": s.fileno(), "role": role, "tls": tls} for s, (_h, _p, role, tls) in zip(sockets, plan)]
        assert self.queue is not None and self.records is not None
        return ReceiverPool(self.config_source, listeners, sockets, self.workers, self.queue.submit_nowait,
                            self.records.emit, quiet=self.echo is None)

    def describe(self) -> str:
        """What the operator sees at start: listeners, where mail goes, where data lives."""
        c = self.config
        lines = [f"kanmon: {c.server.hostname}, data in {self.data_dir.resolve()}"]
        if self.mail_roles:
            for host, port in c.smtp.listen:
                lines.append(f"kanmon: SMTP on {host}:{port} (STARTTLS offered)")
        for vs in c.balancer.virtual_server if c.balancer else []:
            reals = ", ".join(f"{r.address[0]}:{r.address[1]} ({r.mode})" for r in vs.real)
            lines.append(f"kanmon: balancer {vs.name} on {vs.listen[0]}:{vs.listen[1]} ({vs.method}) -> {reals}")
        for section, name in ((c.submission, "submission"), (c.pop3, "POP3"), (c.imap, "IMAP")):
            if section is not None:
                for host, port in section.listen:
                    lines.append(f"kanmon: {name} on {host}:{port} (STARTTLS)")
                for host, port in section.listen_tls:
                    lines.append(f"kanmon: {name} on {host}:{port} (implicit TLS)")
        for d in c.domain:
            if d.deliver == "local":
                lines.append(
                    f"kanmon: mail for @{d.name} ({', '.join(d.mailboxes) or 'no mailboxes'}) -> "
                    f"{(self.data_dir / 'mailboxes' / d.name).resolve()}/<mailbox>/new/"
                )
            else:
                hops = ", ".join(f"{h}:{p}" for h, p in d.servers)
                lines.append(f"kanmon: mail for @{d.name} -> relayed to {hops}")
        out = c.outbound
        if out.smarthost:
            lines.append("kanmon: other domains -> smarthost " + ", ".join(f"{h}:{p}" for h, p in out.smarthost))
        else:
            lines.append("kanmon: other domains -> by MX (relay_networks: "
                         + ", ".join(str(n) for n in c.smtp.relay_networks) + ")")
        return "\n".join(lines)


def run_node(config: Config, config_source: str | None = None, echo: TextIO | None = sys.stdout) -> int:
    """`kanmon serve`: run until SIGINT/SIGTERM; SIGHUP reloads the config file.

    Reload (DESIGN.md promise 8): the file is validated completely first; a bad file is
    refused with an event naming the key, and the running configuration stays. A good one
    restarts the node in this process (listeners close with 421, the queue is recovered
    from the spool), like a `postfix reload` that also re-binds listeners.
    """
    # Started as root with [server] user: become that user before anything is opened
    # (kanmon.privileges), keeping only the right to bind ports below 1024.
    try:
        switched = drop_privileges(config.server.user, config.server.group, Path(config.server.data_dir))
    except (PrivilegeError, OSError) as e:
        print(f"kanmon: cannot start: {e}", file=sys.stderr)
        return 1
    if switched and echo is not None:
        print(f"kanmon: {switched}", file=echo, flush=True)
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
        current = config
        loop = asyncio.get_running_loop()
        pid_file = Path(config.server.data_dir) / "kanmon.pid"
        while True:
            node = Node(current, echo=echo, workers=current.server.workers, config_source=config_source)
            task = asyncio.ensure_future(node.run())
            reload_to: list[Config] = []

            def on_hup(node: Node = node, task: asyncio.Task = task, reload_to: list[Config] = reload_to) -> None:
                try:
                    new = load_config(config_source)
                except ConfigError as e:
                    for line in e.messages:
                        if node.records is not None:
                            node.records.emit(f"reload refused, the running configuration stays: {line}",
                                              kind="error")
                        print(f"kanmon: reload refused: {line}", file=sys.stderr, flush=True)
                    return
                if node.records is not None:
                    node.records.record(Reload())
                sdnotify.reloading()
                reload_to.append(new)
                task.cancel()

            def on_stop(task: asyncio.Task = task) -> None:
                sdnotify.stopping()
                task.cancel()

            def on_usr1(node: Node = node) -> None:
                if node.records is not None:
                    node.records.reopen_log()  # after logrotate moved the file

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_stop)
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            loop.add_signal_handler(signal.SIGUSR1, on_usr1)
            waiter = asyncio.ensure_future(node.started.wait())
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                Path(current.server.data_dir).mkdir(parents=True, exist_ok=True)
                pid_file = Path(current.server.data_dir) / "kanmon.pid"
                pid_file.write_text(f"{os.getpid()}\n")
                print(node.describe(), flush=True)
                sdnotify.ready(f"serving as {current.server.hostname}")
            else:
                waiter.cancel()
            try:
                await task
            except OSError as e:
                print(f"kanmon: cannot start: {e}", file=sys.stderr)
                return 1
            except asyncio.CancelledError:
                pass
            if not reload_to:
                pid_file.unlink(missing_ok=True)
                return 0
            current = reload_to[-1]

    return runner(main())
