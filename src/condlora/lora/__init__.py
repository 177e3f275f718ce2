"""condlora.lora."""
