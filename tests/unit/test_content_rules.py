"""Content rules and attachment inspection: every condition kind, every action, the
attachment tricks (double extension, wrong extension, nested and encrypted archives,
a zip bomb, a macro document) and the profile's attachment policies."""

from __future__ import annotations

import io
import zipfile

import pytest

from kanmon.config import parse_config
from kanmon.content import attachments as att_module
from kanmon.content.inspect import inspect_message
from kanmon.content.rules import CompiledProfile, Facts
from kanmon.escape import for_terminal
from tests.support.mailsamples import attachment, encrypted_zip, japanese_message, plain_zip, zip_with_names

OUTSIDE = Facts("katou@partner.example", ("tanaka@corp.example",), True, False)
INSIDE = Facts("tanaka@corp.example", ("katou@partner.example",), False, True)


def profile(rules: str, extra: str = "") -> CompiledProfile:
    config = parse_config(f'[[content_profile]]\nname = "inbound"\n{extra}\n{rules}')
    return CompiledProfile(config.content_profile[0])


def rule(name: str, action: str, **conditions: str) -> str:
    lines = [f'[[content_profile.rule]]', f'name = "{name}"', f'action = "{action}"']
    lines += [f"{k} = {v}" for k, v in conditions.items()]
    return "\n".join(lines) + "\n"


def run(p: CompiledProfile, msg: bytes, facts: Facts = OUTSIDE):
    return inspect_message(p, msg, facts).verdict


def test_subject_keyword_in_iso2022jp_subject_quarantines_with_the_rule_named():
    v = run(profile(rule("invoice-spam", "quarantine", subject='["請求書", "invoice"]', from_outside="true")),
            japanese_message())
    assert v.action == "quarantine" and v.rule == "invoice-spam"
    assert v.hits[0].why == "from outside; subject contains '請求書'"


@pytest.mark.parametrize("where", ["subject", "body", "html"])
def test_keyword_found_in_subject_shift_jis_body_and_html_part(where):
    msg = {
        "subject": japanese_message(subject="【至急】請求書のご確認", body="こんにちは"),
        "body": japanese_message(subject="ご連絡", body="添付の請求書をご確認ください"),
        "html": japanese_message(subject="ご連絡", body="こんにちは", html="<p>請求<b></b>書</p><div>請求書</div>"),
    }[where]
    cond = "subject" if where == "subject" else "body"
    v = run(profile(rule("r", "reject", **{cond: '["請求書"]'})), msg)
    assert v.action == "reject" and v.reply_text == "Message refused by content rule r"


def test_keywords_match_full_and_half_width_alike_and_ignore_case():
    v = run(profile(rule("r", "tag", subject='["INVOICE", "ｾｲｷｭｳ"]')), japanese_message(subject="ｉｎｖｏｉｃｅ"))
    assert v.subject_prefix == "[SPAM]"
    v = run(profile(rule("r", "tag", subject='["セイキュウ"]')), japanese_message(subject="ｾｲｷｭｳ"))
    assert v.subject_prefix == "[SPAM]"


def test_regex_condition_and_header_condition():
    p = profile(rule("r", "add_header", header='{ Message-ID = { regex = "@partner\\\\.example>$" } }',
                     add_header='"X-Partner: yes"'))
    v = run(p, japanese_message())
    assert v.headers == [("X-Partner", "yes")] and v.action == "accept"
    assert run(p, japanese_message(sender="a@b.example")).hits  # the header, not the sender, is matched


def test_sender_recipient_authenticated_and_size_conditions():
    msg = japanese_message(subject="hello", body="x" * 5000)
    assert run(profile(rule("r", "reject", sender='["@partner.example"]')), msg).action == "reject"
    assert run(profile(rule("r", "reject", recipient='["tanaka@"]')), msg).action == "reject"
    assert run(profile(rule("r", "reject", recipient='["nobody@"]')), msg).action == "accept"
    assert run(profile(rule("r", "reject", authenticated="true")), msg).action == "accept"
    assert run(profile(rule("r", "reject", authenticated="true")), msg, INSIDE).action == "reject"
    assert run(profile(rule("r", "reject", size_over='"4KB"')), msg).action == "reject"
    assert run(profile(rule("r", "reject", size_over='"1MB"')), msg).action == "accept"


