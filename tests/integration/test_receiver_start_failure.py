"""An SMTP receiver process that cannot start (here its [tls] certificate, which the
main process did not load, is not a PEM file) says why before it exits: an error event
in the log and the reason in the pool's one-line error, which `kanmon serve` prints as
`cannot start: ...` (not only "see the log")."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kanmon.receiver import ReceiverPool
from kanmon.records.query import search_events


def test_a_receiver_that_cannot_start_says_why(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    data_dir = tmp_path / "data"
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[server]\nhostname = "mx1.example.test"\ndata_dir = "{data_dir}"\n'
                   f'[tls]\ncert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n')
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    events: list[str] = []

    async def main() -> None:
        pool = ReceiverPool(str(cfg), [{"fd": sock.fileno(), "role": "smtp", "tls": False}], [sock], 1,
                            lambda qid: None, lambda text, kind="info": events.append(text))
        with pytest.raises(OSError) as failed:
            await pool.start(ready_timeout=60)
        assert "exited before it was ready" in str(failed.value)
        assert "SSLError" in str(failed.value) and "\n" not in str(failed.value), str(failed.value)

    try:
        data_dir.mkdir(mode=0o700)
        asyncio.run(main())
    finally:
        sock.close()
    assert any("SMTP receiver 0" in e.text and "cannot start: SSLError" in e.text and e.kind == "error"
               for e in search_events(data_dir)), [e.text for e in search_events(data_dir)]
