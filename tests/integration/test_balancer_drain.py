"""An administrator's mode for a real server at run time (drain): the service, the
modes file across a restart, and `kanmon balance set` against a running node."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kanmon.balancer.status import MODES_FILE, read_admin_modes
from tests.integration.test_balancer import (
    MR1,
    MR2,
    VIP,
    Client,
    balancer,
    free_port,
    kill_all,
    one_vs,
    relays,
    run,
    wait_until,
)


def _names(sessions: list[str]) -> set[str]:
    return set(sessions)


def test_a_drained_server_gets_no_new_connections_while_its_open_ones_finish(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "active")], method="round-robin")
        async with balancer(tmp_path, vs) as b:
            # An open session on each real server.
            held = [Client(port), Client(port)]
            assert {await c.open() for c in held} == {"mr1", "mr2"}
            on_mr1 = next(c for c in held if c.banner.split(" ")[1] == "mr1")

            result = b.service.set_mode("mail", mr1.address, "disabled", by="alice")
            assert (result["mode"], result["configured_mode"], result["admin_mode"], result["changed"]) == (
                "disabled", "active", "disabled", True)
            assert result["connections"] == 1  # still open
            assert b.saw(f"real server {mr1.address} set to disabled (drained") and b.saw("by alice")
            assert not b.alerts  # the choice itself is no incident; mr2 still serves

            before = len(mr1.sessions)
            assert _names([await Client(port).session() for _ in range(6)]) == {"mr2"}
            assert len(mr1.sessions) == before  # no new connection reached mr1 ...
            # ... while the session opened before the drain goes on and ends normally.
            assert (await on_mr1.command("HELO still.example.test")).startswith("250 mr1")
            assert (await on_mr1.command("QUIT")).startswith("221")
            for c in held:
                await c.close()
            await wait_until(lambda: b.server(0)["connections"] == 0, "the drained server's connection to end")
            assert b.server(0)["state"] == "up"  # still checked: its health stays visible

            # Setting it again changes nothing; enabled gives it back.
            assert b.service.set_mode("mail", mr1.address, "disabled")["changed"] is False
            back = b.service.set_mode("mail", mr1.address, "enabled")
            assert (back["mode"], back["admin_mode"], back["changed"]) == ("active", None, True)
            assert _names([await Client(port).session() for _ in range(4)]) == {"mr1", "mr2"}
        await kill_all(mr1, mr2)

    run(main())


def test_draining_the_active_server_fails_over_and_enabling_it_fails_back(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "standby")])
        async with balancer(tmp_path, vs) as b:
            assert await Client(port).session() == "mr1"
            b.service.set_mode("mail", mr1.address, "disabled")
            assert b.service.status()["virtual_servers"][0]["serving"] == "standby"
            assert b.saw("failover")
            assert await Client(port).session() == "mr2"
            b.service.set_mode("mail", mr1.address, "enabled")
            assert b.saw("failback")
            assert await Client(port).session() == "mr1"
            # An active server set to standby serves when no active server is up (here: none is).
            b.service.set_mode("mail", mr1.address, "standby")
            assert b.service.status()["virtual_servers"][0]["serving"] == "standby"
            assert await Client(port).session() == "mr1"  # first-alive among the standby tier
        await kill_all(mr1, mr2)

    run(main())


def test_unknown_names_and_bad_modes_are_refused(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "disabled")])
        async with balancer(tmp_path, vs) as b:
            with pytest.raises(LookupError, match="no virtual server 'web'"):
                b.service.set_mode("web", mr1.address, "disabled")
            with pytest.raises(LookupError, match="has no real server"):
                b.service.set_mode("mail", "127.0.0.99:25", "disabled")
            with pytest.raises(ValueError, match="not a mode"):
                b.service.set_mode("mail", mr1.address, "active")
            with pytest.raises(ValueError, match="disabled in the configuration"):
                b.service.set_mode("mail", mr2.address, "standby")
        await kill_all(mr1, mr2)

    run(main())


def test_the_mode_is_kept_across_a_restart_of_the_service(tmp_path):
    async def main() -> None:
        mr1, mr2 = await relays((MR1, "mr1"), (MR2, "mr2"))
        port = free_port(VIP)
        vs = one_vs(port, [(mr1, "active"), (mr2, "standby")])
        async with balancer(tmp_path, vs) as b:
            b.service.set_mode("mail", mr1.address, "disabled")
        modes, problem = read_admin_modes(tmp_path / "data")
        assert problem is None and modes["mail"][mr1.address]["mode"] == "disabled"
        async with balancer(tmp_path, vs) as b:
            assert b.saw(f"real server {mr1.address} stays disabled")
            assert b.server(0)["mode"] == "disabled"
            assert b.service.status()["virtual_servers"][0]["serving"] == "standby"
            assert await Client(port).session() == "mr2"
            b.service.set_mode("mail", mr1.address, "enabled")
        assert read_admin_modes(tmp_path / "data") == ({}, None)
        # A mode for a server the configuration no longer has is dropped, and said.
        (tmp_path / "data" / MODES_FILE).write_text(json.dumps(
            {"format": 1, "modes": {"mail": {"127.0.0.99:25": {"mode": "disabled", "since": 1}}}}))
        async with balancer(tmp_path, vs) as b:
            assert b.saw("127.0.0.99:25 is dropped")
            assert await Client(port).session() == "mr1"
        assert read_admin_modes(tmp_path / "data") == ({}, None)
        # A damaged file is ignored, never fatal.
        (tmp_path / "data" / MODES_FILE).write_text("{not json")
        async with balancer(tmp_path, vs) as b:
            assert b.saw("not a balancer modes file")
            assert await Client(port).session() == "mr1"
        await kill_all(mr1, mr2)

    run(main())


LB = """
[server]
hostname = "lb.corp.example"
data_dir = "{data_dir}"

