"""Monitoring in `kanmon serve`: alert mail, the metrics endpoint, records retention.

Role: the composition of the monitoring parts in the main process, so the node adds one
service and one task: Alerts (kanmon.alerts) with its sources wired — SMTP failover
(SmtpDelivery.on_server_used), error and critical events from every process (read back
from the records), thresholds, the balancer's incidents (the node hands Alerts.incident
to its BalancerService); the alert state saved in data_dir across restarts;
DeliveryMetrics fed by QueueManager.on_attempt; the metrics the node's MetricsServer
serves (the node builds that listener, so a reload can hand its socket on); Retention of
the records; with shared records (`[records] url`), the node's heartbeat there every
HEARTBEAT seconds (its queue and active alerts, for `kanmon cluster status`), and a last
one at a graceful stop.

Trusts: the node's validated config and built stages. Never: start anything before the
node's recovery (the node calls start() after it), or outlive the node's TaskGroup.
"""

from __future__ import annotations

import asyncio
import sys
import time

from kanmon import __version__
from kanmon.alerts import Alerts
from kanmon.metrics import DeliveryMetrics, Metrics
from kanmon.records.retention import Retention
from kanmon.tlscert import server_cert_paths


HEARTBEAT = 30.0  # seconds between a node's heartbeats in the shared records
FINAL_HEARTBEAT_TIMEOUT = 10.0  # seconds a stopping node gives its last heartbeat


class Monitoring:
    def __init__(self, node):
        config = node.config
        self.node = node
        self.started = time.time()
        self.heartbeats = 0  # written (tests wait for one)
        cert, _key = server_cert_paths(config)
        self.alerts = Alerts(config, node.records, node.spool, node.queue, node.clock, cert_path=cert,
                             shared=node.state if config.records.url else None)
        node.remote.on_server_used = self.alerts.on_server_used
        self.delivery = DeliveryMetrics()
        node.queue.on_attempt = self.delivery.observe
        self.metrics = Metrics(node.data_dir, node.spool, self.delivery, now=node.clock.now)
        self.retention = Retention(config, node.records.emit, node.clock)

    def reconfigure(self, config) -> None:
        """After a reload (of any section: the alerts read many): alerts and retention
        with the new config (the node restarts run()); the alert state in memory goes on;
        a retention whose settings did not change is kept, so a reload does not prune
        again; the metrics keep counting."""
        node = self.node
        cert, _key = server_cert_paths(config)
        self.alerts = Alerts(config, node.records, node.spool, node.queue, node.clock, cert_path=cert,
                             shared=node.state if config.records.url else None, previous=self.alerts)
        node.remote.on_server_used = self.alerts.on_server_used
        retention = Retention(config, node.records.emit, node.clock)
        if retention.settings() != self.retention.settings():  # else it waits out its day
            self.retention = retention

    def dns_alert(self):
        """The `alert(category, text)` callable for kanmon.dnscheck.monitor.DnsMonitor."""
        return self.alerts.alert_callable("dns")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        """At a graceful stop (the node's deliveries and receivers are done): a last
        heartbeat, marked stopped, so `kanmon cluster status` shows what the node holds
        as it stops, not what it held at its last periodic beat."""
        if not self.node.config.records.url:
            return
        try:
            async with asyncio.timeout(FINAL_HEARTBEAT_TIMEOUT):
                await self.beat(stopped=True)
        except Exception as e:  # noqa: BLE001 - the database is down: the last periodic beat stays
            print(f"kanmon: cluster heartbeat at stop: {e or type(e).__name__}", file=sys.stderr)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.alerts.run())
            tg.create_task(self.retention.run())
            if self.node.config.records.url:
                tg.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Now and every HEARTBEAT: this node's queue and active alerts in the shared
        records. A failure is a line on stderr (the records alert covers the outage)."""
        while True:
            try:
                await self.beat()
            except Exception as e:  # noqa: BLE001 - the database is down: try again next time
                print(f"kanmon: cluster heartbeat: {e}", file=sys.stderr)
            await self.node.clock.sleep(HEARTBEAT)

    async def beat(self, stopped: bool = False) -> None:
        """One heartbeat; stopped: the last one of a node stopping gracefully."""
        from kanmon.metrics import queue_snapshot
        from kanmon.records.pg import connect, heartbeat, migrate

        node, config = self.node, self.node.config
        snap = await asyncio.to_thread(queue_snapshot, node.spool)
        queue = {**snap.counts, "size": snap.size, "oldest_waiting": snap.oldest_waiting, "stopped": stopped}
        alerts = [{"category": st.category, "key": st.key, "text": st.text, "since": st.since}
                  for st in self.alerts.current()]  # as `kanmon status` counts them
        name = config.records.node or config.server.hostname
        now = time.time()  # the snapshot's time: a slower, older beat never replaces a newer one

        def write() -> None:
            with connect(config.records.url, config.records.password_file, autocommit=True) as conn:
                migrate(conn)  # the first writer of a fresh database may be this one
                heartbeat(conn, name, config.server.hostname, __version__, self.started, now, queue, alerts)

        await asyncio.to_thread(write)
        self.heartbeats += 1
