"""The balancer role: virtual addresses in front of real servers.

Role: package of the TCP balancer that `kanmon serve` runs for a [balancer] section.
service.BalancerService is the entry point; pool.py decides (no I/O), health.py checks,
splice.py copies bytes, status.py keeps the status and modes files, haproxy.py exports
the same setup for HAProxy; with [balancer] processes > 1, workers.py starts the
forwarding processes (forwarder.py) and shared.py is the health state they share;
`kanmon balance` is kanmon/commands/balance.py.

Trusts: the validated Config; nothing from the network.
Never: parse the proxied bytes (it is a TCP proxy; the real servers speak SMTP).
"""
