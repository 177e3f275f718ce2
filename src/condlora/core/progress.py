"""Progress bars: one helper, so every long stage shows a tqdm bar with its ETA the same way."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(progress: bool | dict, **defaults: object) -> tqdm:
    """A tqdm bar: off for False, `defaults` for True, `defaults` updated by a dict of options
    (desc, position, leave ...). Shown only on a terminal (tqdm's disable=None), so logs and
    captured output get no bar lines. Use it as a context manager so that it is closed."""
    options = dict(defaults)
    if isinstance(progress, dict):
        options.update(progress)
    return tqdm(disable=None if progress else True, **options)