def test_all_needs_every_condition_any_needs_one():
    msg = japanese_message(subject="請求書", body="hello")
    both = dict(subject='["請求書"]', body='["nothing"]')
    assert run(profile(rule("r", "reject", **both)), msg).action == "accept"
    assert run(profile(rule("r", "reject", match='"any"', **both)), msg).action == "reject"


def test_non_terminal_actions_accumulate_and_the_first_terminal_one_ends_the_walk():
    rules = (rule("t", "tag", subject='["請求書"]', tag='"[要注意]"') + rule("s", "score", subject='["請求書"]', score="3.5")
             + rule("b", "bcc", subject='["請求書"]', address='"audit@corp.example"')
             + rule("q", "quarantine", subject='["請求書"]') + rule("never", "reject", subject='["請求書"]'))
    v = run(profile(rules), japanese_message())
    assert (v.subject_prefix, v.score, v.bcc, v.action, v.rule) == ("[要注意]", 3.5, ["audit@corp.example"], "quarantine", "q")
    assert [h.rule for h in v.hits] == ["t", "s", "b", "q"]


def test_accept_rule_stops_later_rules_and_attachment_policies():
    rules = rule("partner", "accept", sender='["@partner.example"]') + rule("r", "reject", subject='["請求書"]')
    msg = japanese_message(attachments=[attachment(encrypted_zip({"a.xlsx": b"x"}), "a.zip")])
    v = run(profile(rules), msg)
    assert v.action == "accept" and v.rule == "partner" and [h.rule for h in v.hits] == ["partner"]


def test_log_only_records_and_changes_nothing():
    v = run(profile(rule("r", "reject", subject='["請求書"]', log_only="true")), japanese_message())
    assert v.action == "accept" and v.hits[0].log_only and v.hits[0].action == "reject"


def test_discard_redirect():
    assert run(profile(rule("r", "discard", subject='["請求書"]')), japanese_message()).action == "discard"
    v = run(profile(rule("r", "redirect", subject='["請求書"]', address='"review@corp.example"')), japanese_message())
    assert v.action == "redirect" and v.redirect == "review@corp.example"


def test_score_thresholds():
    rules = rule("a", "score", subject='["請求書"]', score="4") + rule("b", "score", body='["お世話"]', score="3")
    assert run(profile(rules, "quarantine_score = 5.0"), japanese_message()).action == "quarantine"
    v = run(profile(rules, "quarantine_score = 5.0\nreject_score = 7.0"), japanese_message())
    assert v.action == "reject" and v.classification == "Spam"


# -- attachments ----------------------------------------------------------------------


def names_rule(patterns: str, action: str = "reject") -> CompiledProfile:
    return profile(rule("r", action, attachment_name=patterns))


def types_rule(types: str) -> CompiledProfile:
    return profile(rule("r", "reject", attachment_type=types))


MZ = b"MZ\x90\x00" + bytes(200)


def test_double_extension_and_encoded_word_name():
    msg = japanese_message(attachments=[attachment(MZ, "請求書.pdf.exe", rfc2231=None)])
    v = run(names_rule('["*.exe"]'), msg)
    assert v.action == "reject" and "請求書.pdf.exe" in v.hits[0].why
    assert run(types_rule('["executable"]'), msg).action == "reject"


def test_wrong_extension_for_the_content_is_found_by_type():
    msg = japanese_message(attachments=[attachment(MZ, "請求書.pdf")])
    assert run(names_rule('["*.exe"]'), msg).action == "accept"
    v = run(types_rule('["executable"]'), msg)
    assert v.action == "reject" and "executable" in v.hits[0].why
    assert run(types_rule('["application/x-msdownload"]'), msg).action == "reject"
    assert run(types_rule('["application/pdf"]'), msg).action == "accept"  # declared octet-stream, content MZ


