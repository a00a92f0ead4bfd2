"""PACE's method."""
