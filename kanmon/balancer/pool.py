"""Real servers of one virtual server: health state and the choice of a server.

Role: the balancer's decisions, without I/O. It keeps, for each real server, its
health state (up/down/disabled, driven by check results with rise/fall), its counters
(connections, bytes) and its smoothed check round-trip time; it orders the servers a
new connection should try (the method's choice first) and reports state changes
(down, up, failover, failback) as PoolEvents for the service to log and alert.

Trusts: the validated config (kanmon.config.VirtualServer) and the check results and
counts the service feeds it; client addresses are used only as hash input.

An administrator may set a server to disabled or standby at run time (set_mode); its
`mode` is then that one, its configured mode stays in `config.mode`.

Never: touch the network or a clock of its own (callers pass `now`), send traffic to a
`disabled` server (configured or set), to a standby server while an active server is
up (except as the last resort for one connection whose every active server refused it,
see plan()), or to a server at its max_connections.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # only the attributes are used: a forwarding process need not load the config models
    from kanmon.config import RealServer, VirtualServer

State = Literal["up", "down", "disabled"]
Tier = Literal["active", "standby", "none"]
# What an administrator may set at run time (`kanmon balance set`, the console):
# "enabled" gives a real server back its configured mode.
ADMIN_MODES = ("disabled", "standby", "enabled")

# least-rtt: the check round-trip time is smoothed so that one slow check does not
# move all new connections (weight of the newest sample).
RTT_SMOOTHING = 0.3


def address_text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class RealServerState:
    """One real server as the balancer sees it. Counters are totals since start."""

    config: RealServer
    index: int
    state: State
    since: float
    checks_passed: int = 0
    checks_failed: int = 0
    rise_streak: int = 0
    fall_streak: int = 0
    last_check: str = "not checked yet"
    rtt: float | None = None  # seconds, smoothed
    connections: int = 0  # open now (including ones still connecting)
    total_connections: int = 0  # successfully connected, since start
    failed_connects: int = 0
    bytes_in: int = 0  # from clients to this server (HAProxy's "bin")
    bytes_out: int = 0  # from this server to clients ("bout")
    wrr_current: int = 0  # smooth weighted round-robin state
    # Set at run time by an administrator ("disabled" or "standby"), overriding the
    # configured mode until set back to "enabled"; None: the configured mode applies.
    admin_mode: str | None = None
    admin_since: float | None = None
    # With several balancer processes (kanmon.balancer.shared): the open connections of
    # the other processes, and where this process publishes its own count when it changes.
    others: int = 0
    on_open_changed: Callable[[RealServerState], None] | None = None

    @property
    def address(self) -> str:
        return address_text(self.config.address)

    @property
    def mode(self) -> str:
        """The mode new connections are chosen by: the administrator's, else the configured one."""
        return self.admin_mode or self.config.mode

    def has_capacity(self) -> bool:
        limit = self.config.max_connections
        return limit == 0 or self.connections + self.others < limit

    def opened(self) -> None:
        """One more connection open (or connecting) to this server."""
        self.connections += 1
        if self.on_open_changed is not None:
            self.on_open_changed(self)

    def closed(self) -> None:
        self.connections -= 1
        if self.on_open_changed is not None:
            self.on_open_changed(self)

    def snapshot(self) -> dict[str, object]:
        return {
            "address": self.address,
            "mode": self.mode,
            "configured_mode": self.config.mode,
            "admin_mode": self.admin_mode,
            "admin_since": self.admin_since,
            "state": self.state,
            "since": self.since,
            "weight": self.config.weight,
            "max_connections": self.config.max_connections,
            "checks_passed": self.checks_passed,
            "checks_failed": self.checks_failed,
            "last_check": self.last_check,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "connections": self.connections,
            "total_connections": self.total_connections,
            "failed_connects": self.failed_connects,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


@dataclass(frozen=True, slots=True)
class PoolEvent:
    kind: Literal["down", "up", "failover", "failback", "all-down", "restored", "admin"]
    text: str


@dataclass(slots=True)
class Pool:
    """The real servers of one virtual server and how new connections are spread."""

    vs: VirtualServer
    servers: list[RealServerState] = field(default_factory=list)
    tier: Tier = "none"
    _rotation: int = 0

    @classmethod
    def from_config(cls, vs: VirtualServer, now: float) -> Pool:
        # Servers start "up" (as in HAProxy): the first check runs at once, and a server
        # that does not answer leaves after `fall` failed checks; until then a refused
        # connect is retried on the next server (plan()).
        servers = [
            RealServerState(rs, i, "disabled" if rs.mode == "disabled" else "up", now)
            for i, rs in enumerate(vs.real)
        ]
        pool = cls(vs, servers)
        pool.tier = pool._serving_tier()
        return pool

    @property
    def fall(self) -> int:
        h = self.vs.health
        return h.fall if h.fall is not None else h.retries

    @property
    def rise(self) -> int:
        return self.vs.health.rise

    def checked_servers(self) -> list[RealServerState]:
        """Servers that get health checks: every one that is not disabled."""
        return [s for s in self.servers if s.config.mode != "disabled"]

    # -- health ------------------------------------------------------------------

    def record_check(
        self, server: RealServerState, ok: bool, detail: str, rtt: float | None, now: float
    ) -> list[PoolEvent]:
        """Feed one check result; returns the state changes it caused (maybe none)."""
        events: list[PoolEvent] = []
        kind = self.vs.health.type
        server.last_check = detail
        if ok:
            server.checks_passed += 1
            server.rise_streak += 1
            server.fall_streak = 0
            if rtt is not None:
                server.rtt = rtt if server.rtt is None else (1 - RTT_SMOOTHING) * server.rtt + RTT_SMOOTHING * rtt
            if server.state == "down" and server.rise_streak >= self.rise:
                server.state, server.since = "up", now
                n = server.rise_streak
                events.append(PoolEvent(
                    "up", f"{self._who(server)} is up after {n} passed {kind} check{'s' if n > 1 else ''}: {detail}"
                ))
        else:
            server.checks_failed += 1
            server.fall_streak += 1
            server.rise_streak = 0
            if server.state == "up" and server.fall_streak >= self.fall:
                server.state, server.since = "down", now
                n = server.fall_streak
                events.append(PoolEvent(
                    "down", f"{self._who(server)} is down after {n} failed {kind} check{'s' if n > 1 else ''}: {detail}"
                ))
        if events:
            events.extend(self._tier_change())
        return events

    def _who(self, server: RealServerState) -> str:
        return f"balancer {self.vs.name}: real server {server.address} ({server.mode})"

    # -- administrator -------------------------------------------------------------

    def find(self, address: str) -> RealServerState | None:
        """The real server written as ip:port (or [ipv6]:port), as status shows it."""
        return next((s for s in self.servers if s.address == address), None)

    def set_mode(self, server: RealServerState, mode: str, now: float, by: str = "an administrator") -> list[PoolEvent]:
        """An administrator's mode for server: "disabled" (drain: no new connections,
        open ones finish), "standby", or "enabled" (its configured mode again).

        Raises ValueError for a mode that is not one of ADMIN_MODES, or for a server
        disabled in the configuration (it has no health checks; the config enables it).
        Returns the events: the change itself, then any failover/failback it causes;
        nothing when the mode is already in effect.
        """
        if mode not in ADMIN_MODES:
            raise ValueError(f"{mode!r} is not a mode to set ({', '.join(ADMIN_MODES)})")
        if server.config.mode == "disabled":
            raise ValueError(f"real server {server.address} is disabled in the configuration; "
                             "set its mode there and reload")
        new = None if mode == "enabled" or mode == server.config.mode else mode
        if new == server.admin_mode:
            return []
        old_mode = server.mode
        server.admin_mode = new
        server.admin_since = None if new is None else now
        if new is None:
            what = f"back to its configured mode {server.config.mode}"
        elif new == "disabled":
            what = "disabled (drained: no new connections, open ones finish)"
        else:
            what = new
        text = (f"balancer {self.vs.name}: real server {server.address} set to {what} by {by} "
                f"(was {old_mode}; configured {server.config.mode})")
        return [PoolEvent("admin", text), *self._tier_change()]

    def settle_tier(self) -> None:
        """Recompute the serving tier without events (after modes were restored at start)."""
        self.tier = self._serving_tier()

    def admin_modes(self) -> dict[str, str]:
        """address -> administrator's mode, for the servers that have one."""
        return {s.address: s.admin_mode for s in self.servers if s.admin_mode is not None}

    def _serving_tier(self) -> Tier:
        if any(s.state == "up" and s.mode == "active" for s in self.servers):
            return "active"
        if any(s.state == "up" and s.mode == "standby" for s in self.servers):
            return "standby"
        return "none"

    def _tier_change(self) -> list[PoolEvent]:
        old, new = self.tier, self._serving_tier()
        if old == new:
            return []
        self.tier = new
        up = ", ".join(s.address for s in self.servers if s.state == "up" and s.mode == new)
        name = f"balancer {self.vs.name}"
        if new == "none":
            return [PoolEvent("all-down", f"{name}: no real server is up; new connections are refused")]
        if new == "standby" and old == "active":
            return [PoolEvent("failover", f"{name}: failover: no active server is up, new connections go to standby {up}")]
        if new == "active" and old == "standby":
            return [PoolEvent("failback", f"{name}: failback: active {up} is up again and takes new connections")]
        return [PoolEvent("restored", f"{name}: service restored: new connections go to {new} {up}")]

    # -- choice --------------------------------------------------------------------

    def _eligible(self, mode: str) -> list[RealServerState]:
        return [
            s
            for s in self.servers
            if s.mode == mode
            and s.state == "up"
            and s.has_capacity()
            and (self.vs.method != "weighted" or s.config.weight > 0)
        ]

    def plan(self, client_ip: str) -> list[RealServerState]:
        """The servers a new connection from client_ip should try, in order.

        The first one is the method's choice in the serving tier (active while any
        active server is up, else standby). The rest are fallbacks if connecting fails:
        the other servers of that tier in the method's order, then, when the tier is
        active, the standby servers that are up (a connection refused by every active
        server should still reach a relay). Empty: no server can take it.
        Choosing the first advances round-robin/weighted state, so call once per connection.
        """
        if self.tier == "none":
            return []
        first = self._order(self._eligible(self.tier), client_ip)
        if self.tier == "active" and first:
            # Only behind active servers that will be tried: when every active server
            # is full the connection is refused, it does not overflow to a standby.
            first.extend(self._order_without_state(self._eligible("standby"), client_ip))
        return first

    def _order(self, servers: list[RealServerState], client_ip: str) -> list[RealServerState]:
        if not servers:
            return []
        method = self.vs.method
        if method == "round-robin":
            start = self._rotation % len(servers)
            self._rotation += 1
            return servers[start:] + servers[:start]
        if method == "weighted":
            # Smooth weighted round-robin (as nginx): each pick adds every weight to its
            # server's counter, takes the highest and subtracts the total from it. Over
            # sum(weights) picks each server is chosen exactly `weight` times, interleaved.
            total = sum(s.config.weight for s in servers)
            for s in servers:
                s.wrr_current += s.config.weight
            chosen = max(servers, key=lambda s: (s.wrr_current, -s.index))
            chosen.wrr_current -= total
            rest = sorted((s for s in servers if s is not chosen), key=lambda s: (-s.config.weight, s.index))
            return [chosen, *rest]
        if method == "least-session":
            # Fewest open connections; ties rotate so that equal servers share the load.
            n = len(self.servers)
            start = self._rotation
            self._rotation += 1
            return sorted(servers, key=lambda s: (s.connections + s.others, (s.index - start) % n))
        return self._order_without_state(servers, client_ip)

    def _order_without_state(self, servers: list[RealServerState], client_ip: str) -> list[RealServerState]:
        method = self.vs.method
        if method == "source-ip-hash":
            # Rendezvous (highest random weight) hashing: a client IP keeps its server as
            # long as that server is up; when one goes, only its clients move.
            return sorted(servers, key=lambda s: _rendezvous_score(client_ip, s.address), reverse=True)
        if method == "least-rtt":
            return sorted(servers, key=lambda s: (float("inf") if s.rtt is None else s.rtt, s.index))
        if method == "least-session":
            return sorted(servers, key=lambda s: (s.connections + s.others, s.index))
        # first-alive (and the fallback order of round-robin and weighted): config order.
        return list(servers)

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.vs.name,
            "listen": address_text(self.vs.listen),
            "method": self.vs.method,
            "health": self.vs.health.type,
            "proxy_protocol": self.vs.proxy_protocol,
            "serving": self.tier,
            "servers": [s.snapshot() for s in self.servers],
        }


def _rendezvous_score(client_ip: str, server: str) -> bytes:
    return hashlib.blake2b(f"{client_ip}|{server}".encode(), digest_size=8).digest()
