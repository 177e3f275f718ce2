"""condlora.synthesis: zero-shot LoRA synthesis (a VAE and a diffusion prior over LoRA vectors)."""
