"""condlora.data."""
