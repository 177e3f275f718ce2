"""The Synthesis tab: a subject (held-out, or the visitor's own digits) -> its embedding ->
a LoRA written by a method -> grids without, with, and with the fine-tuned LoRA -> a file."""

from __future__ import annotations

import os
import re
import uuid
import zipfile
from pathlib import Path

import gradio as gr
import torch
from torch import Tensor

from condlora.apps.serve import uploads
from condlora.apps.serve.synthesis import GRID_ROWS, SynthDemo, Written
from condlora.apps.serve.widgets import guarded, image_box, one_line, picture
from condlora.core.errors import DataError
from condlora.lora.formats import LAYOUTS, LoRAWeights, write_lora

HELD_OUT, MINE = "a held-out subject of the demo", "my own digits (uploaded or drawn)"
INTRO = (
    "A *subject* is a handwriting style. The subject encoder turns a few of its digits into an "
    "embedding; a method writes a LoRA for the digits base model from that embedding alone, "
    "without fine-tuning. The grids show digits 0 to 9 (columns) drawn from the same noise "
    "without a LoRA, with the written one and, for a held-out subject, with its fine-tuned one."
)


def empty_set() -> dict:
    """The visitor's own digits: the last upload's and the drawn ones."""
    return {"uploads": None, "drawings": []}


def my_digits(mine: dict) -> Tensor:
    """Every digit of the visitor's set (N, 1, R, R); DataError when there is none."""
    parts = [] if mine["uploads"] is None else [mine["uploads"]]
    parts += [torch.stack(mine["drawings"])] if mine["drawings"] else []
    if not parts:
        raise DataError("no digits of your own yet: upload images or draw a digit and add it")
    return torch.cat(parts)


