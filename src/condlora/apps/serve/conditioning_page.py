"""The Conditioning tab: a trained run, a class grid; class-weight sliders for ClassLoRA runs
(interpolation and extrapolation) and the learned composition tables of TimeLoRA runs."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from condlora.apps.serve.conditioning import (
    EXTRAPOLATE,
    LoadedRun,
    RunCache,
    class_grid,
    find_runs,
    sweep,
    weighted_grid,
)
from condlora.apps.serve.plots import table_figure
from condlora.apps.serve.widgets import guarded, image_box, picture
from condlora.core.errors import DataError

ALL = "all (a row per class)"
SCALE = 4  # screen pixels per image pixel: a row per class makes tall grids
NO_RUNS = (
    " None yet: train one, e.g. `condlora train --config configs/digits-classlora.yaml "
    "--out runs/classlora`, then refresh the list."
)
WEIGHTS_NOTE = (
    "**Class weights** y = w_a onehot(a) + w_b onehot(b) replace the class label: "
    "w_a = 1 - t, w_b = t goes from a to b; a weight above 1 extrapolates past the class."
)


def layer_label(name: str) -> str:
    """A composer's module name without the wrapper's prefix and suffix, for the menu."""
    return name.removeprefix("net.net.").split(".composer")[0]


class ConditioningPage:
    """The tab's components, and its handlers (each returns {component: new value})."""

    def __init__(self, root: Path) -> None:
        self.runs = RunCache(root)

    def build(self) -> None:
        """Lay out the tab and wire its events."""
        names = find_runs(self.runs.root)
        gr.Markdown(
            f"Runs of `condlora train` under `{self.runs.root}`." + ("" if names else NO_RUNS)
        )
        with gr.Row():
            self.run = gr.Dropdown(names, value=None, label="run", elem_id="run", scale=4)
            self.refresh = gr.Button("refresh the list", elem_id="refresh-runs", scale=1)
        self.info = gr.Markdown(elem_id="run-info")
        with gr.Row():
            self.label = gr.Dropdown([ALL], value=ALL, label="class", elem_id="class")
            self.guidance = gr.Slider(0.0, 5.0, 1.0, step=0.1, label="guidance", elem_id="guidance")
            self.steps = gr.Slider(2, 100, 18, step=1, label="sampling steps", elem_id="steps")
            self.seed = gr.Number(0, precision=0, label="seed", elem_id="cond-seed")
            self.count = gr.Slider(1, 16, 6, step=1, label="samples per row", elem_id="count")
        self.sample = gr.Button("Sample", variant="primary", elem_id="sample")
        self.status = gr.Markdown(elem_id="cond-status")
        self.grid = image_box("samples", "cond-grid")
        self._class_weights()
        with gr.Group(visible=False) as self.tables_box:
            self.layer = gr.Dropdown([], label="TimeLoRA layer", elem_id="layer")
            self.table = gr.Plot(label="learned composition table", elem_id="time-table")
        self._wire()

    def _class_weights(self) -> None:
        with gr.Group(visible=False) as self.weights_box:
            gr.Markdown(WEIGHTS_NOTE)
            with gr.Row():
                self.class_a = gr.Dropdown(["0"], value="0", label="class a", elem_id="class-a")
                self.weight_a = gr.Slider(0, 2, 0.5, step=0.05, label="w_a", elem_id="weight-a")
                self.class_b = gr.Dropdown(["0"], value="0", label="class b", elem_id="class-b")
                self.weight_b = gr.Slider(0, 2, 0.5, step=0.05, label="w_b", elem_id="weight-b")
            with gr.Row():
                self.mix = gr.Button("Sample with these weights", elem_id="sample-weights")
                self.sweep = gr.Button("Sweep from a to b, then past b", elem_id="sweep")
            self.mix_grid = image_box("class weights", "weights-grid")

    def _wire(self) -> None:
        def wire(event: object, work: object, inputs: list, outputs: list) -> None:
            event(guarded(self.status, work), inputs, [*outputs, self.status])

        wire(self.refresh.click, self.on_refresh, [], [self.run])
        shown = [self.info, self.label, self.steps, self.weights_box, self.class_a, self.class_b]
        wire(
            self.run.change,
            self.on_run,
            [self.run],
            [*shown, self.tables_box, self.layer, self.table],
        )
        wire(self.layer.change, self.on_layer, [self.run, self.layer], [self.table])
        common = [self.run, self.guidance, self.steps, self.seed, self.count]
        wire(self.sample.click, self.on_sample, [*common, self.label], [self.grid])
        weights = [self.class_a, self.weight_a, self.class_b, self.weight_b]
        wire(self.mix.click, self.on_mix, [*common, *weights], [self.mix_grid])
        wire(
            self.sweep.click, self.on_sweep, [*common, self.class_a, self.class_b], [self.mix_grid]
        )

    def _get(self, name: str | None) -> LoadedRun:
        if not name:
            raise DataError("pick a run first")
        return self.runs.get(name)

    def on_refresh(self) -> dict:
        """Look for runs again."""
        names = find_runs(self.runs.root)
        return {self.run: gr.Dropdown(choices=names), self.status: f"{len(names)} run(s) found"}

    def on_run(self, name: str | None, progress: gr.Progress = gr.Progress()) -> dict:
        """Load a run; show its summary and the controls it supports."""
        progress(0.0, desc="loading the run")
        run = self._get(name)
        classes = [str(k) for k in range(run.classes)]
        layers = sorted(run.tables())
        out = {
            self.info: run.describe(),
            self.label: gr.Dropdown(choices=[ALL, *classes], value=ALL),
            self.steps: gr.Slider(value=run.cfg.diffusion.sample_steps),
            self.weights_box: gr.Group(visible=run.class_lora and bool(classes)),
            self.tables_box: gr.Group(visible=bool(layers)),
            self.status: "",
        }
        if classes:
            out[self.class_a] = gr.Dropdown(choices=classes, value=classes[0])
            out[self.class_b] = gr.Dropdown(
                choices=classes, value=classes[min(1, len(classes) - 1)]
            )
        if layers:
            out[self.layer] = gr.Dropdown(
                choices=[(layer_label(n), n) for n in layers], value=layers[0]
            )
            out[self.table] = table_figure(run.tables()[layers[0]], layer_label(layers[0]))
        return out

    def on_layer(self, name: str | None, layer: str | None) -> dict:
        """Another layer's composition table."""
        tables = self._get(name).tables()
        if layer not in tables:
            return {}
        return {self.table: table_figure(tables[layer], layer_label(layer))}

    def on_sample(
        self,
        name: str | None,
        guidance: float,
        steps: float,
        seed: float | None,
        count: float,
        label: str,
        progress: gr.Progress = gr.Progress(),
    ) -> dict:
        """A grid of one class, or a row per class."""
        run = self._get(name)
        progress(0.1, desc="sampling")
        label_index = None if label == ALL else int(label)
        args = (float(guidance), int(steps), int(seed or 0), int(count))
        images, columns = class_grid(run, label_index, *args)
        note = f"{len(images)} samples, {int(steps)} steps, guidance {float(guidance):g}"
        return {self.grid: picture(images, columns, SCALE), self.status: note}

    def on_mix(
        self,
        name: str | None,
        guidance: float,
        steps: float,
        seed: float | None,
        count: float,
        a: str,
        weight_a: float,
        b: str,
        weight_b: float,
        progress: gr.Progress = gr.Progress(),
    ) -> dict:
        """Samples with the sliders' class weights."""
        run = self._get(name)
        progress(0.1, desc="sampling")
        weights = {int(a): float(weight_a)}
        weights[int(b)] = weights.get(int(b), 0.0) + float(weight_b)
        args = (float(guidance), int(steps), int(seed or 0), int(count))
        images = weighted_grid(run, weights, *args)
        note = f"class weights {weight_a:g} x {a} + {weight_b:g} x {b}"
        return {self.mix_grid: gr.Image(picture(images, int(count), SCALE), label=note)}

    def on_sweep(
        self,
        name: str | None,
        guidance: float,
        steps: float,
        seed: float | None,
        rows: float,
        a: str,
        b: str,
        progress: gr.Progress = gr.Progress(),
    ) -> dict:
        """A row per sample: from class a to class b, then b weighted past 1."""
        run = self._get(name)
        progress(0.1, desc="sampling the sweep")
        args = (float(guidance), int(steps), int(seed or 0), int(rows))
        images, columns = sweep(run, int(a), int(b), *args)
        past = ", ".join(f"{s:g}" for s in EXTRAPOLATE)
        note = f"columns: from {a} to {b} in {columns - len(EXTRAPOLATE)} steps, then {b} x {past}"
        return {self.mix_grid: gr.Image(picture(images, columns, SCALE), label=note)}
