"""`kanmon balance status` against a running balancer's status file, and
`kanmon balance export --haproxy` (checked by HAProxy itself when it is installed)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kanmon.balancer.status import FORMAT_VERSION, status_path, write_status
from kanmon.cli import main
from kanmon.config import parse_config
from tests.integration.test_balancer import (
    DEADLINE,
    MR1,
    MR2,
    VIP,
    Client,
    FakeRelay,
    balancer,
    config_text,
    free_port,
    kill_all,
    one_vs,
    relays,
    run,
    wait_until,
)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_status_shows_each_real_server_while_running_and_after_stop(tmp_path):
    async def main_() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "standby")])
        cfg = tmp_path / "kanmon.toml"
        cfg.write_text(config_text(tmp_path, vs))
        async with balancer(tmp_path, vs) as b:
            for _ in range(3):
                assert await Client(port).session() == "mr1"
            status_file = status_path(tmp_path / "data")
            assert b.service.status_file == status_file

            def written() -> bool:
                doc = json.loads(status_file.read_text()) if status_file.exists() else {}
                servers = doc.get("virtual_servers", [{}])[0].get("servers", [])
                return bool(servers) and servers[0]["total_connections"] == 3 and servers[1]["checks_passed"] > 0

            await wait_until(written, "the status file to show 3 connections")

            code, out, err = invoke("balance", "status", "-c", str(cfg))
            assert code == 0, err
            assert err == ""
            assert f"mail  {VIP}:{port}  method first-alive" in out
            row1 = next(line for line in out.splitlines() if mr1.address in line)
            row2 = next(line for line in out.splitlines() if mr2.address in line)
            assert " active " in row1 and " up " in row1
            assert " standby " in row2 and " up " in row2
            bytes_in = len(b"HELO client.example.test\r\nQUIT\r\n") * 3
            assert f"{bytes_in} B" in row1  # 3 sessions of HELO + QUIT

            code, out, _ = invoke("balance", "status", "-c", str(cfg), "--json")
            assert code == 0
            doc = json.loads(out)
            assert doc["problem"] is None
            first = doc["status"]["virtual_servers"][0]["servers"][0]
            assert (first["address"], first["state"], first["total_connections"], first["connections"]) == (
                mr1.address, "up", 3, 0,
            )
            assert first["bytes_in"] == bytes_in and first["bytes_out"] > 0
            assert first["checks_passed"] > 0 and first["checks_failed"] == 0

            await mr1.kill()
            await wait_until(lambda: b.saw("failover"), "failover")
            await wait_until(lambda: '"down"' in status_file.read_text(), "the status file to show the failover")
            code, out, _ = invoke("balance", "status", "-c", str(cfg), "--json")
            doc = json.loads(out)["status"]["virtual_servers"][0]
            assert doc["serving"] == "standby"
            assert doc["servers"][0]["state"] == "down" and doc["servers"][0]["checks_failed"] >= 2

        code, out, err = invoke("balance", "status", "-c", str(cfg))
        assert code == 1
        assert "the balancer is not running (it stopped at" in err
        assert mr2.address in out  # the last known values are still shown
        await kill_all(mr2)

    run(main_())


def test_status_when_not_running_stale_or_not_configured(tmp_path):
    relay = FakeRelay(MR1, "mr1", port=2525)
    cfg = tmp_path / "kanmon.toml"
    cfg.write_text(config_text(tmp_path, one_vs(2500, [(relay, "active")])))

    code, out, err = invoke("balance", "status", "-c", str(cfg))
    assert code == 1 and out == ""
    assert f"the balancer is not running (no status file {tmp_path / 'data' / 'balancer-status.json'})" in err

    path = status_path(tmp_path / "data")
    path.parent.mkdir(parents=True)
    doc = {
        "format": FORMAT_VERSION, "pid": 4242, "running": True, "started_at": 0,
        "updated_at": time.time() - 600, "virtual_servers": [],
    }
    write_status(path, doc)
    code, out, err = invoke("balance", "status", "-c", str(cfg), "--json")
    assert code == 1
    assert "stale" in json.loads(out)["problem"] and "pid 4242" in json.loads(out)["problem"]

    path.write_text("{not json")
    code, _, err = invoke("balance", "status", "-c", str(cfg))
    assert code == 1 and "is not valid JSON" in err

    plain = tmp_path / "plain.toml"
    plain.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    code, _, err = invoke("balance", "status", "-c", str(plain))
    assert code == 2 and "has no [balancer] section" in err


HAPROXY_CONFIG = """
[[balancer.virtual_server]]
name = "mail"
listen = "127.0.0.30:2500"
method = "first-alive"
proxy_protocol = true
health = { type = "smtp", interval = "10s", timeout = "2s", retries = 3 }

[[balancer.virtual_server.real]]
address = "127.0.0.31:2525"
mode = "active"
max_connections = 50

[[balancer.virtual_server.real]]
address = "127.0.0.32:2525"
mode = "standby"

[[balancer.virtual_server]]
name = "web frontends"
listen = "[::1]:8080"
method = "weighted"
idle_timeout = "90s"
connect_timeout = "1500ms"
health = { type = "http", interval = "5s", path = "/healthz", host = "mx.example.test", fall = 2, rise = 3 }

[[balancer.virtual_server.real]]
address = "127.0.0.33:80"
weight = 3

[[balancer.virtual_server.real]]
address = "[::1]:8081"
weight = 1

[[balancer.virtual_server.real]]
address = "127.0.0.34:80"
mode = "disabled"

[[balancer.virtual_server]]
name = "hash"
listen = "127.0.0.30:2501"
method = "source-ip-hash"
health = { type = "tcp" }
[[balancer.virtual_server.real]]
address = "127.0.0.31:2525"

