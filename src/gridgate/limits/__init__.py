"""Flow control and abuse resistance (DESIGN section 11): token buckets per
device and per rule, flapping detection and bans, shedding by commit latency.

Everything here is plain data and arithmetic on a time the caller passes in
(``trio.current_time()`` in the gateway, so tests run under MockClock); the
sessions decide what "over the limit" does for their protocol.
"""
