"""condlora.core: the ground floor that every other package stands on.

Errors, class labels as weights, config loading for any config dataclass, safetensors
files, image grids, and what reports share (progress bars, tables, provenance). Nothing
here imports from another condlora package.
"""
