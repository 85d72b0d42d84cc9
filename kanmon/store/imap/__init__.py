"""IMAP4rev1 access to the mail store (RFC 3501, with IDLE, UIDPLUS, LITERAL+, MOVE).

Role: ``ImapService`` binds ``[imap] listen`` (STARTTLS offered, LOGINDISABLED until
then) and ``listen_tls`` (implicit TLS, RFC 8314) and drives one ``ImapSession``
(session.py, I/O-free) per connection through the shared asyncio adapter
(kanmon/store/connection.py). parser.py frames and tokenizes commands; message.py
renders ENVELOPE, BODYSTRUCTURE and body sections.

Trusts: the validated config, the Users and AuthThrottle it is given.
Never: accept credentials before TLS on a plain listener, or bind anything outside the
configured endpoints.
"""

from typing import Any

__all__ = ["ImapService", "ImapSession"]


def __getattr__(name: str) -> Any:
    """ImapService and ImapSession, loaded on first use (kanmon.store.imap.service)."""
    if name in __all__:
        from kanmon.store.imap import service  # noqa: PLC0415

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
