"""The local SQLite spool (durable store, dead letters, pending records) and its CLI."""
