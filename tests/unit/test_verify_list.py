"""Recipient verification by list: mailboxes, aliases and a recipients_file that is
re-read when it changes; the cached-result codec. No sockets."""

from __future__ import annotations

import os

import pytest

from kanmon.config import parse_config
from kanmon.policy.pipeline import Context, Outcome, Pipeline, Stage
from kanmon.policy.standard import standard_checks
from kanmon.policy.verify import ProbeResult, RecipientVerifyCheck, unknown_reply
from kanmon.model import ClientInfo
from kanmon.smtp.address import Path
from kanmon.state.api import MemoryState

CONFIG = """
[server]
hostname = "mx1.example.test"
data_dir = "{data_dir}"
[[domain]]
name = "corp.example"
deliver = "relay"
servers = ["127.0.0.7:25"]
verify = "list"
mailboxes = ["alice"]
aliases = {{ sales = ["alice"] }}
{extra}
"""


def rcpt(check_or_pipeline, address: str):
    local, _, domain = address.rpartition("@")
    ctx = Context(ClientInfo(ip="203.0.113.9"), rcpt=Path(address, local, domain.lower()))
    if isinstance(check_or_pipeline, Pipeline):
        return check_or_pipeline.run(Stage.RCPT, ctx)
    return check_or_pipeline.rcpt(ctx)


def test_list_accepts_mailboxes_and_aliases_and_refuses_others(tmp_path):
    cfg = parse_config(CONFIG.format(data_dir=tmp_path, extra=""))
    pipeline = Pipeline(standard_checks(cfg, free_disk=lambda: 10**12))
    assert any(isinstance(c, RecipientVerifyCheck) for c in pipeline.checks)
    pipeline.refresh()
    assert rcpt(pipeline, "alice@corp.example").accepted
    assert rcpt(pipeline, "Sales@corp.example").accepted
    d = rcpt(pipeline, "x@corp.example")
    assert d.outcome is Outcome.REJECT and d.check == "verify"
    assert str(d.reply) == "550 5.1.1 <x@corp.example>: Recipient address rejected: User unknown"
    assert d.reply == unknown_reply("x@corp.example")


def test_recipients_file_is_read_and_reread_when_it_changes(tmp_path):
    f = tmp_path / "corp.recipients"
    f.write_text("# valid recipients\nbob@corp.example\n  Carol@Corp.Example  \n\ndave\n")
    cfg = parse_config(CONFIG.format(data_dir=tmp_path, extra=f'recipients_file = "{f}"'))
    check = RecipientVerifyCheck(cfg)
    assert rcpt(check, "bob@corp.example").outcome is Outcome.ACCEPT
    assert rcpt(check, "carol@corp.example").outcome is Outcome.ACCEPT
    assert rcpt(check, "dave@corp.example").outcome is Outcome.ACCEPT  # a bare local part: this domain
    assert rcpt(check, "erin@corp.example").outcome is Outcome.REJECT
    check.refresh()  # unchanged: nothing happens
    f.write_text("erin@corp.example\n")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert rcpt(check, "erin@corp.example").outcome is Outcome.REJECT  # not before the refresh
    check.refresh()
    assert rcpt(check, "erin@corp.example").outcome is Outcome.ACCEPT
    assert rcpt(check, "bob@corp.example").outcome is Outcome.REJECT
    assert rcpt(check, "alice@corp.example").outcome is Outcome.ACCEPT  # the mailboxes stay
    # A file that vanishes keeps the last list (a rename in progress must not open the gate or close it)
    f.unlink()
    check.refresh()
    assert rcpt(check, "erin@corp.example").outcome is Outcome.ACCEPT
    assert check.lists["corp.example"].error


def test_missing_recipients_file_is_an_error_at_start(tmp_path):
    cfg = parse_config(CONFIG.format(data_dir=tmp_path, extra=f'recipients_file = "{tmp_path}/nope"'))
    with pytest.raises(ValueError, match="recipients_file"):
        RecipientVerifyCheck(cfg)


def test_other_domains_and_verify_none_are_not_asked(tmp_path):
    text = CONFIG.format(data_dir=tmp_path, extra="") + """
[[domain]]
name = "open.example"
deliver = "relay"
servers = ["127.0.0.7:25"]
"""
    check = RecipientVerifyCheck(parse_config(text))
    assert rcpt(check, "anyone@open.example").outcome is Outcome.ACCEPT
    assert rcpt(check, "anyone@elsewhere.example").outcome is Outcome.ACCEPT


def test_callout_needs_the_shared_state(tmp_path):
    cfg = parse_config(CONFIG.format(data_dir=tmp_path, extra="").replace('verify = "list"', 'verify = "callout"'))
    with pytest.raises(ValueError, match="shared state"):
        RecipientVerifyCheck(cfg)
    RecipientVerifyCheck(cfg, state=MemoryState())


def test_probe_result_codec_keeps_only_final_answers():
    r = ProbeResult("unknown", "550 5.1.1 no such user", "127.0.0.7:25", 1000.0)
    assert ProbeResult.decode(r.encode()) == r
    assert ProbeResult.decode(ProbeResult("tempfail", "451", "", 1.0).encode()) is None
    assert ProbeResult.decode("not json") is None
    assert ProbeResult.decode('{"status": "valid"}') is None
