"""condlora.metrics."""
