"""Coverage-guided fuzz target (atheris, libFuzzer) for the SMTP command and address parsers.

Role: feed arbitrary bytes to kanmon.smtp.address.parse_path (MAIL FROM / RCPT TO
arguments) and to a whole kanmon.smtp.session.Session (command lines, DATA, AUTH, the
dot-stuffing and line-end checks), and crash on anything the code must never do:
- parse_path raising anything but SmtpError, or returning a path with a control
  character, a routed local part or an over-long part (RFC 5321 4.5.3.1);
- the session raising at all (the listener would answer 451 4.3.0; it is still a bug),
  holding more than one partial command line in command mode, or handing over for
  storage content with a bare CR or LF (SMTP smuggling, CVE-2023-51764/5/6).

Run briefly in CI by tests/fuzz/test_fuzz_smtp.py; for a long run, by hand:

    python tests/fuzz/fuzz_smtp.py -max_total_time=3600 -max_len=4096 tests/fuzz/corpus
    (mkdir -p tests/fuzz/corpus first; it keeps the inputs that found new coverage)

A crash leaves crash-<sha1> in the current directory; rerun it with
`python tests/fuzz/fuzz_smtp.py crash-<sha1>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Only kanmon is instrumented: the libraries are not the target, and instrumenting them
# (pydantic and the rest) took ~20 s of every run's start.
with atheris.instrument_imports(include=["kanmon"]):
    from kanmon.config import parse_config
    from kanmon.model import ClientInfo, SmtpError
    from kanmon.policy.standard import standard_pipeline
    from kanmon.smtp.address import MAX_DOMAIN, MAX_LOCAL_PART, parse_path
    from kanmon.smtp.session import MAX_COMMAND_LINE, Authenticate, Session, SessionSettings, StartTls, StoreMessage

CONFIG = parse_config("""
[server]
hostname = "mx1.example.test"
data_dir = "/nonexistent"
[smtp]
relay_networks = ["127.0.0.1/32"]
max_message_size = "20KB"
max_recipients = 100
min_free_disk = "0"
[[domain]]
name = "example.test"
mailboxes = ["alice", "bob"]
aliases = { info = ["alice", "bob"] }
""")
POLICY = standard_pipeline(CONFIG, free_disk=lambda: 10**12)
POLICY.refresh()


def check_path(text: str, is_sender: bool, utf8: bool) -> None:
    try:
        p = parse_path(text, is_sender=is_sender, smtputf8_allowed=utf8)
    except SmtpError:
        return
    if any(ord(c) < 32 or ord(c) == 127 for c in p.address):
        raise AssertionError(f"control character accepted: {p.address!r}")
    if p.address and p.local and not p.local.startswith('"'):
        if any(c in p.local for c in "%!@"):
            raise AssertionError(f"routed local part accepted: {p.address!r}")
        if len(p.local.encode()) > MAX_LOCAL_PART or len(p.domain.encode()) > MAX_DOMAIN:
            raise AssertionError(f"over-long address accepted: {p.address!r}")


def run_session(data: bytes, cuts: list[int], ip: str, submission: bool) -> None:
    settings = SessionSettings(hostname="mx1.example.test", max_message_size=CONFIG.smtp.max_message_size,
                               max_recipients=100, max_errors=50, submission=submission,
                               sender_addresses=lambda user: {user})
    s = Session(settings, POLICY, ClientInfo(ip=ip), now=1_700_000_000.0)
    s.greeting()
    last = 0
    for cut in sorted(cuts) + [len(data)]:
        chunk = data[last:cut]
        last = max(last, cut)
        actions = s.feed(chunk)
        while actions:
            follow: list = []
            for a in actions:
                if isinstance(a, StoreMessage):
                    c = a.content
                    if not (c.count(b"\r") == c.count(b"\n") == c.count(b"\r\n")):
                        raise AssertionError("content with a bare CR or LF handed over for storage")
                    follow = s.message_stored(a.queue_id)
                elif isinstance(a, StartTls):
                    follow = s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
                elif isinstance(a, Authenticate):
                    follow = s.auth_result(a.username if a.password == "right" else None)
            actions = follow
        if not s.waiting and s.buffered() > MAX_COMMAND_LINE:
            raise AssertionError(f"{s.buffered()} bytes held in command mode")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:
        check_path(fdp.ConsumeUnicodeNoSurrogates(400), fdp.ConsumeBool(), fdp.ConsumeBool())
        return
    ip = "127.0.0.1" if fdp.ConsumeBool() else "192.0.2.9"
    cuts = [fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    prefix = b"EHLO fuzz\r\n" if mode == 2 else (b"EHLO fuzz\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n" if mode == 3 else b"")
    run_session(prefix + fdp.ConsumeBytes(fdp.remaining_bytes()), cuts, ip, submission=mode == 1)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
