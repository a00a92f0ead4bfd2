"""What we evaluate on."""
