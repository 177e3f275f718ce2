"""The Synthesis tab's work, without gradio: a finished digits demo folder, loaded once.

    demo = SynthDemo.open("runs/synth-demo")
    e = demo.subject_embedding("s0200")               # or demo.embed(digits) for new images
    made = demo.write_lora("pca-ridge", e)            # LoRAWeights and the seconds it took
    grid = demo.samples(made.weights, seed=0)         # digits 0..9, GRID_ROWS of each

Methods: the two simple predictors of the demo (fitted here on the training collection, once)
and every synthesis model folder the demo trained (`methods/<name>/model.safetensors`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file
from torch import Tensor

from condlora.apps.serve.plots import embedding_figure
from condlora.apps.synthesis_demo.config import DemoConfig
from condlora.apps.synthesis_demo.encoder import SubjectEncoder, load_encoder
from condlora.apps.synthesis_demo.generative import generative_methods, method_slug
from condlora.apps.synthesis_demo.methods import DemoData, simple_methods
from condlora.apps.synthesis_demo.run import QUICKSTART_BASE, held_out_digits
from condlora.apps.synthesis_demo.scoring import sample_subjects
from condlora.apps.synthesis_demo.styles import apply_style, describe
from condlora.apps.synthesis_demo.zoo import TIMING_FILE, Subjects, make_subjects
from condlora.core.config import from_dict
from condlora.core.errors import CondloraError, DataError
from condlora.diffusion import Denoiser
from condlora.image.build import build_data
from condlora.image.config import Config
from condlora.image.task import load_run, saved_step
from condlora.lora.formats import LoRAWeights
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.generate import SynthModel
from condlora.synthesis.model import (
    BASELINE_FILE,
    COLLECTION_FILE,
    MODEL_FILE,
    PRIOR_DIR,
    layout_signature,
)
from condlora.train.checkpoint import CHECKPOINT_NAME, EMA_NAME

GRID_ROWS = 3  # samples of each digit in a grid
NEEDED = (
    "encoder.safetensors",
    "embeddings.safetensors",
    "dataset/train.safetensors",
    "dataset/heldout.safetensors",
)
Writer = Callable[[Tensor, int], Tensor]  # (embeddings [M, E], seed) -> vectors [M, D]


@dataclass(frozen=True)
class Written:
    """A LoRA written from an embedding, and what it cost."""

    method: str
    weights: LoRAWeights
    seconds: float  # writing it from the embedding (sampling included), the method ready
    ready_seconds: float  # making the method ready first: 0 when an earlier call did
    ready: str  # how: "fitted" (on the collection, here), "loaded" (trained before), "cached"


def _read_demo_json(folder: Path) -> tuple[DemoConfig, Config]:
    """The demo's own config and its base model's config, as `condlora synth demo` stored them."""
    if not folder.is_dir():
        raise DataError(f"demo folder not found: {folder} (make one with `condlora synth demo`)")
    path = folder / "demo.json"
    if not path.is_file():
        raise DataError(f"{folder} is not a demo folder (no demo.json): see `condlora synth demo`")
    try:
        saved = json.loads(path.read_text())
        return from_dict(DemoConfig, saved["demo"]), from_dict(Config, saved["base"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a readable demo record ({err})") from None


def base_candidates(folder: Path) -> list[Path]:
    """Where the demo's base model may be: its own base/, then the run the demo reused."""
    found = [folder / "base"]
    stages = folder / "stages.json"
    reused = json.loads(stages.read_text()).get("base model", "") if stages.is_file() else ""
    if reused.startswith("reused "):
        path = Path(reused.removeprefix("reused "))
        found += [path] if path.is_absolute() else [path, folder.parent.parent / path]
    return [*found, QUICKSTART_BASE]