def test_nested_zip_members_are_inspected():
    inner = plain_zip({"docs/明細.pdf.exe": MZ})
    outer = plain_zip({"inner.zip": inner, "readme.txt": b"hello"})
    msg = japanese_message(attachments=[attachment(outer, "archive.zip", rfc2231="continued")])
    found = inspect_message(names_rule('["*.exe"]'), msg, OUTSIDE)
    assert found.verdict.action == "reject"
    item = next(i for i in found.attachments.items if i.name.endswith(".exe"))
    assert item.depth == 2 and item.container == "inner.zip" and "executable" in item.classes


def test_encrypted_zip_follows_the_profile_policy():
    msg = japanese_message(attachments=[attachment(encrypted_zip({"請求書.xlsx": b"secret"}), "請求書.zip")])
    v = run(profile(rule("r", "tag", subject='["nothing"]')), msg)  # default: quarantine
    assert v.action == "quarantine" and v.rule == "encrypted_archive"
    assert run(profile(rule("r", "tag", subject='["x"]'), 'encrypted_archive = "reject"'), msg).action == "reject"
    assert run(profile(rule("r", "tag", subject='["x"]'), 'encrypted_archive = "accept"'), msg).action == "accept"
    assert run(types_rule('["encrypted"]'), msg).action == "reject"


def test_macro_documents_by_content():
    docm = plain_zip({"[Content_Types].xml": b"<x/>", "word/vbaProject.bin": b"\xd0\xcf\x11\xe0"})
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100) + "_VBA_PROJECT".encode("utf-16-le") + bytes(100)
    for data, name in ((docm, "report.docx"), (ole, "report.doc")):
        msg = japanese_message(attachments=[attachment(data, name)])
        assert run(types_rule('["macro"]'), msg).action == "reject", name
    clean = plain_zip({"[Content_Types].xml": b"<x/>", "word/document.xml": b"<w/>"})
    assert run(types_rule('["macro"]'), japanese_message(attachments=[attachment(clean, "r.docx")])).action == "accept"


def test_zip_bomb_is_stopped_by_the_ratio_bound_without_reading_it_all():
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", bytes(50 * 1024 * 1024))  # 50 MB of zeros: ~50 KB compressed
    msg = japanese_message(attachments=[attachment(bomb.getvalue(), "bomb.zip")])
    found = inspect_message(profile(rule("r", "tag", subject='["x"]')), msg, OUTSIDE)
    assert "zip bomb" in found.attachments.limit or "ratio" in found.attachments.limit
    assert found.verdict.action == "quarantine" and found.verdict.rule == "archive_limit"


def test_deep_nesting_is_bounded(monkeypatch):
    monkeypatch.setattr(att_module, "MAX_DEPTH", 3)
    data = MZ
    for i in range(6):
        data = plain_zip({f"level{i}.zip" if i else "x.exe": data})
    found = inspect_message(profile(rule("r", "tag", subject='["x"]')), japanese_message(attachments=[attachment(data, "a.zip")]), OUTSIDE)
    assert "nested deeper than 3" in found.attachments.limit


# -- found by a second reading ----------------------------------------------------------


def test_crafted_html_is_read_in_linear_time():
    # CVE-2025-6069: html.parser takes minutes on this; our reduction one pass.
    msg = japanese_message(subject="x", html="<a b='" * 30000 + "請求書")
    found = inspect_message(profile(rule("r", "tag", body='["請求書"]')), msg, OUTSIDE)
    assert found.verdict.subject_prefix == "[SPAM]"


def test_a_zip_member_python_cannot_decompress_is_still_listed_by_name():
    data = bytearray(plain_zip({"evil.exe": MZ * 50}))
    # Mark the member Deflate64 (method 9) in both headers: Windows extracts it, zipfile cannot.
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.find(sig)
        data[at + off:at + off + 2] = (9).to_bytes(2, "little")
    msg = japanese_message(attachments=[attachment(bytes(data), "files.zip")])
    v = run(names_rule('["*.exe"]'), msg)
    assert v.action == "reject" and "evil.exe" in v.hits[0].why


def test_a_zip_claiming_too_many_entries_is_refused_before_it_is_parsed():
    members = {f"f{i}.txt": b"" for i in range(1200)}
    found = inspect_message(profile(rule("r", "tag", subject='["x"]')),
                            japanese_message(attachments=[attachment(plain_zip(members), "many.zip")]), OUTSIDE)
    assert "more than 1000 files" in found.attachments.limit and found.verdict.rule == "archive_limit"


