"""The console's pure parts: signed sessions (timeout, lifetime, address, password
version, tampering), CSRF tokens, the language choice, the Japanese catalogue covering
every page text, the SVG chart, and the [console] config check."""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path

import pytest

from kanmon.config import ConfigError, parse_config
from kanmon.console import charts, i18n
from kanmon.console.security import Sessions, load_secret

SECRET = b"k" * 32


def sessions() -> Sessions:
    return Sessions(SECRET, timeout=1800, lifetime=12 * 3600)


def test_a_session_round_trips_and_holds_within_its_limits() -> None:
    s = sessions()
    made = s.new("alice", "192.0.2.1", "pv1", now=1000.0)
    back = s.decode(s.encode(made))
    assert back == made
    assert s.check(back, "192.0.2.1", "pv1", 1000.0 + 1799) is None


@pytest.mark.parametrize("ip, pv, at, why", [
    ("192.0.2.1", "pv1", 1000.0 + 1801, "session timed out"),
    ("192.0.2.9", "pv1", 1001.0, "session used from another address"),
    ("192.0.2.1", "pv2", 1001.0, "account removed or password changed"),
    ("192.0.2.1", None, 1001.0, "account removed or password changed"),
])
def test_a_session_is_refused(ip, pv, at, why) -> None:
    s = sessions()
    made = s.new("alice", "192.0.2.1", "pv1", now=1000.0)
    assert s.check(s.decode(s.encode(made)), ip, pv, at) == why


def test_an_active_session_still_ends_at_its_lifetime() -> None:
    s = sessions()
    made = s.new("alice", "192.0.2.1", "pv1", now=0.0)
    kept_alive = made.__class__(made.name, made.sid, made.ip, made.login, 12 * 3600 + 10, made.pv)
    assert s.check(kept_alive, "192.0.2.1", "pv1", 12 * 3600 + 20) == "session expired"


@pytest.mark.parametrize("mangle", [
    lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),  # the MAC
    lambda c: "eyJ" + c[3:],  # the body
    lambda c: c.replace(".", ""),
    lambda c: "",
    lambda c: "x" * 5000,
])
def test_a_tampered_cookie_is_no_session(mangle) -> None:
    s = sessions()
    cookie = s.encode(s.new("alice", "192.0.2.1", "pv1", now=1.0))
    assert s.decode(mangle(cookie)) is None


def test_a_cookie_signed_under_another_secret_is_refused() -> None:
    other = Sessions(b"o" * 32, 1800, 3600)
    assert sessions().decode(other.encode(other.new("alice", "192.0.2.1", "pv", 1.0))) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    s = sessions()
    a, b = s.new("alice", "ip", "pv", 1.0), s.new("alice", "ip", "pv", 1.0)
    assert s.csrf_ok(a, s.csrf_token(a))
    assert not s.csrf_ok(a, s.csrf_token(b)) and not s.csrf_ok(a, None) and not s.csrf_ok(a, "")


def test_a_status_line_shows_only_with_its_own_mac_for_its_session_and_kind() -> None:
    s = sessions()
    a, b = s.new("alice", "ip", "pv", 1.0), s.new("alice", "ip", "pv", 1.0)
    token = s.status_token(a, "msg", "hold: 1 of 1")
    assert s.status_ok(a, "msg", "hold: 1 of 1", token)
    assert not s.status_ok(a, "msg", "hold: 2 of 2", token)  # the text changed
    assert not s.status_ok(b, "msg", "hold: 1 of 1", token)  # another session
    assert not s.status_ok(a, "error", "hold: 1 of 1", token)  # shown as another kind
    assert not s.status_ok(a, "msg", "hold: 1 of 1", None) and not s.status_ok(a, "msg", "hold: 1 of 1", "")
    assert token != s.csrf_token(a)


def test_the_secret_is_made_once_and_private(tmp_path: Path) -> None:
    first = load_secret(tmp_path)
    assert load_secret(tmp_path) == first and len(first) == 32
    assert stat.S_IMODE((tmp_path / "console" / "secret").stat().st_mode) == 0o600
    (tmp_path / "console" / "secret").write_bytes(b"short")
    with pytest.raises(ValueError, match="damaged"):
        load_secret(tmp_path)


@pytest.mark.parametrize("header, chosen, lang", [
    ("ja,en;q=0.5", None, "ja"), ("en-US,ja;q=0.9", None, "en"), ("fr, ja;q=0.3", None, "ja"),
    ("fr", None, "en"), (None, None, "en"), ("en", "ja", "ja"), ("ja-JP", None, "ja"), ("ja;q=x", None, "en"),
])
def test_the_language_comes_from_the_admin_then_the_browser(header, chosen, lang) -> None:
    assert i18n.negotiate(header, chosen) == lang


