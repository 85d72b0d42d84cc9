"""The listening sockets of a node, by configured address, kept across reloads.

Role: a reload binds only the addresses that are new, before anything of the old
configuration stops (prepare), and keeps the very same listening socket for an address
that did not change, so no connection attempt is refused meanwhile (commit). Every
server gets its own duplicate of a socket (dup()): closing a server that retires closes
its duplicate, never the listening socket its successor accepts on.

Trusts: addresses from a validated config. Never: close a socket that a committed
configuration still lists; leave a freshly bound socket open when a prepare fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

Address = tuple[str, int]


async def stop_accepting(servers: Iterable[asyncio.AbstractServer]) -> None:
    """Close servers that retire without losing a connection they already took from the
    shared listening socket. asyncio's selector loop accepts in one callback and makes the
    transport in a task that runs later: a server closed in between drops that connection
    without a word (its transport cannot attach to a closed server). So readiness stops
    first, the pending tasks run, then the servers close. uvloop makes the transport at
    once but calls connection_made() on the next loop turn: one more turn after closing
    lets those connections register with their server before it counts them."""
    servers = list(servers)
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        for server in servers:
            for sock in server.sockets:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
    for server in servers:
        server.close()
    for _ in range(3):
        await asyncio.sleep(0)


def bind_listener(host: str, port: int) -> socket.socket:
    """A non-blocking, inheritable listening socket; OSError names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on accepted sockets only when the listener's
    # proto is IPPROTO_TCP (with Nagle, replies written one after another are held back).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    sock.setblocking(False)
    return sock


@dataclass
class Prepared:
    """The sockets a configuration would listen on: reused ones and fresh ones."""

    sockets: dict[Address, socket.socket] = field(default_factory=dict)
    fresh: list[Address] = field(default_factory=list)

    def dup(self, address: Address) -> socket.socket:
        """A duplicate for one server (it closes its duplicate when it stops)."""
        sock = self.sockets[address].dup()
        sock.setblocking(False)
        sock.set_inheritable(True)
        return sock


class ListenSockets:
    """The node's listening sockets; prepare() for a config, then commit() or abort()."""

    def __init__(self) -> None:
        self.held: dict[Address, socket.socket] = {}

    def prepare(self, addresses: Iterable[Address]) -> Prepared:
        """Reuse what is held, bind what is new; on OSError nothing new stays bound."""
        prepared = Prepared()
        try:
            for address in addresses:
                if address in prepared.sockets:  # two listeners cannot share one address
                    raise OSError(errno.EADDRINUSE, f"cannot listen on {address[0]}:{address[1]}: "
                                                    "listed twice in the config")
                held = self.held.get(address)
                if held is not None:
                    prepared.sockets[address] = held
                else:
                    prepared.sockets[address] = bind_listener(*address)
                    prepared.fresh.append(address)
        except OSError:
            self.abort(prepared)
            raise
        return prepared

    def abort(self, prepared: Prepared) -> None:
        """Close what prepare() bound (the held sockets stay)."""
        for address in prepared.fresh:
            sock = prepared.sockets.pop(address, None)
            if sock is not None:
                sock.close()
        prepared.fresh.clear()

    def commit(self, prepared: Prepared) -> None:
        """Make `prepared` the held set; close held sockets it no longer lists (the
        servers that retire keep their duplicates until they stop)."""
        for address, sock in self.held.items():
            if prepared.sockets.get(address) is not sock:
                sock.close()
        self.held = dict(prepared.sockets)
        prepared.fresh.clear()

    def close(self) -> None:
        for sock in self.held.values():
            sock.close()
        self.held = {}
