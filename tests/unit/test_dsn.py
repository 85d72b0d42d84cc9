"""RFC 3464 notices: structure, fields, wording, and header injection."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from kanmon.deliver.dsn import (
    FAILURE_SUBJECT,
    NoticeRecipient,
    build_delay_notice,
    build_failure_notice,
)
from kanmon.model import LocalReply, Reply

ARRIVAL = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ORIGINAL = (
    b"From: Alice <alice@corp.example>\r\n"
    b"To: bob@dest.example\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <orig-1@corp.example>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
)
REMOTE = NoticeRecipient("bob@dest.example", Reply(550, "5.1.1", "<bob@dest.example>: User unknown"), "mx1.dest.example")


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def parts(msg):
    return msg.get_payload()


def status_groups(msg):
    """The message/delivery-status part as a list of field groups (dicts)."""
    return [dict(g.items()) for g in parts(msg)[1].get_payload()]


def failure(*recipients, sender="alice@corp.example", **kw):
    data, mail_from = build_failure_notice(
        ORIGINAL, sender, "relay.corp.example", list(recipients or [REMOTE]), ARRIVAL, ARRIVAL + 60, queue_id="QID1", **kw
    )
    assert mail_from == ""
    return data


def test_failure_notice_structure_and_headers():
    data = failure()
    msg = parse(data)
    assert msg["From"] == "MAILER-DAEMON@relay.corp.example (Mail Delivery System)"
    assert msg["To"] == "<alice@corp.example>"
    assert msg["Subject"] == FAILURE_SUBJECT == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Fri, 15 Jan 2027 08:01:00 +0000"
    assert re.fullmatch(r"<\d+\.[0-9a-f]{16}@relay\.corp\.example>", msg["Message-ID"])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_failure_notice_report_fields():
    groups = status_groups(parse(failure()))
    assert groups[0] == {
        "Reporting-MTA": "dns; relay.corp.example",
        "X-Kanmon-Queue-ID": "QID1",
        "Arrival-Date": "Fri, 15 Jan 2027 08:00:00 +0000",
    }
    assert groups[1] == {
        "Final-Recipient": "rfc822; bob@dest.example",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.dest.example",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@dest.example>: User unknown",
        "Last-Attempt-Date": "Fri, 15 Jan 2027 08:01:00 +0000",
    }


def test_human_part_names_the_recipient_and_the_reply():
    text = parts(parse(failure()))[0].get_payload(decode=True).decode()
    assert "This is the mail system at host relay.corp.example." in text
    assert "<bob@dest.example>: host mx1.dest.example said: 550 5.1.1 <bob@dest.example>: User unknown" in text


def test_only_original_headers_are_returned_by_default():
    data = failure()
    quoted = parts(parse(data))[2].get_payload()
    assert "Subject: quarterly figures" in quoted and "Message-ID: <orig-1@corp.example>" in quoted
    assert b"SECRET BODY LINE" not in data


def test_whole_message_when_asked():
    msg = parse(failure(include_body=True))
    assert parts(msg)[2].get_content_type() == "message/rfc822"
    assert b"SECRET BODY LINE" in failure(include_body=True)


def test_expired_temporary_failure_is_reported_with_a_5xx_status_and_local_diagnostic():
    local = NoticeRecipient("c@dest.example", LocalReply(451, "4.4.1", "Connection refused by 192.0.2.7"))
    groups = status_groups(parse(failure(REMOTE, local)))
    assert len(groups) == 3
    assert groups[2]["Status"] == "5.4.1"
    assert groups[2]["Diagnostic-Code"] == "X-Kanmon; Connection refused by 192.0.2.7"
    assert "Remote-MTA" not in groups[2]


def test_reply_without_enhanced_code_gets_a_class_status():
    r = NoticeRecipient("c@dest.example", Reply(554, "", "go away"), "mx.dest.example")
    assert status_groups(parse(failure(r)))[1]["Status"] == "5.0.0"


def test_delay_notice():
    r = NoticeRecipient("bob@dest.example", Reply(451, "4.3.0", "Temporary lookup failure"), "mx1.dest.example")
    data, mail_from = build_delay_notice(
        ORIGINAL, "alice@corp.example", "relay.corp.example", [r], ARRIVAL, ARRIVAL + 4 * 3600 + 120,
        will_retry_until=ARRIVAL + 3 * 86400,
    )
    assert mail_from == ""
    msg = parse(data)
    assert msg["Subject"] == "Warning: could not send message for past 4 hours"
    group = status_groups(msg)[1]
    assert group["Action"] == "delayed"
    assert group["Status"] == "4.3.0"
    assert group["Diagnostic-Code"] == "smtp; 451 4.3.0 Temporary lookup failure"
    assert group["Will-Retry-Until"] == "Mon, 18 Jan 2027 08:00:00 +0000"
    text = parts(msg)[0].get_payload(decode=True).decode()
    assert "THIS IS A WARNING ONLY" in text and "retried until it is 3 days old" in text
    assert b"SECRET BODY LINE" not in data


def test_delay_subject_uses_the_actual_duration():
    data, _ = build_delay_notice(ORIGINAL, "a@corp.example", "h.example", [REMOTE], ARRIVAL, ARRIVAL + 2400, will_retry_until=ARRIVAL + 86400)
    assert parse(data)["Subject"] == "Warning: could not send message for past 40 minutes"


def test_no_notice_about_a_message_from_the_null_sender():
    with pytest.raises(ValueError, match="null sender"):
        build_failure_notice(ORIGINAL, "", "h.example", [REMOTE], ARRIVAL, ARRIVAL)
    with pytest.raises(ValueError, match="null sender"):
        build_delay_notice(ORIGINAL, "", "h.example", [REMOTE], ARRIVAL, ARRIVAL, will_retry_until=ARRIVAL)


def test_no_recipients_is_an_error():
    with pytest.raises(ValueError, match="at least one recipient"):
        build_failure_notice(ORIGINAL, "a@b.example", "h.example", [], ARRIVAL, ARRIVAL)


def test_every_line_ends_with_crlf_and_is_short():
    data = failure(NoticeRecipient("c@dest.example", Reply(550, "5.7.1", "x" * 5000), "mx"))
    assert data.count(b"\n") == data.count(b"\r\n") and data.count(b"\r") == data.count(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


# ---------------------------------------------------------------------------
# Injection: addresses, host names and replies come from the network.

INJECTIONS = ["\r\nBcc: evil@attacker.example", "\nBcc: evil@attacker.example", "\rBcc: evil@attacker.example"]


@pytest.mark.parametrize("inject", INJECTIONS)
def test_sender_cannot_inject_headers(inject):
    data = failure(sender="alice@corp.example" + inject)
    msg = parse(data)
    assert msg["Bcc"] is None
    assert "\n" not in msg["To"] and "\r" not in msg["To"]
    assert msg["To"].startswith("<alice@corp.example?") and msg["To"].endswith("attacker.example>")
    assert not any(line.startswith(b"Bcc:") for line in data.split(b"\r\n"))


@pytest.mark.parametrize("inject", INJECTIONS)
def test_recipient_cannot_inject_report_fields(inject):
    r = NoticeRecipient("bob@dest.example" + inject.replace("Bcc: evil@attacker.example", "Action: delivered"), REMOTE.reply, "mx1.dest.example" + inject)
    data = failure(r)
    groups = status_groups(parse(data))
    assert len(groups) == 2
    assert groups[1]["Action"] == "failed"
    assert not any(line.startswith((b"Action: delivered", b"Bcc:")) for line in data.split(b"\r\n"))


def test_reply_text_cannot_inject_report_fields():
    r = NoticeRecipient("bob@dest.example", LocalReply(451, "4.4.1", "refused\r\nFinal-Recipient: rfc822; x@y\nStatus: 2.0.0"))
    data = failure(r)
    groups = status_groups(parse(data))
    assert len(groups) == 2 and groups[1]["Status"] == "5.4.1"
    assert not any(line.startswith((b"Final-Recipient: rfc822; x@y", b"Status: 2.0.0")) for line in data.split(b"\r\n"))


def test_other_control_characters_are_replaced():
    data = failure(sender="alice\x00\x1b[2J\x7f@corp.example")
    assert parse(data)["To"] == "<alice??[2J?@corp.example>"
    header_block = data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", header_block)


def test_hostname_cannot_inject_headers():
    data, _ = build_failure_notice(ORIGINAL, "a@corp.example", "relay.example\r\nBcc: evil@x", [REMOTE], ARRIVAL, ARRIVAL)
    assert parse(data)["Bcc"] is None


def test_original_without_a_body_is_all_headers():
    data, _ = build_failure_notice(b"Subject: only headers", "a@corp.example", "h.example", [REMOTE], ARRIVAL, ARRIVAL)
    assert parts(parse(data))[2].get_payload().startswith("Subject: only headers")


def test_recipients_as_plain_tuples_and_original_recipient():
    data, _ = build_failure_notice(
        ORIGINAL, "a@corp.example", "h.example",
        [("bob@dest.example", Reply(550, "5.1.1", "unknown"), "mx1.dest.example"),
         NoticeRecipient("c@dest.example", Reply(550, "5.1.1", "unknown"), "", original_rcpt="sales@dest.example")],
        ARRIVAL, ARRIVAL,
    )
    groups = status_groups(parse(data))
    assert groups[1]["Remote-MTA"] == "dns; mx1.dest.example"
    assert groups[2]["Original-Recipient"] == "rfc822; sales@dest.example"
    assert "Original-Recipient" not in groups[1]


@pytest.mark.parametrize(
    ("relay", "mta"),
    [("store.corp.example. [192.0.2.7]:2525", "store.corp.example"), ("[192.0.2.7]:25", "[192.0.2.7]"),
     ("[192.0.2.7]", "[192.0.2.7]"), ("", ""), ("local", "")],
)
def test_notice_recipient_from_a_delivery_result(relay, mta):
    from kanmon.model import RecipientResult, Status

    result = RecipientResult("b@dest.example", Status.BOUNCED, Reply(550, "5.1.1", "unknown"), relay, "esmtp")
    assert NoticeRecipient.from_result(result).remote_mta == mta


@pytest.mark.parametrize("reply", [
    LocalReply(451, "4.4.1", "Connection refused by 192.0.2.7"),
    LocalReply(451, "4.4.2", "conversation with 192.0.2.7 timed out while receiving the initial server greeting"),
    LocalReply(451, "4.4.2", "lost connection with 192.0.2.7 while sending message body"),
])
def test_no_remote_mta_when_no_remote_server_said_it(reply):
    from kanmon.model import RecipientResult, Status

    result = RecipientResult("b@down.test", Status.BOUNCED, reply, "mx.down.test. [192.0.2.7]:25", "esmtp")
    rcpt = NoticeRecipient.from_result(result)
    assert rcpt.remote_mta == ""
    data, _ = build_failure_notice(ORIGINAL, "alice@corp.example", "relay.corp.example", [rcpt], ARRIVAL, ARRIVAL + 9)
    (_, fields) = status_groups(parse(data))
    assert "Remote-MTA" not in fields and fields["Diagnostic-Code"].startswith("X-Kanmon; ")
    assert b" said: " not in data


# -- RFC 3461: success notices, ENVID, ORCPT, RET ----------------------------------------------

from kanmon.deliver.dsn import SUCCESS_SUBJECT, build_success_notice  # noqa: E402


def test_success_notice_delivered_and_relayed():
    here = NoticeRecipient("bob@corp.example", Reply(250, "2.0.0", "delivered to maildir"))
    data, mail_from = build_success_notice(ORIGINAL, "alice@corp.example", "relay.corp.example", [here], ARRIVAL,
                                           ARRIVAL + 5, queue_id="QID1", envid="ABC 123")
    msg = parse(data)
    assert mail_from == "" and msg["Subject"] == SUCCESS_SUBJECT
    per_message, rcpt = status_groups(msg)
    assert per_message["Original-Envelope-Id"] == "ABC 123"
    assert list(per_message)[0] == "Original-Envelope-Id"  # RFC 3464 2.2: first
    assert rcpt["Action"] == "delivered" and rcpt["Status"] == "2.0.0" and "Remote-MTA" not in rcpt
    assert b"SECRET BODY LINE" not in data and b"Delivered Message Headers" in data
    relayed = NoticeRecipient("bob@dest.example", Reply(250, "2.0.0", "Ok: queued"), "mx1.dest.example")
    data, _ = build_success_notice(ORIGINAL, "alice@corp.example", "relay.corp.example", [relayed], ARRIVAL,
                                   ARRIVAL + 5, action="relayed")
    (_, rcpt) = status_groups(parse(data))
    assert rcpt["Action"] == "relayed" and rcpt["Remote-MTA"] == "dns; mx1.dest.example"
    with pytest.raises(ValueError):
        build_success_notice(ORIGINAL, "alice@corp.example", "h", [relayed], ARRIVAL, action="failed")
    with pytest.raises(ValueError):
        build_success_notice(ORIGINAL, "", "h", [relayed], ARRIVAL)


def test_orcpt_is_the_original_recipient_even_when_equal_and_wins_over_the_alias():
    r = NoticeRecipient("bob@dest.example", REMOTE.reply, "mx1.dest.example", original_rcpt="info@dest.example",
                        orcpt="rfc822;Bob@Dest.example")
    (_, rcpt) = status_groups(parse(failure(r)))
    assert rcpt["Original-Recipient"] == "rfc822; Bob@Dest.example"
    same = NoticeRecipient("bob@dest.example", REMOTE.reply, "mx1.dest.example", orcpt="rfc822;bob@dest.example")
    (_, rcpt) = status_groups(parse(failure(same)))
    assert rcpt["Original-Recipient"] == "rfc822; bob@dest.example"


def test_envid_with_control_characters_cannot_add_a_field():
    data = failure(envid="x\r\nAction: delivered")
    (per_message, rcpt) = status_groups(parse(data))
    assert per_message["Original-Envelope-Id"] == "x??Action: delivered" and rcpt["Action"] == "failed"


def test_ret_full_returns_the_whole_message():
    data = failure(include_body=True)
    assert b"SECRET BODY LINE" in data and b"Content-Type: message/rfc822" in data
