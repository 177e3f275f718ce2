"""condlora.nets."""