[[balancer.virtual_server]]
name = "mail"
listen = "{vip}:{vport}"
method = "round-robin"
health = {{ type = "smtp", interval = "0.2s", timeout = "1s", retries = 2 }}
{extra}
[[balancer.virtual_server.real]]
address = "{mr1}"
mode = "active"

[[balancer.virtual_server.real]]
address = "{mr2}"
mode = "active"
"""


def _kanmon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kanmon", *args], capture_output=True, text=True, timeout=60)


def test_kanmon_balance_set_against_a_running_node_and_across_a_reload(tmp_path):
    from tests.support.kanmon_node import KanmonProcess, wait_for

    async def start_relays():
        return await relays((MR1, "mr1"), (MR2, "mr2"))

    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        holder["relays"] = loop.run_until_complete(start_relays())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    mr1, mr2 = holder["relays"]
    vport = free_port(VIP)
    cfg = tmp_path / "lb.toml"

    def write(extra: str = "") -> None:
        cfg.write_text(LB.format(data_dir=tmp_path / "lb", vip=VIP, vport=vport, mr1=mr1.address, mr2=mr2.address,
                                 extra=extra))

    def served_by() -> str:
        return asyncio.run_coroutine_threadsafe(Client(vport).session(), loop).result(20)

    write()
    lb = KanmonProcess(cfg, VIP, vport).start()
    try:
        done = _kanmon("balance", "set", "mail", mr1.address, "disabled", "-c", str(cfg))
        assert done.returncode == 0, done.stderr
        assert f"mail {mr1.address}: now disabled (configured active), up" in done.stdout
        assert {served_by() for _ in range(6)} == {"mr2"}

        def status_shows(mode: str) -> bool:
            st = _kanmon("balance", "status", "-c", str(cfg), "--json")
            servers = json.loads(st.stdout)["status"]["virtual_servers"][0]["servers"]
            return servers[0]["mode"] == mode

        wait_for(lambda: status_shows("disabled"), 60, "the status to show the drained server")
        table = _kanmon("balance", "status", "-c", str(cfg))
        row = next(line for line in table.stdout.splitlines() if mr1.address in line)
        assert "disabled (set; configured active)" in row

        refused = _kanmon("balance", "set", "mail", "127.0.0.99:25", "disabled", "-c", str(cfg))
        assert refused.returncode == 1 and "has no real server '127.0.0.99:25'" in refused.stderr

        # A reload that changes the balancer section restarts the balancer: the mode stays.
        write('connect_timeout = "4s"')
        reload = _kanmon("reload", "-c", str(cfg))
        assert reload.returncode == 0, reload.stderr

        def drained_after_reload() -> bool:
            log = (tmp_path / "lb/log/kanmon.log").read_text()
            return f"real server {mr1.address} stays disabled" in log

        wait_for(drained_after_reload, 60, "the reloaded balancer to keep the mode")
        assert {served_by() for _ in range(6)} == {"mr2"}

        back = _kanmon("balance", "set", "mail", mr1.address, "enabled", "-c", str(cfg), "--json")
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)["mode"] == "active"
        assert {served_by() for _ in range(6)} == {"mr1", "mr2"}
        log = (tmp_path / "lb/log/kanmon.log").read_text()
        assert "set to disabled (drained: no new connections, open ones finish) by" in log
        assert "(kanmon balance set)" in log
    finally:
        lb.terminate()
        asyncio.run_coroutine_threadsafe(kill_all(mr1, mr2), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_kanmon_balance_set_without_a_running_node_says_so(tmp_path):
    cfg = tmp_path / "lb.toml"
    cfg.write_text(LB.format(data_dir=tmp_path / "lb", vip=VIP, vport=2525, mr1="127.0.0.31:25", mr2="127.0.0.32:25",
                             extra=""))
    (tmp_path / "lb" / "spool").mkdir(parents=True, mode=0o700)
    (tmp_path / "lb").chmod(0o700)
    done = _kanmon("balance", "set", "mail", "127.0.0.31:25", "disabled", "-c", str(cfg))
    assert done.returncode == 1
    assert "not running" in done.stderr