class SynthesisPage:
    """The tab's components, and its handlers (each returns {component: new value})."""

    def __init__(self, demo: SynthDemo, downloads: Path) -> None:
        self.demo = demo
        self.downloads = downloads

    def build(self) -> None:
        """Lay out the tab and wire its events."""
        gr.Markdown(INTRO)
        self.mine = gr.State(empty_set())
        self.written = gr.State(None)  # (LoRAWeights, file stem) of the last LoRA
        with gr.Row():
            with gr.Column():
                self._subject_inputs()
                self._method_inputs()
            with gr.Column():
                first = self.show_subject(HELD_OUT, self.subject.value, empty_set())
                self.plot = gr.Plot(
                    first["plot"], label="subject embedding", elem_id="embedding-plot"
                )
                self.digits = image_box("the subject's digits", "subject-digits", first["digits"])
                self.status = gr.Markdown(elem_id="synth-status")
        with gr.Row():
            self.grid_base = image_box("base model (no LoRA)", "grid-base")
            self.grid_lora = image_box("with the written LoRA", "grid-lora")
            self.grid_tuned = image_box("with the fine-tuned LoRA", "grid-finetuned")
        with gr.Row():
            self.layout = gr.Radio(list(LAYOUTS), value="peft", label="layout", elem_id="layout")
            self.download = gr.DownloadButton(
                "Download the LoRA", interactive=False, elem_id="download"
            )
        self._wire()

    def _subject_inputs(self) -> None:
        choices = self.demo.heldout_subjects()
        self.source = gr.Radio([HELD_OUT, MINE], value=HELD_OUT, label="subject", elem_id="source")
        self.subject = gr.Dropdown(
            choices, value=choices[0][1], label="held-out subject", elem_id="subject"
        )
        with gr.Accordion("my own digits", open=False, elem_id="mine"):
            self.files = gr.File(
                file_count="multiple",
                label=f"images of one style (PNG, JPEG ...; up to {uploads.MAX_FILES}, "
                f"{uploads.MAX_BYTES // 2**20} MB each)",
                elem_id="uploads",
            )
            self.canvas = gr.Sketchpad(
                label="or draw a digit (pick the brush first)",
                canvas_size=(280, 280),
                brush=gr.Brush(default_size=16, colors=["#000000"], color_mode="fixed"),
                elem_id="canvas",
            )
            with gr.Row():
                self.add = gr.Button("add the drawing", elem_id="add-drawing")
                self.clear = gr.Button("clear the drawings", elem_id="clear-drawings")

    def _method_inputs(self) -> None:
        methods = [(self.demo.label(m), m) for m in self.demo.methods()]
        self.method = gr.Dropdown(methods, value=methods[0][1], label="method", elem_id="method")
        self.seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
        self.generate = gr.Button("Write the LoRA", variant="primary", elem_id="generate")

    def _wire(self) -> None:
        shown = [self.plot, self.digits, self.status]
        chosen = [self.source, self.subject, self.mine]
        for control in (self.source, self.subject):
            control.change(guarded(self.status, self.on_subject), chosen, shown)
        changed = [self.mine, self.source, *shown]
        self.files.upload(guarded(self.status, self.on_upload), [self.files, self.mine], changed)
        self.add.click(guarded(self.status, self.on_draw), [self.canvas, self.mine], changed)
        self.clear.click(guarded(self.status, self.on_clear), [self.mine], changed)
        inputs = [*chosen, self.method, self.seed, self.layout]
        grids = [self.grid_base, self.grid_lora, self.grid_tuned]
        outputs = [*shown, *grids, self.download, self.written]
        self.generate.click(guarded(self.status, self.on_generate), inputs, outputs)
        self.layout.change(
            guarded(self.status, self.on_layout), [self.written, self.layout], [self.download]
        )

    def _subject(self, source: str, name: str | None, mine: dict) -> tuple[Tensor, str, Tensor]:
        """(embedding, label, digits to show) of the chosen subject."""
        if source == MINE:
            digits = my_digits(mine)
            return self.demo.embed(digits), "your digits", digits
        if not name:
            raise DataError("pick a held-out subject")
        return self.demo.subject_embedding(name), name, self.demo.styled_digits(name)

    def show_subject(self, source: str, name: str | None, mine: dict) -> dict:
        """{"plot", "digits", "note"}: where the subject's embedding lies, and its digits."""
        try:
            embedding, label, digits = self._subject(source, name, mine)
        except DataError as err:  # no digits of one's own yet: a hint, the plot without a star
            return {
                "plot": self.demo.embedding_plot(None, ""),
                "digits": None,
                "note": one_line(err),
            }
        plot = self.demo.embedding_plot(embedding, label)
        return {"plot": plot, "digits": picture(digits), "note": ""}

    def on_subject(self, source: str, name: str | None, mine: dict) -> dict:
        """Show where the chosen subject's embedding lies, and its digits."""
        shown = self.show_subject(source, name, mine)
        return {self.plot: shown["plot"], self.digits: shown["digits"], self.status: shown["note"]}

    def _set_changed(self, mine: dict, note: str) -> dict:
        shown = self.on_subject(MINE, None, mine)
        return {self.mine: mine, self.source: MINE, **shown, self.status: note}

    def on_upload(self, files: list[str] | None, mine: dict) -> dict:
        """Check and read the uploaded images (one bad file: its message, nothing kept)."""
        digits = uploads.load_uploads(list(files or []), self.demo.resolution)
        return self._set_changed({**mine, "uploads": digits}, f"read {len(digits)} image(s)")

    def on_draw(self, canvas: object, mine: dict) -> dict:
        """Add the canvas's digit to the visitor's set."""
        grey = uploads.drawing_grey(canvas)
        if grey is None:
            raise DataError("the canvas is empty: pick the brush and draw a digit first")
        digit = uploads.to_digit(grey, self.demo.resolution, "the drawing")
        mine = {**mine, "drawings": [*mine["drawings"], digit]}
        return self._set_changed(mine, f"{len(mine['drawings'])} drawn digit(s) in the set")

    def on_clear(self, mine: dict) -> dict:
        """Forget the drawn digits."""
        return self._set_changed({**mine, "drawings": []}, "drawings cleared")

    def on_generate(
        self,
        source: str,
        name: str | None,
        mine: dict,
        method: str,
        seed: float | None,
        layout: str,
        progress: gr.Progress = gr.Progress(),
    ) -> dict:
        """Embedding -> LoRA -> the grids, what it took, and the file to download."""
        progress(0.0, desc="embedding the subject")
        embedding, label, digits = self._subject(source, name, mine)
        seed = int(seed or 0)
        progress(0.1, desc=f"writing the LoRA ({method})")
        written = self.demo.write_lora(method, embedding, seed)
        tuned_lora = self.demo.finetuned(name) if source == HELD_OUT and name else None
        grids = {}
        for key, weights, what in [
            ("base", None, "the base model"),
            ("written", written.weights, "the written LoRA"),
            ("fine-tuned", tuned_lora, "the fine-tuned LoRA"),
        ]:
            if key == "base" or weights is not None:
                progress(0.2 + 0.25 * len(grids), desc=f"sampling with {what}")
                grids[key] = self.demo.samples(weights, seed)
        stem = f"{label if source == HELD_OUT else 'my-digits'}-{method}"
        path = lora_download(written.weights, layout, self.downloads, stem)
        tuned = grids.get("fine-tuned")
        return {
            self.plot: self.demo.embedding_plot(embedding, label),
            self.digits: picture(digits),
            self.status: self._summary(written, embedding, grids),
            self.grid_base: picture(grids["base"]),
            self.grid_lora: picture(grids["written"]),
            self.grid_tuned: None if tuned is None else picture(tuned),
            self.download: gr.DownloadButton(value=str(path), interactive=True),
            self.written: (written.weights, stem),
        }

    def _summary(self, written: Written, embedding: Tensor, grids: dict[str, Tensor]) -> str:
        """What the LoRA took to write, against fine-tuning, and the grids' subject scores."""
        lines = [timing_line(self.demo.label(written.method), written)]
        tune = self.demo.finetune_seconds()
        if tune is not None:
            lines.append(
                f"Fine-tuning a LoRA in the demo's zoo took {tune:.2f} s per subject "
                '(the report\'s "s per LoRA" of fine-tuned).'
            )
        scores = ", ".join(f"{k} {self.demo.score(x, embedding):.3f}" for k, x in grids.items())
        lines.append(
            f"Subject score (cosine of the samples' and the subject's embedding): {scores}."
        )
        lines.append(
            f"Grids: digits 0 to 9, {GRID_ROWS} samples each, the same noise in each grid."
        )
        return "  \n".join(lines)

    def on_layout(self, written: tuple | None, layout: str) -> dict:
        """The last LoRA written again in the chosen layout."""
        if written is None:
            return {}
        weights, stem = written
        path = lora_download(weights, layout, self.downloads, stem)
        return {self.download: gr.DownloadButton(value=str(path), interactive=True)}


