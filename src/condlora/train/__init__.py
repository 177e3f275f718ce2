"""condlora.train."""
