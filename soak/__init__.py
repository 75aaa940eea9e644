"""``make soak``: hours of production compressed into minutes (see docs/SOAK.md)."""