READY = {
    "fitted": "fitted on the training collection first, in {:.2f} s (once: later LoRAs reuse it)",
    "loaded": "loaded from its trained model first, in {:.2f} s (once: later LoRAs reuse it)",
}


def timing_line(label: str, written: Written) -> str:
    """What writing the LoRA took: from the embedding to the LoRA's numbers (the report's "s
    per LoRA"), and apart from it the one-off fit or load of the method when this call did it."""
    line = f"**{label}** wrote the LoRA in {1000 * written.seconds:.1f} ms"
    line += " (from the embedding to the LoRA's numbers: the report's \"s per LoRA\")"
    if written.ready in READY:
        line += "; the method was " + READY[written.ready].format(written.ready_seconds)
    return line + "."


def safe_stem(text: str) -> str:
    """A file-name stem made of letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "lora"


def zip_folder(folder: Path, path: Path) -> Path:
    """Zip a folder's files under its own name (written to a temporary name, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{folder.name}/{file.name}")
    os.replace(tmp, path)
    return path


def lora_download(weights: LoRAWeights, layout: str, root: Path, stem: str) -> Path:
    """The LoRA as one file in `layout` inside a new folder under `root`."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown LoRA layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    folder = root / uuid.uuid4().hex
    folder.mkdir(parents=True)
    stem = f"{safe_stem(stem)}-{layout}"
    if layout == "peft":
        write_lora(weights, folder / stem, "peft")
        return zip_folder(folder / stem, folder / f"{stem}.zip")
    return write_lora(weights, folder / f"{stem}.safetensors", layout)[0]
