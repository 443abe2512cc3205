"""Live connections: the registry by connection and device id, the reaper, per-connection side tasks."""