def find_base(folder: Path, base_cfg: Config, explicit: Path | None = None) -> Denoiser:
    """The demo's base denoiser: a finished run of the demo's base config (`explicit`, else
    the first of `base_candidates` that holds one)."""
    if explicit is not None:
        if saved_step(explicit, base_cfg) < base_cfg.train.max_steps:  # another config: raises
            raise DataError(f"--base {explicit} holds no finished run of the demo's base model")
        return load_run(explicit)[1]
    candidates = base_candidates(folder)
    for run_dir in candidates:
        try:
            if saved_step(run_dir, base_cfg) >= base_cfg.train.max_steps:
                return load_run(run_dir)[1]
        except CondloraError:  # a run of another config: not the demo's base
            continue
    where = ", ".join(str(c) for c in candidates)
    raise DataError(f"the base model of the demo in {folder} is in none of {where}: pass --base")


def is_model(folder: Path) -> bool:
    """Whether a folder holds a finished synthesis model (not, e.g., a VAE alone)."""
    parts = (f"{PRIOR_DIR}/{EMA_NAME}", f"{PRIOR_DIR}/{CHECKPOINT_NAME}")
    parts += (BASELINE_FILE, COLLECTION_FILE)
    return (folder / MODEL_FILE).is_file() and any((folder / p).is_file() for p in parts)


