"""Shared state of the receivers: rate counters, connection gauges, TTL caches (recipient
verification, ...) and the greylist. The interfaces are in kanmon.state.api (plain Python,
importable by the checks); kanmon.state.sqlite implements them for one node (a database
in data_dir shared by every receiver process), kanmon.state.postgresql for several nodes
(`[records] url`); kanmon.state.backends picks one. The composition roots (kanmon.node,
kanmon.receiver) open a store and hand it to the checks; no check opens one itself.
"""
