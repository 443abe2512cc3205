"""MQTT 3.1.1 server codec, pure-Python reference implementation."""