def test_every_text_of_the_pages_has_a_japanese_translation() -> None:
    here = Path(i18n.__file__).parent
    wanted = set()
    for f in [*(here / "templates").glob("*.html"), here / "app.py"]:
        wanted |= set(re.findall(r'(?<![A-Za-z])_\("([^"]+)"\)', f.read_text()))
        wanted |= set(re.findall(r'gettext\("([^"]+)"\)', f.read_text()))
    # Words the templates translate from data: states, filters, actions, roles, series.
    wanted |= {"active", "deferred", "hold", "corrupt", "all", "release", "delete", "bounce", "flush",
               "from", "to", "domain", "older_than", "reason", "subject", "header", "body", "size", "attempts",
               "admin", "operator", "auditor", *charts.SERIES,
               "ok", "warning", "error"}  # DNS check severities
    assert len(wanted) > 80
    missing = sorted(w for w in wanted if w not in i18n.catalogue("ja"))
    assert not missing, missing


def test_every_refusal_has_a_japanese_translation_with_the_same_fields() -> None:
    """An error page shows a refusal's message in the reader's language: its template
    translated, then filled ({role}, {path}...), so each translation keeps the fields."""
    text = (Path(i18n.__file__).parent / "app.py").read_text()
    templates = set(re.findall(r'Refused\(\d+, "([^"]+)"(?=[,)])', text))
    templates |= {"the request was refused"}  # Refused(status, ...) of Starlette's own refusals
    assert len(templates) > 40
    ja = i18n.catalogue("ja")
    assert not sorted(t for t in templates if t not in ja)
    fields = re.compile(r"\{(\w+)\}")
    assert [t for t in templates if sorted(fields.findall(t)) != sorted(fields.findall(ja[t]))] == []


@pytest.mark.parametrize("value, top", [(0, 1), (1, 1), (3, 5), (7, 10), (11, 20), (150, 200), (1000, 1000)])
def test_the_chart_axis_ends_at_a_round_number(value, top) -> None:
    assert charts.nice_max(value) == top


def test_the_chart_is_svg_without_style_or_script_and_escapes_labels() -> None:
    points = [{"received": 3, "delivered": 2}, {"received": 5, "rejected": 1}]
    svg = charts.line_chart(points, ["<a>", "b"], "t&t", legend={"received": "受信"})
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "style=" not in svg and "<script" not in svg
    assert "&lt;a&gt;" in svg and "t&amp;t" in svg and "受信" in svg
    assert svg.count("<polyline") == len(charts.SERIES)


def test_plain_http_is_refused_off_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        parse_config('[console]\nlisten = "192.0.2.1:8443"\ntls = false\n')
    with pytest.raises(ConfigError, match="loopback"):
        parse_config('[console]\nlisten = "localhost:8443"\ntls = false\n')
    assert parse_config('[console]\nlisten = "[::1]:8443"\ntls = false\n').console.listen == ("::1", 8443)
    assert parse_config('[console]\nlisten = "192.0.2.1:8443"\n').console.tls is True
    assert parse_config("").console is None


def test_a_node_without_a_console_does_not_import_the_web_stack() -> None:
    import subprocess

    code = ("import sys, kanmon.node, kanmon.cli; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2', 'babel', 'kanmon.console.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_dashboard_charts_from_shared_records_are_kept_a_while_and_this_nodes_counted_each_visit():
    """Every node's history in PostgreSQL has no counts per quarter hour: its chart (a
    GROUP BY over the period) is kept CHART_TTL seconds; this node's own records are
    counted on each visit (history_slots)."""
    import asyncio
    from types import SimpleNamespace

    from kanmon.console.app import CHART_TTL, ConsoleApp

    def console(url: str | None):
        asked: list = []

        async def stats(by, since, top=5):
            asked.append((by, since, top))
            return {"count": len(asked)}

        return SimpleNamespace(config=SimpleNamespace(records=SimpleNamespace(url=url)), _chart_cache={},
                               _stats=stats), asked

    def chart(c, by, now):
        return asyncio.run(ConsoleApp._chart_stats(c, by, now))

    shared, asked = console("postgresql://kanmon@127.0.0.1/kanmon")
    assert chart(shared, "hour", 1000.0) == {"count": 1}
    assert chart(shared, "hour", 1000.0 + CHART_TTL["hour"] - 1) == {"count": 1}  # kept
    assert chart(shared, "day", 1001.0) == {"count": 2}  # each chart its own
    assert chart(shared, "hour", 1000.0 + CHART_TTL["hour"]) == {"count": 3}  # counted again
    assert chart(shared, "hour", 500.0) == {"count": 4}  # a clock set back does not keep an old count
    assert asked[0] == ("hour", 1000.0 - 24 * 3600, 0) and asked[1] == ("day", 1001.0 - 30 * 86400, 0)
    own, asked = console(None)
    assert [chart(own, "hour", 1000.0) for _ in range(3)] == [{"count": 1}, {"count": 2}, {"count": 3}]
