"""The Sieve compiler and interpreter (kanmon.store.sieve) against RFC 5228's examples,
its limits, the vacation rules (kanmon.store.vacation) and the script store."""

from __future__ import annotations

import os

import pytest

from kanmon.store.sieve import (
    MAX_NESTING,
    MessageView,
    SieveError,
    compile_script,
    evaluate,
    parse_headers,
    wildcard_match,
)
from kanmon.store.sievescripts import ActiveScripts, ScriptError, ScriptStore
from kanmon.store.vacation import VacationMemory, build_reply, handle_of, refusal

# RFC 5228 9 (the big example), as printed there.
RFC_EXAMPLE = r'''
#
# Example Sieve Filter
# Declare any optional features or extension used by the script
#
require ["fileinto"];

#
# Handle messages from known mailing lists
# Move messages from IETF filter discussion list to filter mailbox
#
if header :is "Sender" "owner-ietf-mta-filters@imc.org"
        {
        fileinto "filter";  # move to "filter" mailbox
        }
#
# Keep all messages to or from people in my company
#
elsif address :DOMAIN :is ["From", "To"] "example.com"
        {
        keep;               # keep in "In" mailbox
        }

#
# Try and catch unsolicited email.  If a message is not to me,
# or it contains a subject known to be spam, file it away.
#
elsif anyof (NOT address :all :contains
               ["To", "Cc", "Bcc"] "me@example.com",
             header :matches "subject"
               ["*make*money*fast*", "*university*dipl*mas*"])
        {
        fileinto "spam";   # move to "spam" mailbox
        }
else
        {
        # Move all other (non-company) mail to "personal"
        # mailbox.
        fileinto "personal";
        }
'''


def view(head: str, mail_from: str = "a@b.example", rcpt: str = "me@example.com", size: int = 100) -> MessageView:
    return MessageView(parse_headers(head.encode() + b"\r\n\r\nbody\r\n"), mail_from, rcpt, size)


def run(script: str, head: str, **kw) -> list[str]:
    return evaluate(compile_script(script), view(head, **kw)).folders


@pytest.mark.parametrize("head, folders", [
    ("Sender: owner-ietf-mta-filters@imc.org\r\nTo: me@example.com", ["filter"]),
    ("From: boss@example.com\r\nTo: me@other.example", ["INBOX"]),
    ("From: x@spam.example\r\nTo: someone@else.example", ["spam"]),
    ("From: x@spam.example\r\nTo: me@example.org\r\nSubject: Make MONEY fast", ["spam"]),
    ("From: friend@home.example\r\nTo: Me <me@example.com.au>\r\nSubject: hi", ["personal"]),
])
def test_rfc5228_section9_example(head, folders):
    assert run(RFC_EXAMPLE, head) == folders


def test_multiline_text_and_dot_stuffing():
    # RFC 5228 2.4.2: a line starting with ".." loses one dot; the final "." ends it.
    script = 'require "vacation";\nvacation text:\nI am away.\n..dot\n.\n;\n'
    out = evaluate(compile_script(script), view("From: a@b.example\r\nTo: me@example.com"))
    assert out.vacation is not None and out.vacation.reason == "I am away.\r\n.dot\r\n"
    assert out.folders == ["INBOX"]  # vacation does not cancel the implicit keep


def test_quoted_string_escapes_and_comments():
    script = 'require "fileinto"; /* a\n comment */ if header :is "Subject" "say \\"hi\\" \\\\ \\x" { fileinto "q"; }'
    assert run(script, 'Subject: say "hi" \\ x') == ["q"]


@pytest.mark.parametrize("value, pattern, hit", [
    ("make lots of money fast", "*make*money*fast*", True),
    ("abc", "a?c", True),
    ("abc", "a?d", False),
    ("a*c", "a\\*c", True),
    ("abc", "a\\*c", False),
    ("", "*", True),
    ("x" * 3000, "*" * 50 + "y", False),  # no exponential backtracking
])
def test_wildcard(value, pattern, hit):
    assert wildcard_match(value, pattern) is hit


def test_comparators_and_match_types():
    head = "Subject: Hello World"
    assert run('require "fileinto"; if header :contains "subject" "hello" { fileinto "a"; }', head) == ["a"]
    assert run('require "fileinto"; if header :comparator "i;octet" :contains "subject" "hello" { fileinto "a"; }',
               head) == ["INBOX"]
    assert run('require "fileinto"; if header :comparator "i;octet" :is "subject" "Hello World" { fileinto "a"; }',
               head) == ["a"]
    with pytest.raises(SieveError, match="unsupported comparator"):
        compile_script('if header :comparator "i;unicode-casemap" "subject" "x" { keep; }')