# -- zip member names without the UTF-8 flag, as Windows and Linux write them ----------


def zip_items(data: bytes, patterns: str):
    """The verdict of an attachment_name rule on a message carrying the zip, and its members."""
    found = inspect_message(names_rule(patterns), japanese_message(attachments=[attachment(data, "files.zip")]), OUTSIDE)
    return found.verdict, [i for i in found.attachments.items if i.container == "files.zip"]


@pytest.mark.parametrize(("raw", "patterns", "name"), [
    ("見積書.exe".encode("cp932"), '["見積書*"]', "見積書.exe"),  # Windows Explorer
    ("表示ソフト.exe".encode("cp932"), '["*ソフト.exe"]', "表示ソフト.exe"),  # trail bytes 0x5c ("\\")
    ("請求書.xlsx".encode("utf-8"), '["請求書.xlsx"]', "請求書.xlsx"),  # Info-ZIP zip on Linux
], ids=["cp932", "cp932-trail-0x5c", "utf-8"])
def test_zip_member_names_without_the_utf8_flag_match_a_japanese_glob(raw, patterns, name):
    data = zip_with_names({raw: MZ})
    assert not zipfile.ZipFile(io.BytesIO(data)).infolist()[0].flag_bits & 0x800
    v, items = zip_items(data, patterns)
    assert [i.name for i in items] == [name]
    assert v.action == "reject" and f"attachment {name!r} matches" in v.hits[0].why


def test_a_zip_mixing_flagged_and_unflagged_names_reads_each_by_its_flag():
    data = zip_with_names({"請求書.xlsx": b"PK", "見積書.exe".encode("cp932"): MZ})
    assert [i.flag_bits & 0x800 for i in zipfile.ZipFile(io.BytesIO(data)).infolist()] == [0x800, 0]
    _v, items = zip_items(data, '["*.exe"]')
    assert [i.name for i in items] == ["請求書.xlsx", "見積書.exe"]
    for name in ("請求書.xlsx", "見積書.exe"):
        v, _items = zip_items(data, f'["{name[:3]}*"]')
        assert v.action == "reject" and f"attachment {name!r} matches" in v.hits[0].why


def test_hostile_zip_member_names_do_not_raise_and_are_escaped_where_shown():
    utf8 = "\x9b31m\u202efdp.exe".encode("utf-8")  # a C1 CSI and a right-to-left override, valid UTF-8
    neither = b"\x1b]0;x\x07\x81 .exe"  # ESC, BEL, and 0x81 0x20: neither UTF-8 nor CP932
    v, items = zip_items(zip_with_names({utf8: MZ, neither: MZ}), '["*.exe"]')
    assert [i.name for i in items] == ["\x9b31m\u202efdp.exe", neither.decode("cp437")]
    assert [for_terminal(i.name) for i in items] == ["\\x9b31m\\u202efdp.exe", "\\x1b]0;x\\x07\u00fc .exe"]
    assert v.action == "reject" and v.hits[0].why == "attachment '\\x9b31m\\u202efdp.exe' matches '*.exe'"


def test_nesting_deeper_than_the_parser_can_recurse_is_kept_unread_and_goes_by_archive_limit():
    depth = 3000
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth))
    msg = ("Subject: deep\r\nMIME-Version: 1.0\r\n" + head + "Content-Type: text/plain\r\n\r\nx\r\n").encode()
    found = inspect_message(profile(rule("r", "tag", subject='["x"]')), msg, OUTSIDE)
    assert found.message.subject == "deep" and "could not be read" in found.message.truncated
    assert found.verdict.action == "quarantine" and found.verdict.rule == "archive_limit"


