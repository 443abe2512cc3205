"""WebSocket: /v1/ws readings and MQTT over WebSocket (through the MQTT session's entry point)."""
