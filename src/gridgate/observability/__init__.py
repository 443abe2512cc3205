"""Metrics (Prometheus)."""
