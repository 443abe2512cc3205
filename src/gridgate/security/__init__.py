"""Identity, encryption and authorization (DESIGN section 10)."""
