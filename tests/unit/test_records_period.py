"""`kanmon log events`, `log history` and `stats` over an absolute period (--since and
--until as times), and `log history --msgid`. The rows are written at fixed times (a
day of January 2026, local time), so nothing depends on today's date."""

from __future__ import annotations

import calendar
import json
import time

import pytest
from click.testing import CliRunner

from kanmon.cli import main
from kanmon.commands.options import parse_since
from kanmon.records.store import open_db, rebuild_slots

T0 = time.mktime((2026, 1, 1, 10, 0, 0, 0, 0, -1))  # 2026-01-01 10:00 local time


@pytest.fixture
def config(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = open_db(data / "records.sqlite")
    with db:
        for n in range(3):  # 10:00, 11:00, 12:00
            ts = T0 + n * 3600
            db.execute("INSERT INTO history(ts, client_ip, mail_from, rcpt, subject, message_id, size, classification,"
                       " disposition, queue_id, status, first) VALUES (?,?,?,?,?,?,?,?,?,?,?,1)",
                       (ts, "192.0.2.1", f"s{n}@example.org", "alice@example.test", f"m{n}", f"<m{n}@example.org>",
                        100, "NotSpam", "Accept", f"000000000000{n}BC", "Delivered"))
            db.execute("INSERT INTO events(ts, queue_id, kind, text) VALUES (?,?,?,?)",
                       (ts, f"000000000000{n}BC", "info", f"line {n}"))
        rebuild_slots(db)
    db.close()
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[server]\nhostname = "mx1.example.test"\ndata_dir = "{data}"\n')
    return cfg


def run(config, *args: str, code: int = 0) -> str:
    out = CliRunner().invoke(main, [*args, "-c", str(config)])
    assert out.exit_code == code, (out.output, out.exception)
    return out.output


def history(config, *args: str) -> list[str]:
    return [json.loads(line)["subject"] for line in run(config, "log", "history", "--json", *args).splitlines()]


def test_since_and_until_take_local_times_and_offsets(config):
    assert history(config, "--since", "2026-01-01T10:30", "--until", "2026-01-01T11:30") == ["m1"]
    assert history(config, "--since", "2026-01-01T11:00") == ["m1", "m2"]  # from the time on
    assert history(config, "--until", "2026-01-01T11:00:00") == ["m0"]  # before it
    assert history(config, "--since", "2026-01-01", "--until", "2026-01-02") == ["m0", "m1", "m2"]  # local midnight
    # With an offset: the same instant however the machine's zone is set.
    utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0 + 3600)) + "Z"
    assert history(config, "--since", utc, "--until", utc.replace(":00Z", ":01Z")) == ["m1"]
    assert parse_since("2026-01-01T10:00+09:00") == calendar.timegm((2026, 1, 1, 1, 0, 0))
    lines = run(config, "log", "events", "--since", "2026-01-01T10:30", "--until", "2026-01-01T12:00").splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["line 1"]
    report = json.loads(run(config, "stats", "--json", "--by", "hour", "--since", "2026-01-01T10:00",
                            "--until", "2026-01-01T12:00"))
    assert report["totals"]["received"] == 2 and report["totals"]["delivered"] == 2
    text = run(config, "stats", "--since", "2026-01-01", "--until", "2026-01-02")
    assert "from 2026-01-01 until 2026-01-02" in text


def test_bad_times_and_empty_periods_are_usage_errors(config):
    assert "is not a time" in run(config, "log", "history", "--since", "2026-13-01", code=2)
    assert "not a duration" in run(config, "log", "history", "--until", "soon", code=2)
    assert "ends" in run(config, "log", "history", "--since", "2026-01-02", "--until", "2026-01-01", code=2)
    assert "--until" in run(config, "stats", "--tls", "--until", "1d", code=2)


def test_history_by_message_id_with_or_without_brackets(config):
    assert history(config, "--msgid", "<m1@example.org>") == ["m1"]
    assert history(config, "--msgid", "m2@example.org") == ["m2"]
    assert history(config, "--msgid", "m1@example") == []  # exact, not a substring