[[balancer.virtual_server]]
name = "rtt"
listen = "127.0.0.30:2502"
method = "least-rtt"
health = { type = "ping" }
[[balancer.virtual_server.real]]
address = "127.0.0.31:2525"
"""


def _export(tmp_path: Path) -> tuple[str, str]:
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path}"\n{HAPROXY_CONFIG}')
    code, out, err = invoke("balance", "export", "--haproxy", "-c", str(cfg))
    assert code == 0, err
    return out, err


def _section(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(header)
    out = []
    for line in lines[start + 1 :]:
        if not line.startswith("    "):
            break
        out.append(line.strip())
    return out


def test_export_haproxy_maps_every_setting(tmp_path):
    out, err = _export(tmp_path)
    assert "mode tcp" in _section(out, "defaults")
    assert _section(out, "frontend mail") == ["bind 127.0.0.30:2500", "timeout client 600s", "default_backend mail"]
    mail = _section(out, "backend mail")
    assert "balance first" in mail
    assert "option smtpchk" in mail
    assert "default-server inter 10s fall 3 rise 1" in mail
    assert "timeout check 2s" in mail and "timeout connect 5s" in mail
    assert "server 127.0.0.31:2525 127.0.0.31:2525 check send-proxy-v2 maxconn 50" in mail
    assert "server 127.0.0.32:2525 127.0.0.32:2525 check send-proxy-v2 backup" in mail

    assert "bind ipv6@::1:8080" in _section(out, "frontend web_frontends")
    web = _section(out, "backend web_frontends")
    assert "balance roundrobin" in web
    assert "option httpchk" in web
    assert "http-check send meth GET uri /healthz hdr Host mx.example.test" in web
    assert "http-check expect status 200-399" in web
    assert "default-server inter 5s fall 2 rise 3" in web
    assert "timeout connect 1500ms" in web and "timeout server 90s" in web
    assert "server 127.0.0.33:80 127.0.0.33:80 check weight 3" in web
    assert "server ::1:8081 ipv6@::1:8081 check weight 1" in web
    assert "server 127.0.0.34:80 127.0.0.34:80 check weight 1 disabled" in web
    assert not any("send-proxy" in line for line in web)

    hashed = _section(out, "backend hash")
    assert "balance source" in hashed and "hash-type consistent" in hashed
    assert not any("chk" in line for line in hashed)  # tcp: a plain connect check

    rtt = _section(out, "backend rtt")
    assert "balance leastconn" in rtt
    assert "least-rtt has no HAProxy equivalent" in err and "no ICMP check" in err
    assert any("least-rtt has no HAProxy equivalent" in line for line in rtt)


def test_export_needs_a_format_and_a_balancer(tmp_path):
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path}"\n{HAPROXY_CONFIG}')
    code, _, err = invoke("balance", "export", "-c", str(cfg))
    assert code == 2 and "--haproxy" in err
    plain = tmp_path / "plain.toml"
    plain.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    code, _, err = invoke("balance", "export", "--haproxy", "-c", str(plain))
    assert code == 2 and "has no [[balancer.virtual_server]]" in err


HAPROXY = shutil.which("haproxy") or (Path("/usr/sbin/haproxy").is_file() and "/usr/sbin/haproxy") or None


@pytest.mark.skipif(not HAPROXY, reason="haproxy is not installed (apt-get install haproxy) to check the export with")
def test_exported_config_passes_haproxy_check(tmp_path):
    out, _ = _export(tmp_path)
    path = tmp_path / "haproxy.cfg"
    path.write_text(out)
    assert HAPROXY
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Configuration file is valid" in check.stdout + check.stderr


@pytest.mark.skipif(not HAPROXY, reason="haproxy is not installed (apt-get install haproxy) to run the export with")
def test_exported_config_runs_in_haproxy_with_failover_and_proxy_v2(tmp_path):
    """The export is not only valid: HAProxy running it behaves like kanmon's balancer."""

    async def main_() -> None:
        mr1 = await FakeRelay(MR1, "mr1", expect_proxy=True).start()
        mr2 = await FakeRelay(MR2, "mr2", expect_proxy=True).start()
        port = free_port(VIP)
        hc = '{ type = "smtp", interval = "100ms", timeout = "1s", retries = 2 }'
        vs = one_vs(port, [(mr1, "active"), (mr2, "standby")], health_check=hc, extra_vs="proxy_protocol = true")
        config = parse_config(config_text(tmp_path, vs))
        from kanmon.balancer.haproxy import haproxy_config

        path = tmp_path / "haproxy.cfg"
        path.write_text(haproxy_config(config).text.replace("log stdout format raw local0", ""))
        assert HAPROXY
        proc = await asyncio.create_subprocess_exec(
            HAPROXY, "-db", "-f", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:

            async def answers() -> str:
                try:
                    return await Client(port, "127.0.0.78").session()
                except (ConnectionError, TimeoutError, AssertionError):
                    return ""

            deadline = asyncio.get_running_loop().time() + DEADLINE
            while await answers() != "mr1":
                assert asyncio.get_running_loop().time() < deadline, "haproxy never served mr1"
                await asyncio.sleep(0.05)
            session = mr1.sessions[-1]
            assert session.proxy is not None and session.proxy.source is not None
            assert session.proxy.source[0] == "127.0.0.78"
            await mr1.kill()
            deadline = asyncio.get_running_loop().time() + DEADLINE
            while await answers() != "mr2":
                assert asyncio.get_running_loop().time() < deadline, "haproxy never failed over to mr2"
                await asyncio.sleep(0.05)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), DEADLINE)
        await kill_all(mr2)

    run(main_())
