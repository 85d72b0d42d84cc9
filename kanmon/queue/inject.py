"""The injector: the one way into the queue for mail kanmon writes itself.

Role: delivery and failure notices, admin bounces, alert mail, over-quota notices (and
quarantine releases, digests and the local sendmail command) enter here, exactly
like received mail does at the end of DATA: a queue id, the message made durable
through the spool (group commit, fsync), the accept event line (`from=<..>, size=..,
nrcpts=.., msgid=.., proto=internal, relay=local`, which counters, metrics and
`kanmon trace` read), the history rows, and the hand-over to the queue manager.

One per process: in the main process `submit` is QueueManager.submit_nowait; in an SMTP
receiver process it tells the main process "queued <id>" over the pipe; from an admin
operation outside the event loop (inject_blocking) it is the ManagerLink's submit.

Mail whose From domain is one of our [[dkim]] domains is DKIM-signed here, before it
is stored (kanmon.auth.dkimsign), as mail from our users is at the end of DATA.

Trusts: its callers (the content is ours, not the network's). Never: write the accept
line or a history row before the message is durable; hand over a message that is not
durable; swallow a storage error (the caller decides what a failure means: a log line,
stderr, an error event).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from kanmon.auth.dkimsign import OFF_LOOP_SIZE, Signer
from kanmon.clock import SystemClock
from kanmon.model import ClientInfo, Envelope, new_queue_id
from kanmon.records.events import Accepted
from kanmon.records.store import header_fields

Submit = Callable[[str, Envelope, bytes], None]
Expand = Callable[[str], tuple[str, ...]]


class Injector:
    """spool: kanmon.spool.store.Spool; records: kanmon.records.store.Records (emit,
    history_accept); submit(queue_id, envelope, content): tell the queue manager.
    hostname: this node's name (the HELO of the internal client). signer: the [[dkim]]
    keys (kanmon.auth.dkimsign.load_signer); None signs nothing."""

    def __init__(self, spool, records, submit: Submit, *, hostname: str = "localhost", clock=None,
                 signer: Signer | None = None, expand: Expand | None = None):
        self.spool = spool
        self.records = records
        self.submit = submit
        self.hostname = hostname
        self.clock = clock or SystemClock()
        self.signer = signer or Signer()
        # expand(rcpt): a local domain's aliases and mailboxes as RCPT TO expands them
        # (kanmon.userdb.Directory.expand); None leaves the recipients as they are.
        self.expand = expand

    def _expanded(self, env: Envelope) -> dict:
        """The envelope's changes for its recipients expanded: each target keeps the
        address it came from as its original recipient, and that one's DSN parameters."""
        if self.expand is None:
            return {}
        rcpts: dict[str, None] = {}
        original, notify, orcpt = dict(env.original_rcpts), dict(env.dsn_notify), dict(env.dsn_orcpt)
        for rcpt in env.rcpts:
            for target in self.expand(rcpt):
                if target in rcpts:
                    continue
                rcpts[target] = None
                if target != rcpt:
                    original.setdefault(target, env.original_rcpts.get(rcpt, rcpt))
                    if rcpt in env.dsn_notify:
                        notify.setdefault(target, env.dsn_notify[rcpt])
                    if rcpt in env.dsn_orcpt:
                        orcpt.setdefault(target, env.dsn_orcpt[rcpt])
        if list(rcpts) == env.rcpts:
            return {}
        return {"rcpts": list(rcpts), "original_rcpts": original, "dsn_notify": notify, "dsn_orcpt": orcpt}

    def _prepare(self, env: Envelope) -> Envelope:
        """The envelope as queued: arrival time and the internal client filled in, the
        recipients expanded."""
        changes: dict = self._expanded(env)
        if not env.received_at:
            changes["received_at"] = self.clock.now()
        if env.client is None:
            changes["client"] = ClientInfo(ip="127.0.0.1", name="localhost", helo=self.hostname, proto="internal")
        return dataclasses.replace(env, **changes) if changes else env

    async def inject(self, env: Envelope, content: bytes, origin: str) -> str:
        """Store, record and queue one message; its queue id. Raises what the spool raises.

        origin: what wrote it ("failure notice", "alert", "quota notice", ...), stored
        with the accept event.
        """
        env = self._prepare(env)
        queue_id = new_queue_id(env.received_at)
        if self.signer:
            if len(content) > OFF_LOOP_SIZE:  # a notice that returns a large message
                content = await asyncio.get_running_loop().run_in_executor(None, self.signer.signed, content, env.received_at)
            else:
                content = self.signer.signed(content, env.received_at)
        await self.spool.store(queue_id, env, content)
        self._accepted(queue_id, env, content, origin)
        return queue_id

    def inject_blocking(self, env: Envelope, content: bytes, origin: str) -> str:
        """inject() for a caller outside the event loop (an admin operation's thread)."""
        env = self._prepare(env)
        queue_id = new_queue_id(env.received_at)
        if self.signer:
            content = self.signer.signed(content, env.received_at)
        self.spool.store_blocking(queue_id, env, content)
        self._accepted(queue_id, env, content, origin)
        return queue_id

    def expanded(self, env: Envelope) -> Envelope:
        """The envelope with its recipients expanded as they will be queued."""
        changes = self._expanded(env)
        return dataclasses.replace(env, **changes) if changes else env

    def release_blocking(self, queue_id: str, env: Envelope, content: bytes) -> None:
        """A message accepted earlier into the quarantine enters the queue under the id it
        got then (its accept line and history rows exist; `kanmon trace ID` follows it on):
        stored durably, then handed to the queue manager. The caller records the release."""
        self.spool.store_blocking(queue_id, env, content)  # its recipients are final (release --to expands them)
        self.submit(queue_id, env, content)

    def _accepted(self, queue_id: str, env: Envelope, content: bytes, origin: str) -> None:
        fields = header_fields(content)
        c = env.client
        assert c is not None
        self.records.record(Accepted(
            env.mail_from, len(content), len(env.rcpts), c.proto, "local", fields.get("message-id", ""), origin=origin,
        ), queue_id)
        self.records.history_accept(queue_id, env, len(content), content, fields)
        self.submit(queue_id, env, content)
