"""`kanmon queue summary`'s quick path (kanmon.quick): a running server's answer printed
as the command prints it, without the command line's start-up; anything else is left to
the whole command line."""

from __future__ import annotations

import asyncio
import json
import threading

from kanmon import quick
from kanmon.control import ControlServer
from kanmon.qshape import summary_lines

SUMMARY = {"by": "domain", "buckets": ["5m", "10m", "10m+"], "total": {"count": 3, "counts": [1, 0, 2]},
           "rows": [{"key": "d1.example", "count": 2, "counts": [1, 0, 1]},
                    {"key": "d2.example", "count": 1, "counts": [0, 0, 1]}], "states": {"deferred": 3}}


def with_server(data_dir, fn):
    """fn() run in a thread while a ControlServer answers every summary with SUMMARY."""
    asked: list = []
    out: list = []

    async def handler(request, progress=None):
        asked.append(request)
        return {"ok": True, "result": SUMMARY}

    async def main():
        server = ControlServer(data_dir, handler)
        await server.start()
        try:
            t = threading.Thread(target=lambda: out.append(fn()))
            t.start()
            while t.is_alive():
                await asyncio.sleep(0.01)
        finally:
            await server.stop()

    asyncio.run(main())
    return out[0], asked


def config(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(f'[server]\ndata_dir = "{data_dir}"\n')
    return data_dir, str(cfg)


def test_the_summary_of_a_running_server_printed_as_the_command_prints_it(tmp_path, capsys):
    data_dir, cfg = config(tmp_path)
    answered, asked = with_server(data_dir, lambda: quick._summary(["queue", "summary", "-c", cfg, "--by", "sender"]))
    assert answered is True
    assert [r["args"] for r in asked] == [{"filters": {}, "by": "sender"}]
    assert capsys.readouterr().out == "\n".join(summary_lines(SUMMARY)) + "\n"
    answered, _ = with_server(data_dir, lambda: quick._summary(["-c", cfg, "queue", "summary", "--json"]))
    assert answered is True and json.loads(capsys.readouterr().out) == SUMMARY


def test_anything_else_goes_the_whole_way(tmp_path, capsys):
    data_dir, cfg = config(tmp_path)
    for argv in (["queue", "summary", "-c", cfg, "--domain", "d1.example"], ["queue", "summary", "--help"],
                 ["queue", "list", "-c", cfg], ["queue", "summary", "-c", cfg, "--by", "size"],
                 ["queue", "summary", "-c"], ["--json", "queue", "summary", "-c", cfg]):
        answered, asked = with_server(data_dir, lambda argv=argv: quick._summary(argv))
        assert answered is False and asked == [], argv
    # no server answering, a missing file, a file that is not TOML
    assert quick._summary(["queue", "summary", "-c", cfg]) is False
    assert quick._summary(["queue", "summary", "-c", str(tmp_path / "absent.toml")]) is False
    (tmp_path / "bad.toml").write_text("[server\n")
    assert quick._summary(["queue", "summary", "-c", str(tmp_path / "bad.toml")]) is False
    assert capsys.readouterr().out == ""


def test_a_million_keeps_its_columns_apart():
    big = {**SUMMARY, "total": {"count": 1_000_000, "counts": [1, 0, 999_999]}}
    assert "TOTAL 1000000" in summary_lines(big)[1]
    assert summary_lines(SUMMARY)[1].split() == ["TOTAL", "3", "1", "0", "2"]


def test_a_domain_from_the_network_reaches_the_terminal_escaped():
    # an SMTPUTF8 domain may carry C1 controls (CSI) and bidi overrides: never raw on a terminal
    hostile = "ev\u009b31mil\u202e.example"
    row = {"key": hostile, "count": 1, "counts": [0, 1, 0]}
    lines = summary_lines({**SUMMARY, "rows": [row]})
    assert not any(ch in "".join(lines) for ch in "\u009b\u202e")
    assert lines[2].split()[0].startswith("ev") and lines[2].split()[1:] == ["1", "0", "1", "0"]


def test_the_json_summary_reaches_the_terminal_escaped(tmp_path, capsys):
    hostile = "ev\u009b31mil\u202e.example"
    row = {"key": hostile, "count": 1, "counts": [0, 1, 0]}
    data_dir, cfg = config(tmp_path)

    async def handler(request, progress=None):
        return {"ok": True, "result": {**SUMMARY, "rows": [row]}}

    async def main():
        server = ControlServer(data_dir, handler)
        await server.start()
        try:
            return await asyncio.to_thread(quick._summary, ["queue", "summary", "-c", cfg, "--json"])
        finally:
            await server.stop()

    assert asyncio.run(main()) is True
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\u009b\u202e")
    assert json.loads(out)["rows"][0]["key"] == hostile