def test_recipients_with_different_profiles_get_the_gravest_verdict():
    config = parse_config('''
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "abuse"]
[[recipient_policy]]
recipient = "abuse@corp.example"
content_profile = "lenient"
[[content_profile]]
name = "lenient"
[[content_profile.rule]]
name = "all-ok"
subject = ["請求書"]
action = "accept"
[[content_profile]]
name = "inbound"
[[content_profile.rule]]
name = "invoice"
subject = ["請求書"]
action = "quarantine"
''')
    from kanmon.policy.content import content_profile_names

    names = content_profile_names(config, "a@x.example", ["abuse@corp.example", "tanaka@corp.example"], True)
    assert names == ["lenient", "inbound"]
    compiled = {p.name: CompiledProfile(p) for p in config.content_profile}
    v = inspect_message([compiled[n] for n in names], japanese_message(), OUTSIDE).verdict
    assert v.action == "quarantine" and v.rule == "invoice"  # adding abuse@ does not switch the rules off


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("mode, name", [("w", "a.tar"), ("w:gz", "a.tar.gz"), ("w:bz2", "a.tar.bz2"), ("w:xz", "a.txz")])
def test_tar_archives_plain_and_compressed_are_opened(mode, name):
    msg = japanese_message(attachments=[attachment(_tar({"dir/run.exe": MZ}, mode), name)])
    v = run(types_rule('["executable"]'), msg)
    assert v.action == "reject" and "run.exe" in v.hits[0].why


def test_a_tar_member_name_from_windows_matches_a_japanese_glob_and_others_are_escaped():
    """tarfile reads names as UTF-8 with surrogateescape: a CP932 name (a tar made on
    Windows) is read as CP932; bytes that are neither stay escaped wherever shown."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="cp932") as tar:
        for name in ("見積書.exe", "\udc81\udcffx.exe"):
            info = tarfile.TarInfo(name)
            info.size = len(MZ)
            tar.addfile(info, io.BytesIO(MZ))
    msg = japanese_message(attachments=[attachment(out.getvalue(), "files.tar")])
    found = inspect_message(names_rule('["見積書*"]'), msg, OUTSIDE)
    names = [i.name for i in found.attachments.items if i.container == "files.tar"]
    assert names[0] == "見積書.exe" and found.verdict.action == "reject"
    assert for_terminal(names[1]) == "\\udc81\\udcffx.exe"


def test_a_zip_that_cannot_be_opened_goes_by_archive_limit():
    """A zip whose member list cannot be read (here a name flagged UTF-8 that is not,
    which zipfile refuses) was skipped, so a name rule never saw `evil.exe` inside: now
    nothing inside could be checked, and the profile's archive_limit decides."""
    data = bytearray(plain_zip({"evil-x.exe": MZ}))
    for sig, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = data.find(sig)
        data[at + flag_at:at + flag_at + 2] = (0x800).to_bytes(2, "little")
        data[at + name_at + 4] = 0xFF  # "evil\xffx.exe": not UTF-8
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(io.BytesIO(bytes(data)))
    found = inspect_message(names_rule('["*.exe"]'), japanese_message(attachments=[attachment(bytes(data), "a.zip")]), OUTSIDE)
    assert "cannot be opened" in found.attachments.limit
    assert found.verdict.action == "quarantine" and found.verdict.rule == "archive_limit"


def test_ip_policy_names_the_content_profile_and_a_recipient_policy_wins():
    from kanmon.policy.content import content_profile_names

    config = parse_config('''
[[domain]]
name = "corp.example"
mailboxes = ["tanaka", "abuse"]
[[ip_policy]]
source = ["192.0.2.0/24"]
profile = "default"
content_profile = "partners"
[[recipient_policy]]
recipient = "abuse@corp.example"
content_profile = "abuse"
[[content_profile]]
name = "partners"
[[content_profile.rule]]
name = "x"
subject = ["x"]
action = "tag"
[[content_profile]]
name = "abuse"
[[content_profile.rule]]
name = "y"
subject = ["y"]
action = "tag"
[[content_profile]]
name = "inbound"
[[content_profile.rule]]
name = "z"
subject = ["z"]
action = "tag"
''')
    assert content_profile_names(config, "a@x.example", ["tanaka@corp.example"], True, "192.0.2.9") == ["partners"]
    assert content_profile_names(config, "a@x.example", ["tanaka@corp.example"], True, "198.51.100.1") == ["inbound"]
    assert content_profile_names(config, "a@x.example", ["abuse@corp.example"], True, "192.0.2.9") == ["abuse"]