class SynthDemo:
    """A finished demo folder: base model, encoder, collection, held-out subjects, methods."""

    def __init__(self, folder: str | Path, base: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.cfg, base_cfg = _read_demo_json(self.folder)
        missing = [n for n in NEEDED if not (self.folder / n).is_file()]
        if missing:
            raise DataError(
                f"the demo in {self.folder} is not finished (no {missing[0]}): run "
                f"`condlora synth demo --out {self.folder}` again"
            )
        self.base = find_base(self.folder, base_cfg, Path(base) if base else None)
        self.encoder: SubjectEncoder = load_encoder(self.folder / "encoder.safetensors")
        dataset = self.folder / "dataset"
        self.data = DemoData.load(dataset / "train.safetensors", torch.zeros(0), "unused")
        self.heldout = LoRADataset(dataset / "heldout.safetensors")
        self.embeddings = load_file(self.folder / "embeddings.safetensors")
        # the first seed's split: its encoder, collection and scored subjects are the top level
        self.first_seed = self.cfg.score_seeds[0]
        self.subjects: Subjects = make_subjects(self.cfg, self.first_seed)
        _, (hold_x, hold_y) = build_data(base_cfg)
        self.digits = held_out_digits(hold_x, hold_y)  # one plain digit of each class
        self._writers: dict[str, Writer] = {}
        self._lock = threading.Lock()

    @property
    def resolution(self) -> int:
        """Side of the digits the encoder reads."""
        return self.encoder.resolution

    def heldout_subjects(self) -> list[tuple[str, str]]:
        """(label, name) of every held-out subject, the label describing its style."""
        subs = self.subjects
        return [
            (f"{subs.names[i]}: {describe(subs.styles[i])}", subs.names[i])
            for i in subs.scored(self.cfg.split)
        ]

    def _style(self, name: str) -> Tensor:
        if name not in self.subjects.names:
            raise DataError(f"unknown subject {name!r}")
        return self.subjects.styles[self.subjects.names.index(name)]

    def subject_embedding(self, name: str) -> Tensor:
        """The reference embedding of a demo subject (E,)."""
        self._style(name)
        return self.embeddings[name]

    def styled_digits(self, name: str) -> Tensor:
        """Real digits 0..9 in a subject's style (10, 1, R, R)."""
        return apply_style(self.digits, self._style(name))

    def embed(self, digits: Tensor) -> Tensor:
        """The embedding (E,) of a set of digits (N, 1, R, R) of one new subject."""
        return self.encoder.embed(digits)

    def finetuned(self, name: str) -> LoRAWeights | None:
        """The held-out subject's own fine-tuned LoRA (None for any other name)."""
        if name not in self.heldout.names:
            return None
        return self.data.spec.unflatten(self.heldout.row(self.heldout.index(name)))

    def finetune_seconds(self) -> float | None:
        """Seconds the zoo spent fine-tuning one subject (None if the zoo kept no timing)."""
        path = self.folder / "zoo" / TIMING_FILE
        if not path.is_file():
            return None
        timing = json.loads(path.read_text()).values()
        count = sum(v[1] for v in timing)
        return sum(v[0] for v in timing) / count if count else None

    def methods(self) -> list[str]:
        """The names of the methods that can write a LoRA here."""
        folder = self.folder / "methods"
        # the demo's models of other seeds read their own seeds' encoders: left out
        found = folder.iterdir() if folder.is_dir() else []
        models = sorted(d.name for d in found if self._this_seed(d.name) and is_model(d))
        return [m.name for m in simple_methods()] + models

    def _this_seed(self, name: str) -> bool:
        """False for a model folder of another seed than the first ("...-seed1")."""
        seed = re.search(r"-seed(\d+)$", name)
        return seed is None or int(seed.group(1)) == self.first_seed

    def label(self, method: str) -> str:
        """A method's name as the demo's report writes it: "vae-prior-adalora-seed0" ->
        "VAE + prior (ADALoRA), seed 0"; names of other folders as they are."""
        stem, _, seed = method.rpartition("-seed")
        names = {method_slug(m.name): m.name for m in generative_methods(self.cfg.generative)}
        return f"{names[stem]}, seed {seed}" if stem in names and seed.isdigit() else method

    def _writer(self, method: str) -> Writer:
        """The method fitted (or loaded) once; later calls reuse it."""
        simple = {m.name: m for m in simple_methods()}
        if method in simple:
            generate = simple[method].fit(self.data, 0)
            return lambda queries, seed: generate(queries)
        if method not in self.methods():
            raise DataError(f"unknown method {method!r}; choose from {', '.join(self.methods())}")
        model = SynthModel.load(self.folder / "methods" / method)
        if model.info.signature != layout_signature(self.data.spec):
            raise DataError(f"the model of method {method} was trained on another collection")
        return lambda queries, seed: model.vectors(queries, 1, seed=seed)[:, 0]

    def write_lora(self, method: str, embedding: Tensor, seed: int = 0) -> Written:
        """A LoRA for one embedding (E,) by a method; fits the method on first use."""
        with self._lock:
            start = time.perf_counter()
            ready = "cached" if method in self._writers else self._ready_by(method)
            if ready != "cached":
                self._writers[method] = self._writer(method)
            fitted = time.perf_counter()
            vector = self._writers[method](embedding.float()[None], seed)[0]
            done = time.perf_counter()
        weights = self.data.spec.unflatten(vector.float())
        weights.check_finite(f"the LoRA of {method}")
        ready_seconds = 0.0 if ready == "cached" else fitted - start
        return Written(method, weights, done - fitted, ready_seconds, ready)

    @staticmethod
    def _ready_by(method: str) -> str:
        """ "fitted" for the simple predictors (fitted here), "loaded" for trained models."""
        return "fitted" if method in {m.name for m in simple_methods()} else "loaded"

    def samples(self, weights: LoRAWeights | None, seed: int) -> Tensor:
        """(10 * GRID_ROWS, 1, R, R) digits 0..9 in rows, from the base model with the LoRA.

        Every call with the same seed starts from the same noise: grids differ by the LoRA."""
        x = sample_subjects(
            self.base,
            None if weights is None else [weights],
            1,
            GRID_ROWS,
            seed,
            self.cfg.sample_steps,
            self.cfg.rank,
            resolution=self.resolution,
        )
        return x[0]

    def embedding_plot(self, query: Tensor | None, label: str) -> Figure:
        """The query among the training subjects (coloured by stroke thickness) and the
        held-out ones, in the plane of the training embeddings' top principal components."""
        thickness = torch.stack([self._style(n)[0] for n in self.data.names])
        names = [self.subjects.names[i] for i in self.subjects.scored(self.cfg.split)]
        heldout = torch.stack([self.embeddings[n] for n in names]) if names else torch.zeros(0)
        return embedding_figure(self.data.embeddings, thickness, heldout, query, label)

    def score(self, samples: Tensor, embedding: Tensor) -> float:
        """Subject score: cosine of the samples' embedding with the subject's embedding."""
        return float(self.encoder.embed(samples) @ embedding.float())
