"""kanmon: an on-premises mail gateway (relay, mail store, balancer, admin tools)."""

__version__ = "0.1.0"
