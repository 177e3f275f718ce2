"""condlora.train: the generic training loop (loop), its config (config), EMA and checkpoints
(checkpoint)."""
