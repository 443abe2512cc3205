"""Payload validator, pure-Python reference implementation."""
