"""Monitoring in `kanmon serve`: alert mail, the metrics endpoint, records retention.

Role: the composition of the monitoring parts in the main process, so the node adds one
service and one task: Alerts (kanmon.alerts) with its sources wired — SMTP failover
(SmtpDelivery.on_server_used), error and critical events from every process (read back
from the records), thresholds, the balancer's incidents (the node hands Alerts.incident
to its BalancerService); the alert state saved in data_dir across restarts;
DeliveryMetrics fed by QueueManager.on_attempt; the metrics the node's MetricsServer
serves (the node builds that listener, so a reload can hand its socket on); Retention of
the records.

Trusts: the node's validated config and built stages. Never: start anything before the
node's recovery (the node calls start() after it), or outlive the node's TaskGroup.
"""

from __future__ import annotations

import asyncio

from kanmon.alerts import Alerts
from kanmon.metrics import DeliveryMetrics, Metrics
from kanmon.records.retention import Retention
from kanmon.tlscert import server_cert_paths


class Monitoring:
    def __init__(self, node):
        config = node.config
        self.node = node
        cert, _key = server_cert_paths(config)
        self.alerts = Alerts(config, node.records, node.spool, node.queue, node.clock, cert_path=cert,
                             shared=node.state if config.records.url else None)
        node.remote.on_server_used = self.alerts.on_server_used
        self.delivery = DeliveryMetrics()
        node.queue.on_attempt = self.delivery.observe
        self.metrics = Metrics(node.data_dir, node.spool, self.delivery, now=node.clock.now)
        self.retention = Retention(config, node.records.emit, node.clock)

    def reconfigure(self, config) -> None:
        """After a reload: alerts and retention with the new config (the node restarts
        run()); the metrics keep counting."""
        node = self.node
        cert, _key = server_cert_paths(config)
        self.alerts = Alerts(config, node.records, node.spool, node.queue, node.clock, cert_path=cert,
                             shared=node.state if config.records.url else None)
        node.remote.on_server_used = self.alerts.on_server_used
        self.retention = Retention(config, node.records.emit, node.clock)

    def dns_alert(self):
        """The `alert(category, text)` callable for kanmon.dnscheck.monitor.DnsMonitor."""
        return self.alerts.alert_callable("dns")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.alerts.run())
            tg.create_task(self.retention.run())
