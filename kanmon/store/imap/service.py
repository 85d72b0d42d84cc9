"""The IMAP listeners of `kanmon serve` (ImapService; the package docstring says more).

Kept apart from the package's __init__ so that importing one of its pure modules (the
cache entries a delivery agent writes, kanmon.store.imap.cache) does not load the
listener, the session and the password hashing.
"""


from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

from kanmon.config import Config
from kanmon.store.connection import AccessService, PeerInfo
from kanmon.store.imap.session import IDLE_POLL, IDLE_TIMEOUT, ImapSession
from kanmon.store.users import AuthThrottle, Users

__all__ = ["ImapService", "ImapSession"]


class ImapService(AccessService):
    """The IMAP listeners of ``kanmon serve`` (see AccessService).

    ``max_literal`` bounds APPEND (default: ``smtp.max_message_size``).
    """

    protocol = "IMAP"
    refusals = (b"* BYE [UNAVAILABLE] too many connections\r\n",
                b"* BYE [UNAVAILABLE] too many connections from your address\r\n")

    def __init__(
        self,
        config: Config,
        tls_context: ssl.SSLContext | None,
        users: Users,
        throttle: AuthThrottle,
        emit: Callable[..., None],
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        idle_poll: float = IDLE_POLL,
        max_literal: int | None = None,
        max_connections: int | None = None,
        sockets: list[tuple[socket.socket, bool]] | None = None,
    ):
        self.idle_timeout = idle_timeout
        self.idle_poll = idle_poll
        self.max_literal = max_literal if max_literal is not None else config.smtp.max_message_size
        super().__init__(config, config.imap, tls_context, users, throttle, emit, max_connections=max_connections,
                         sockets=sockets)

    def _session(self, peer: PeerInfo, implicit: bool) -> ImapSession:
        return ImapSession(
            hostname=self.config.server.hostname,
            users=self.users,
            throttle=self.throttle,
            peer=peer,
            tls_available=self.tls_context is not None,
            emit=self.emit,
            max_literal=self.max_literal,
            idle_timeout=self.idle_timeout,
            idle_poll=self.idle_poll,
        )
