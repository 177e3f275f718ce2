"""The page (gradio): the Synthesis and Conditioning tabs. The tabs lay out components and
route events; `serve.synthesis` and `serve.conditioning` do the work."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from condlora.apps.serve.conditioning_page import ConditioningPage
from condlora.apps.serve.synthesis import SynthDemo
from condlora.apps.serve.synthesis_page import SynthesisPage


def build_page(
    demo: SynthDemo | None, demo_problem: str, runs_root: Path, workdir: Path
) -> gr.Blocks:
    """The whole page. `demo` None: the Synthesis tab shows `demo_problem` instead."""
    with gr.Blocks(title="condlora", analytics_enabled=False) as page:
        gr.Markdown("## condlora: conditional LoRA for diffusion models")
        with gr.Tab("Synthesis", id="synthesis"):
            if demo is None:
                gr.Markdown(f"⚠ {demo_problem}", elem_id="synth-status")
            else:
                SynthesisPage(demo, workdir / "downloads").build()
        with gr.Tab("Conditioning", id="conditioning"):
            ConditioningPage(runs_root).build()
    return page
