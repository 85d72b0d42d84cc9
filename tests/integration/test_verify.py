"""Recipient verification over real sockets: a kanmon relay in front of a mail store (the
test sink, which records every command). Unknown recipients are refused at RCPT by list
and by callout, the probe never sends DATA, the cache answers the second time, a store
that is down gives 450 (or an accept when configured), a recipients_file change is
picked up without a restart, and nothing refused is ever queued or bounced."""

from __future__ import annotations

import asyncio
import json
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from kanmon.config import parse_config
from kanmon.policy.pipeline import Context, Outcome
from kanmon.policy.verify import RecipientVerifyCheck
from kanmon.model import ClientInfo
from kanmon.records.query import search_history
from kanmon.smtp.address import Path as AddrPath
from kanmon.state.api import MemoryState
from tests.support.kanmon_node import TEST_DEFAULT_PROFILE, RunningNode, free_port, wait_for
from tests.support.smtpsink import SmtpSink, tls_server_context

STORE = "127.0.0.7"
CLIENT = "127.0.0.9"  # an internet client: not in relay_networks

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[smtp]
listen = ["127.0.0.1:{port}"]
relay_networks = ["127.0.0.1/32"]
min_free_disk = "1MB"
greet_pause = "0s"
[outbound]
connect_timeout = "5s"
command_timeout = "5s"
[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["{store}"]
tls = "none"
verify = "{verify}"
verify_unreachable = "{unreachable}"
{extra}
""" + TEST_DEFAULT_PROFILE  # clients outside relay_networks send from unknown domains


def config_text(data_dir: Path, store: str, *, port: int | None = None, verify: str = "callout",
                unreachable: str = "tempfail", extra: str = "") -> str:
    return CONFIG.format(data_dir=data_dir, port=port or free_port(), store=store, verify=verify,
                         unreachable=unreachable, extra=extra)


@pytest.fixture
def store():
    with SmtpSink(STORE, hostname="store.corp.example") as sink:
        sink.default_rcpt_reply = "550 5.1.1 User unknown in virtual mailbox table"
        sink.rcpt_replies = {"alice@corp.example": "250 2.1.5 Ok"}
        yield sink


def start_node(tmp_path: Path, store: SmtpSink, **kw) -> RunningNode:
    return RunningNode(parse_config(config_text(tmp_path / "data", store.address, **kw)))  # started by `with`


def client(node: RunningNode) -> smtplib.SMTP:
    s = smtplib.SMTP(node.host, node.port, source_address=(CLIENT, 0), timeout=20)
    s.ehlo("client.example")
    return s


def rcpt_probes(store: SmtpSink, address: str | None = None) -> list[str]:
    return [c for c in store.commands if c.upper().startswith("RCPT") and (address is None or address in c.lower())]


def queued(node: RunningNode) -> list[Path]:
    return [p for p in (node.data_dir / "spool").rglob("*") if p.is_file() and "queue" in p.parts]


def assert_nothing_queued_or_bounced(node: RunningNode, store: SmtpSink) -> None:
    node.wait_idle()
    assert queued(node) == []
    assert store.messages == []  # nothing reached the store (no message, no bounce)
    assert not any(c.upper().startswith("DATA") for c in store.commands)
    assert [r for r in search_history(node.data_dir) if r.disposition == "Accept"] == []


def test_callout_refuses_unknown_at_rcpt_and_the_cache_answers_the_second_time(tmp_path, store):
    with start_node(tmp_path, store) as node:
        with client(node) as s:
            s.mail("forged@spammer.example")
            code, text = s.rcpt("nobody@corp.example")
            assert (code, text) == (550, b"5.1.1 <nobody@corp.example>: Recipient address rejected: User unknown")
            s.rset()
            s.mail("someone@remote.example")
            assert s.rcpt("alice@corp.example")[0] == 250
            s.rset()
        with client(node) as s:  # a second session: both answers come from the cache
            s.mail("forged@spammer.example")
            assert s.rcpt("nobody@corp.example")[0] == 550
            assert s.rcpt("alice@corp.example")[0] == 250
            s.rset()
        assert len(rcpt_probes(store, "nobody@corp.example")) == 1
        assert len(rcpt_probes(store, "alice@corp.example")) == 1
        # the probe: MAIL FROM:<>, RCPT, RSET, QUIT; never DATA
        assert {c.split(":")[0].split(" ")[0].upper() for c in store.commands} <= {"EHLO", "MAIL", "RCPT", "RSET", "QUIT"}
        assert all(c == "MAIL FROM:<>" for c in store.commands if c.upper().startswith("MAIL"))
        # every refusal names the check
        node.flush()
        rejects = [r for r in search_history(node.data_dir) if r.disposition == "Reject"]
        assert rejects and all(r.rcpt == "nobody@corp.example" for r in rejects)
        assert_nothing_queued_or_bounced(node, store)


def test_our_users_morning_500_messages_to_unknown_recipients_zero_queued_zero_bounces(tmp_path, store):
    """The relay that used to hold ~2,000 bounces every morning: 500 messages from forged
    senders to unknown recipients of a relay domain with verify = "callout"."""
    with start_node(tmp_path, store) as node:
        refused = 0
        for conn in range(100):  # 5 a session: more would reach the session's max_errors
            with client(node) as s:
                for i in range(5):
                    n = conn * 5 + i
                    s.mail(f"forged{n}@victim{n % 7}.example")
                    code, _ = s.rcpt(f"user{n % 100}@corp.example")
                    refused += code == 550
                    s.rset()
        assert refused == 500
        assert len(rcpt_probes(store)) == 100  # one probe per distinct address; the rest from the cache
        assert_nothing_queued_or_bounced(node, store)


def test_store_down_gives_450_then_the_answer_when_it_is_back(tmp_path, store):
    with start_node(tmp_path, store) as node:
        store.stop()
        with client(node) as s:
            s.mail("someone@remote.example")
            code, text = s.rcpt("nobody@corp.example")
            assert code == 450 and text.startswith(b"4.1.1 <nobody@corp.example>: Recipient address rejected")
            s.rset()
        store.start()
        with client(node) as s:  # nothing was cached: asked again
            s.mail("someone@remote.example")
            assert s.rcpt("nobody@corp.example")[0] == 550
            s.rset()
        assert_nothing_queued_or_bounced(node, store)


def test_store_answers_temporarily_gives_450_and_is_not_cached(tmp_path, store):
    store.rcpt_replies["busy@corp.example"] = "451 4.3.0 try later"
    with start_node(tmp_path, store) as node:
        for _ in range(2):
            with client(node) as s:
                s.mail("someone@remote.example")
                assert s.rcpt("busy@corp.example")[0] == 450
                s.rset()
        assert len(rcpt_probes(store, "busy@corp.example")) == 2


def test_verify_unreachable_accept_accepts_when_the_store_is_down(tmp_path, store):
    with start_node(tmp_path, store, unreachable="accept") as node:
        store.stop()
        with client(node) as s:
            s.mail("someone@remote.example")
            assert s.rcpt("whoever@corp.example")[0] == 250
            s.rset()


def test_list_refuses_unknown_and_picks_up_a_recipients_file_change_without_restart(tmp_path, store):
    f = tmp_path / "corp.recipients"
    f.write_text("bob@corp.example\n")
    with start_node(tmp_path, store, verify="list", extra=f'mailboxes = ["alice"]\nrecipients_file = "{f}"') as node:
        with client(node) as s:
            s.mail("forged@spammer.example")
            assert s.rcpt("alice@corp.example")[0] == 250
            assert s.rcpt("bob@corp.example")[0] == 250
            code, text = s.rcpt("carol@corp.example")
            assert (code, text) == (550, b"5.1.1 <carol@corp.example>: Recipient address rejected: User unknown")
            s.rset()
        f.write_text("bob@corp.example\ncarol@corp.example\n")

        def carol_accepted() -> bool:
            with client(node) as s:
                s.mail("someone@remote.example")
                ok = s.rcpt("carol@corp.example")[0] == 250
                s.rset()
                return ok

        wait_for(carol_accepted, 10, "the new recipients_file is read")  # the listener's probe round, about 1 s
        assert rcpt_probes(store) == []  # a list never asks the store
        assert_nothing_queued_or_bounced(node, store)


def test_a_valid_recipient_is_relayed_to_the_store(tmp_path, store):
    with start_node(tmp_path, store) as node:
        with client(node) as s:
            s.sendmail("someone@remote.example", ["alice@corp.example"], "Subject: hi\r\n\r\nbody\r\n")
        store.wait_for_messages(1)
        assert store.messages[0].rcpts == ["alice@corp.example"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)")
def test_done_when_swaks_to_a_wrong_address_gets_550_at_rcpt_and_the_queue_stays_empty(tmp_path, store):
    with start_node(tmp_path, store) as node:
        out = subprocess.run(
            ["swaks", "--server", f"{node.host}:{node.port}", "--from", "someone@remote.example",
             "--to", "wrong@corp.example", "--helo", "client.example", "--timeout", "20"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode != 0
        assert "<** 550 5.1.1 <wrong@corp.example>: Recipient address rejected: User unknown" in out.stdout
        assert not any(line.startswith(" -> DATA") for line in out.stdout.splitlines())
        assert_nothing_queued_or_bounced(node, store)


# ---------------------------------------------------------------------------
# The check on its own, on a clock the test advances (the cache's lifetimes).


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_cache_lifetimes_and_background_refresh(tmp_path, store):
    cfg = parse_config(config_text(tmp_path, store.address, extra='verify_positive_ttl = "4d"\nverify_negative_ttl = "1h"'))
    clock = Clock()
    state = MemoryState()

    async def run() -> None:
        check = RecipientVerifyCheck(cfg, state=state, clock=clock)

        async def answer(address: str):
            local, _, domain = address.rpartition("@")
            r = check.rcpt(Context(ClientInfo(ip="203.0.113.9"), rcpt=AddrPath(address, local, domain)))
            return (await r) if asyncio.iscoroutine(r) else r

        assert (await answer("alice@corp.example")).outcome is Outcome.ACCEPT
        assert (await answer("nobody@corp.example")).outcome is Outcome.REJECT
        assert check.probes == 2
        clock.now += 60  # past the process memo: from the shared cache
        assert (await answer("alice@corp.example")).outcome is Outcome.ACCEPT
        assert (await answer("nobody@corp.example")).outcome is Outcome.REJECT
        assert check.probes == 2
        # the negative entry expires after 1 h: probed again
        clock.now += 3600
        assert (await answer("nobody@corp.example")).outcome is Outcome.REJECT
        assert check.probes == 3
        # the positive entry near its end (last quarter of 4 d): answered from the cache at
        # once, and re-probed in the background
        clock.now += 3.5 * 86400
        assert (await answer("alice@corp.example")).outcome is Outcome.ACCEPT
        assert check.probes == 4
        await asyncio.gather(*check._inflight.values())
        entry = state.cache("verify").get("alice@corp.example", clock.now)
        assert entry is not None and entry.stored == clock.now  # refreshed
        # the store now says the address is gone: the next probe (after the lifetime) says so
        store.rcpt_replies.pop("alice@corp.example")
        clock.now += 5 * 86400
        assert (await answer("alice@corp.example")).outcome is Outcome.REJECT
        await check.aclose()

    asyncio.run(run())
    assert len(rcpt_probes(store)) == 5
    assert not any(c.upper().startswith("DATA") for c in store.commands)


def test_a_warm_rcpt_answers_from_the_process_memo_at_once_without_decoding(tmp_path, store, monkeypatch):
    """The accept path is benchmarked: within the memo's life a RCPT answers without an
    await and without decoding the stored result again (nor touching the shared state)."""
    from kanmon.policy import verify

    cfg = parse_config(config_text(tmp_path, store.address))
    state = MemoryState()

    async def run() -> None:
        check = RecipientVerifyCheck(cfg, state=state, clock=Clock())
        ctx = Context(ClientInfo(ip="203.0.113.9"), rcpt=AddrPath("alice@corp.example", "alice", "corp.example"))
        first = check.rcpt(ctx)
        assert asyncio.iscoroutine(first) and (await first).outcome is Outcome.ACCEPT

        def no_decode(text):
            raise AssertionError("decoded again")

        monkeypatch.setattr(verify.ProbeResult, "decode", staticmethod(no_decode))
        monkeypatch.setattr(check, "state", None)  # any use of the shared state would fail
        for _ in range(3):
            r = check.rcpt(ctx)
            assert not asyncio.iscoroutine(r) and r.outcome is Outcome.ACCEPT
        await check.aclose()

    asyncio.run(run())
    assert len(rcpt_probes(store)) == 1


def test_probes_per_server_are_limited(tmp_path, store):
    cfg = parse_config(config_text(tmp_path, store.address))
    store.hang = None

    async def run() -> int:
        check = RecipientVerifyCheck(cfg, state=MemoryState(), max_probes_per_server=2)
        sem = check.limits[tuple(cfg.domain[0].servers[0])]
        peak = 0
        orig = sem.acquire

        async def acquire():
            nonlocal peak
            r = await orig()
            peak = max(peak, 2 - sem._value)
            return r

        sem.acquire = acquire  # type: ignore[method-assign]
        results = await asyncio.gather(*(check.explain(f"u{i}@corp.example") for i in range(8)))
        assert all(r.reply is not None and r.reply.code == 550 for r in results)
        await check.aclose()
        return peak

    assert asyncio.run(run()) == 2
    assert len(rcpt_probes(store)) == 8


def kanmon_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kanmon", *args], capture_output=True, text=True, timeout=60)


def test_kanmon_verify_shows_the_answer_and_why_and_manages_the_cache(tmp_path, store):
    port = free_port()
    text = config_text(tmp_path / "data", store.address, port=port)
    cfg = tmp_path / "k.toml"
    cfg.write_text(text)
    with RunningNode(parse_config(text)) as node:
        with client(node) as s:  # the listener caches alice
            s.mail("someone@remote.example")
            assert s.rcpt("alice@corp.example")[0] == 250
            s.rset()
        out = kanmon_cli("verify", "nobody@corp.example", "-c", str(cfg))
        assert out.returncode == 1, out.stderr
        assert out.stdout.splitlines()[0] == (
            "RCPT TO:<nobody@corp.example> -> 550 5.1.1 <nobody@corp.example>: Recipient address rejected: User unknown")
        assert f"by: probe: {store.address} said: 550 5.1.1 User unknown in virtual mailbox table" in out.stdout
        out = kanmon_cli("verify", "nobody@corp.example", "-c", str(cfg), "--json")
        answer = json.loads(out.stdout)
        assert answer["source"] == "cache" and answer["accepted"] is False and answer["result"]["status"] == "unknown"
        out = kanmon_cli("verify", "address", "alice@corp.example", "-c", str(cfg))
        assert out.returncode == 0 and "-> 250 2.1.5 Ok" in out.stdout and "by: cache hit" in out.stdout
        assert len(rcpt_probes(store)) == 2  # the command used the listener's cache entry for alice
        out = kanmon_cli("verify", "cache", "list", "-c", str(cfg), "--json")
        rows = {r["address"]: r for r in map(json.loads, out.stdout.splitlines())}
        assert rows.keys() == {"alice@corp.example", "nobody@corp.example"}
        assert rows["alice@corp.example"]["status"] == "valid"
        out = kanmon_cli("verify", "cache", "flush", "nobody@", "-c", str(cfg))
        assert out.stdout.strip() == "1 cached result(s) flushed"
        out = kanmon_cli("verify", "cache", "list", "-c", str(cfg))
        assert "alice@corp.example  valid" in out.stdout and "nobody" not in out.stdout
        out = kanmon_cli("verify", "not an address", "-c", str(cfg))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert not any(c.upper().startswith("DATA") for c in store.commands)


def test_rcpt_does_not_wait_for_a_slow_store_beyond_probe_wait(tmp_path, store):
    cfg = parse_config(config_text(tmp_path, store.address))
    store.hang = "greeting"

    async def run() -> None:
        check = RecipientVerifyCheck(cfg, state=MemoryState(), probe_wait=0.1, probe_timeout=1.0)
        ex = await check.explain("nobody@corp.example")
        assert ex.reply is not None and ex.reply.code == 450 and ex.reply.enhanced == "4.1.1"
        assert "still probing" in ex.why
        (task,) = check._inflight.values()
        assert (await task).status == "unreachable"  # timed out: nothing cached
        store.hang = None
        ex = await check.explain("nobody@corp.example")
        assert ex.reply is not None and ex.reply.code == 550 and ex.source == "probe"
        await check.aclose()

    asyncio.run(run())


def test_the_probe_uses_starttls_as_the_domains_tls_policy_says(tmp_path):
    ca = trustme.CA()
    with SmtpSink(STORE, hostname="store.corp.example", ssl_context=tls_server_context(ca, "127.0.0.7")) as sink:
        sink.default_rcpt_reply = "550 5.1.1 User unknown"
        cfg = parse_config(config_text(tmp_path, sink.address).replace('tls = "none"', 'tls = "required"'))

        async def run():
            check = RecipientVerifyCheck(cfg, state=MemoryState())
            try:
                return await check.explain("nobody@corp.example")
            finally:
                await check.aclose()

        ex = asyncio.run(run())
        assert ex.reply is not None and ex.reply.code == 550
        verbs = [c.split(" ")[0].split(":")[0].upper() for c in sink.commands]
        assert verbs[:2] == ["EHLO", "STARTTLS"] and "RCPT" in verbs[2:] and "DATA" not in verbs
