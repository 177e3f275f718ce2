"""Scoring image runs: `condlora eval` (`evaluate`, `cli`) and the diagnostics of a
conditional-LoRA run (`diagnostics`: TimeLoRA / ClassLoRA weights). Import from the
modules; nothing is imported here, so the command line starts fast."""