def test_envelope_exists_size_and_encoded_headers():
    script = ('require ["fileinto", "envelope"];\n'
              'if envelope :domain :is "from" "lists.example" { fileinto "lists"; stop; }\n'
              'if not exists "x-spam" { if size :over 1K { fileinto "big"; stop; } }\n'
              'if header :contains "subject" "請求書" { fileinto "invoices"; }\n')
    assert run(script, "Subject: x", mail_from="news@lists.example") == ["lists"]
    assert run(script, "Subject: x", size=2000) == ["big"]
    assert run(script, "X-Spam: yes\r\nSubject: x", size=2000) == ["INBOX"]
    assert run(script, "Subject: =?ISO-2022-JP?B?GyRCQEE1YT1xGyhC?=") == ["invoices"]


def test_discard_redirect_copy_and_stop():
    out = evaluate(compile_script('discard;'), view("Subject: x"))
    assert out.folders == [] and out.discarded
    out = evaluate(compile_script('redirect "bob@example.net";'), view("Subject: x"))
    assert out.folders == [] and out.redirects == ["bob@example.net"]
    out = evaluate(compile_script('require "copy"; redirect :copy "bob@example.net"; stop; discard;'), view("S: x"))
    assert out.folders == ["INBOX"] and out.redirects == ["bob@example.net"]
    out = evaluate(compile_script('require ["fileinto", "mailbox"]; fileinto :create "New"; keep;'), view("S: x"))
    assert out.folders == ["New", "INBOX"] and out.created == {"New"}


def test_work_limit_keeps_the_message():
    keys = ", ".join('"' + "*a" * 400 + f'{i}"' for i in range(40))
    script = compile_script(f'require "fileinto"; if header :matches "subject" [{keys}] {{ fileinto "x"; }}')
    out = evaluate(script, view("Subject: " + "a" * 4000))
    assert out.folders == ["INBOX"] and "work limit" in out.errors[0]


def test_runtime_limit_keeps_the_message():
    script = "".join(f'redirect "u{i}@example.net";\n' for i in range(6))
    out = evaluate(compile_script(script), view("S: x"), max_redirects=4)
    assert out.folders == ["INBOX"] and out.redirects == [] and "redirects" in out.errors[0]


@pytest.mark.parametrize("script, line, reason", [
    ('fileinto "x";', 1, 'fileinto needs require "fileinto"'),
    ('require "fileinto";\nfileinto :create "Reports";', 2, 'fileinto :create needs require "mailbox"'),
    ('require "fileinto";\nfileinto :copy "Reports";', 2, 'fileinto :copy needs require "copy"'),
    ('redirect :copy "a@example.net";', 1, 'redirect :copy needs require "copy"'),
    ('keep;\nrequire "fileinto";', 2, "require must come before"),
    ('require "regex";', 1, "unsupported extension"),
    ('if true {\n keep;\n', 2, "missing '}'"),
    ('\n\nfrobnicate;', 3, "unknown command"),
    ('if header :is "a" { keep; }', 1, "header needs"),
    ('elsif true { keep; }', 1, "without an if"),
    ('redirect "not an address";', 1, "not a mail address"),
    ('keep', 1, "unexpected end"),
    ('if header :is :contains "a" "b" { keep; }', 1, "conflicting"),
    ('"x";', 1, "expected a command"),
    ('require "fileinto";\nfileinto "../etc";', 2, "cannot name a folder"),
])
def test_refused_scripts_name_line_and_reason(script, line, reason):
    with pytest.raises(SieveError) as err:
        compile_script(script)
    assert err.value.line == line and reason in err.value.reason


def test_limits():
    deep = "if true { " * (MAX_NESTING + 1) + "keep;" + " }" * (MAX_NESTING + 1)
    with pytest.raises(SieveError, match="nested too deep"):
        compile_script(deep)
    ok = "if true { " * MAX_NESTING + "keep;" + " }" * MAX_NESTING
    compile_script(ok)
    with pytest.raises(SieveError, match="larger than"):
        compile_script("#" * 70000)
    with pytest.raises(SieveError, match="not UTF-8"):
        compile_script(b"keep;\n# \xff\n")


VAC = compile_script('require "vacation"; vacation :days 3 :subject "Away" "I am away";').commands[0].vacation


