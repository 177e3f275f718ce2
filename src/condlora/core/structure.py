"""A process-wide count of module structure changes, for caches of module walks.

torch's global registration hooks see every parameter, buffer and submodule assigned to any
module; while the count is unchanged, no module's set of parameters, buffers or children has
changed, so what a walk of a model found earlier is still complete. Walking a net of a few
hundred modules at every step or denoiser call costs about 1% of a digits step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_count = [0]


def _changed(*args: Any) -> None:
    """A registration hook: something was (re)assigned somewhere."""
    _count[0] += 1


for _register in (
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
    nn.modules.module.register_module_module_registration_hook,
):
    _register(_changed)


def structure_version() -> int:
    """The number of parameter, buffer and submodule assignments so far in this process."""
    return _count[0]
