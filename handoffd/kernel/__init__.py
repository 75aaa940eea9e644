"""Thin adapters over Linux facilities, tested against the real kernel."""
