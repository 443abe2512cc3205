"""gridgate-loadgen: a fleet simulator that measures honestly (DESIGN section 8)."""
