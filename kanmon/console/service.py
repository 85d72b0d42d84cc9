"""The console as a node service: uvicorn on the node's listening socket, in its event loop.

Role: build the Starlette application (kanmon.console.app) and serve it with uvicorn on
the socket the node bound ([console] listen), with the node's TLS context
(kanmon.tlscert.server_context: the [tls] certificate or the self-signed pair) unless
`tls = false` (allowed only on loopback: the config refuses it elsewhere). A reload
replaces it like every listener (start, retire, stop). uvicorn's own signal handling and
logging are left out: the node owns SIGTERM/SIGHUP, and failures go to the event log.

Trusts: the node and its validated config. Never: install signal handlers, or import
the web stack before start() (a node without [console] pays nothing for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl


class ConsoleServer:
    def __init__(self, node, config, sock: socket.socket, tls: ssl.SSLContext | None):
        self.node = node
        self.config = config
        self.sock = sock
        self.tls = tls
        self._server = None
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def start(self) -> None:
        import uvicorn  # noqa: PLC0415 - the web stack only when a console is configured

        from kanmon.console.app import ConsoleApp  # noqa: PLC0415

        app = ConsoleApp(self.node, self.config).app
        cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
                             loop="none", proxy_headers=False, server_header=False, timeout_keep_alive=15,
                             timeout_graceful_shutdown=5, h11_max_incomplete_event_size=64 * 1024)
        cfg.load()
        cfg.ssl = self.tls  # the node's context, not a second loading of the files

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the node owns the signals
                yield

        server = Server(cfg)
        server.lifespan = cfg.lifespan_class(cfg)
        await server.startup(sockets=[self.sock])
        if server.should_exit:
            raise OSError(f"the console could not listen on {self.config.console.listen}")
        self._server = server
        self._task = asyncio.create_task(self._run(server), name="console")

    async def _run(self, server) -> None:
        await server.main_loop()
        await server.shutdown(sockets=[self.sock])

    async def retire(self) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._server = None
