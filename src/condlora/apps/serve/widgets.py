"""What both tabs of the page share: pictures of digits, and handlers that never raise.

Handlers return {component: value}, so a failure updates the status line alone: a user
mistake shows its one-line message, anything else a one-line internal error (its traceback
goes to the server's log, never to the page).
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable

import gradio as gr
import numpy as np
from torch import Tensor

from condlora.core.errors import CondloraError
from condlora.core.images import tile_grid

log = logging.getLogger("condlora.apps.serve")
GRID_SCALE = 6  # screen pixels per image pixel (the synthesis grids: 3 rows of 10 digits)


def picture(images: Tensor, nrow: int = 10, scale: int = GRID_SCALE) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] tiled as one picture for gr.Image (grey ones 2-D)."""
    grid = tile_grid(images, nrow, scale)
    return grid[..., 0] if grid.shape[2] == 1 else grid


def one_line(err: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def guarded(status: gr.Markdown, work: Callable[..., dict]) -> Callable[..., dict]:
    """`work` with any error shown in `status` instead of raised. The wrapper keeps work's
    signature (functools.wraps), so gradio still finds a `progress=gr.Progress()` in it."""

    @functools.wraps(work)
    def run(*args: object) -> dict:
        try:
            return work(*args)
        except CondloraError as err:
            return {status: f"⚠ {one_line(err)}"}
        except Exception as err:  # a defect of condlora: one line here, the traceback in the log
            log.error("internal error\n%s", traceback.format_exc())
            return {
                status: f"⚠ internal error: {type(err).__name__}: {one_line(err)[:300]} "
                "(a bug: the server's log holds the traceback)"
            }

    return run


def image_box(label: str, elem_id: str, value: np.ndarray | None = None) -> gr.Image:
    """An output image (PNG, so the digits stay sharp)."""
    return gr.Image(value, label=label, elem_id=elem_id, format="png", interactive=False)
