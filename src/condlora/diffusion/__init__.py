"""condlora.diffusion."""
