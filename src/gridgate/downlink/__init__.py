"""Downlink commands: the wire format, per-connection outboxes, and device configs pushed on connect."""
