"""The `records` alert's "To look closer" names the journal the batches went to: the
local SQLite's records-spill/, and with shared records PostgreSQL's
records-spill-postgresql/ (where an outage of the database keeps them)."""

from __future__ import annotations

from tests.unit.test_alert_state import make


def test_the_records_alert_hint_names_the_postgresql_journal(tmp_path):
    alerts, _records, _clock, mails, _spool = make(
        tmp_path, '[records]\nurl = "postgresql://kanmon@127.0.0.1:5432/kanmon"\n')
    alerts.raise_alert("records", "database", "shared records database (PostgreSQL) refuses writes: down")
    (_category, _key, mail), = mails
    assert f"ls -l {tmp_path}/records.sqlite* {tmp_path}/records-spill {tmp_path}/records-spill-postgresql" in mail


def test_without_shared_records_the_hint_names_the_local_journal_only(tmp_path):
    alerts, _records, _clock, mails, _spool = make(tmp_path)
    alerts.raise_alert("records", "database", "records: the local records database refuses writes")
    (_category, _key, mail), = mails
    assert f"{tmp_path}/records-spill" in mail and "records-spill-postgresql" not in mail