@pytest.mark.parametrize("head, mail_from, why", [
    ("To: me@example.com", "", "<>"),
    ("To: me@example.com\r\nList-Id: <x.lists.example>", "a@b.example", "list-id"),
    ("To: me@example.com\r\nList-Unsubscribe: <mailto:u@x>", "a@b.example", "list-unsubscribe"),
    ("To: me@example.com\r\nPrecedence: bulk", "a@b.example", "bulk"),
    ("To: me@example.com\r\nPrecedence: junk", "a@b.example", "junk"),
    ("To: me@example.com\r\nAuto-Submitted: auto-replied", "a@b.example", "Auto-Submitted"),
    ("To: me@example.com", "me@example.com", "the user"),
    ("To: me@example.com", "MAILER-DAEMON@b.example", "mail system"),
    ("To: someone@else.example", "a@b.example", "not in To/Cc"),
])
def test_vacation_refusals(head, mail_from, why):
    assert why in (refusal(view(head, mail_from=mail_from), VAC, {"me@example.com"}) or "")


def test_vacation_answers_a_person_and_builds_the_reply():
    msg = view("To: Me <me@example.com>\r\nAuto-Submitted: no\r\nSubject: Q\r\nMessage-ID: <1@b.example>")
    assert refusal(msg, VAC, {"me@example.com"}) is None
    reply = build_reply(msg, VAC, "me@example.com", "mx.example", now=0).decode()
    head = reply.split("\r\n\r\n")[0]
    assert "To: <a@b.example>" in head and "Subject: Away" in head
    assert "Auto-Submitted: auto-replied" in head and "In-Reply-To: <1@b.example>" in head
    assert "References: <1@b.example>" in head and reply.endswith("I am away\r\n")


def test_vacation_memory_once_per_days(tmp_path):
    memory = VacationMemory(tmp_path)
    h = handle_of(VAC, "main")
    assert memory.claim(h, "a@b.example", 3, now=1000.0)
    assert not memory.claim(h, "A@B.example", 3, now=1000.0 + 2 * 86400)
    assert memory.claim(h, "c@b.example", 3, now=1000.0)
    assert memory.claim(h, "a@b.example", 3, now=1000.0 + 3 * 86400 + 1)  # the period is over
    assert memory.claim(handle_of(VAC, "other"), "c@b.example", 3, now=1000.0)  # per script
    assert (tmp_path / "vacation.json").stat().st_mode & 0o777 == 0o600


def test_script_store(tmp_path):
    store = ScriptStore(tmp_path, "Me@Example.com", max_size=1000, max_scripts=2)
    with pytest.raises(SieveError):
        store.put("bad", b"frob;")
    assert store.list() == []
    store.put("main / x", b"keep;")
    store.put("two", b"discard;")
    with pytest.raises(ScriptError) as err:
        store.put("three", b"keep;")
    assert err.value.code == "QUOTA/MAXSCRIPTS"
    with pytest.raises(ScriptError) as err:
        store.space_for("two", 2000)
    assert err.value.code == "QUOTA/MAXSIZE"
    store.activate("main / x")
    assert [(s.name, s.active) for s in store.list()] == [("main / x", True), ("two", False)]
    with pytest.raises(ScriptError) as err:
        store.delete("main / x")
    assert err.value.code == "ACTIVE"
    store.rename("main / x", "main")
    assert store.active_name() == "main" and store.get("main") == b"keep;"
    with pytest.raises(ScriptError) as err:
        store.rename("two", "main")
    assert err.value.code == "ALREADYEXISTS"
    assert (tmp_path / "sieve" / "example.com" / "me" / "scripts").stat().st_mode & 0o777 == 0o700
    active = ActiveScripts(tmp_path)
    name, script = active.lookup("me@example.com")
    assert name == "main" and not isinstance(script, SieveError)
    store.activate(None)
    assert active.lookup("me@example.com") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_store_written_by_root_belongs_to_the_data_dir_owner(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 4321, 4321)
    store = ScriptStore(data, "me@example.com")
    store.put("main", b"keep;")
    store.activate("main")
    for p in (data / "sieve", data / "sieve" / "example.com", store.root, store.root / "scripts",
              store.root / "scripts" / "main.sieve", store.root / "active"):
        assert (p.stat().st_uid, p.stat().st_gid) == (4321, 4321), p


def test_the_examples_in_docs_compile():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "sieve.md").read_text("utf-8")
    blocks = re.findall(r"```sieve\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        compile_script(block)
