"""condlora.core: the ground floor that every other package stands on.

Errors, class labels as weights, config loading for any config dataclass, safetensors
files and image grids. Nothing here imports from another condlora package.
"""
