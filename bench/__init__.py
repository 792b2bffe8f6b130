"""Benchmarks: ``python -m bench.event_path`` and ``python -m bench.gateway_overhead``.

Each starts what it needs on loopback (an embedded nats-server, the services), prints its
figures as ratios against a peer measured in the same run, and cleans up. They never assert;
the targets they print are the ones quoted in the README.
"""
