"""Condition encoders: what turns a subject into the embedding a synthesis model reads.

- precomputed: a safetensors file of name -> vector (`read_embeddings`), the form that
  `synth collect --embeddings` takes too;
- "onnx-face": a face-recognition ONNX model at a local path, insightface-style (ArcFace):
  aligned 112 x 112 RGB crops, (x - 127.5) / 127.5, NCHW float32 in, 512-d out, L2-normalised.
  Runs with onnxruntime, an optional extra: `pip install condlora[faces]`. With a detector
  folder (MTCNN's weights, `faces.py`) it takes photos: the largest face of each is found
  and aligned to the model's crop first; without one, the images must be such crops;
- any other kind registered with `register_encoder` (the digits demo adds its own).

An image encoder maps image files to (n, E) embeddings; `subject_embedding` averages the
unit embeddings of a subject's images and normalises the mean (a subject's identity vector),
unless the encoder embeds a set of images itself (an `embed_subject(paths)` method: the
digits demo's encoder centres the set's mean feature before normalising it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from condlora.core.errors import ConfigError, DataError
from condlora.synthesis.config import EncoderConfig
from condlora.synthesis.faces import CROP as FACE_SIZE
from condlora.synthesis.faces import MTCNN

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageEncoder(Protocol):
    """Image files -> embeddings (n, dim)."""

    dim: int

    def __call__(self, paths: Sequence[Path]) -> Tensor: ...


EncoderFactory = Callable[[EncoderConfig], ImageEncoder]
ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(kind: str, factory: EncoderFactory) -> None:
    """Make `encoder.kind: <kind>` build an image encoder with factory(EncoderConfig)."""
    ENCODERS[kind] = factory


def build_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """The image encoder that a config names; ConfigError for precomputed or unknown kinds."""
    if cfg.kind == "embeddings":
        raise ConfigError(
            "this model's encoder is 'embeddings' (precomputed): give --embedding FILE, or "
            "--encoder onnx-face --encoder-path MODEL.onnx to embed images (encoder kinds: "
            f"{', '.join(ENCODERS)})"
        )
    if cfg.detector and cfg.kind != "onnx-face":
        raise ConfigError(f"a face detector (--detector) is for onnx-face, not {cfg.kind!r}")
    if cfg.kind not in ENCODERS:
        valid = ", ".join(["embeddings", *ENCODERS])
        raise ConfigError(f"unknown encoder kind {cfg.kind!r}; valid: {valid}")
    return ENCODERS[cfg.kind](cfg)


def read_embeddings(path: str | Path, key: str | None = None) -> Tensor:
    """The vector(s) of a safetensors file of name -> vector: entry `key`, or its only entry.

    Returns (n, E): a (E,) entry becomes one row; an (n, E) entry stays as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embedding file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if key is None and len(keys) != 1:
                shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
                raise DataError(
                    f"{path} holds {len(keys)} embeddings ({shown}): pick one with --key"
                )
            if key is not None and key not in keys:
                raise DataError(f"{path} holds no embedding named {key!r}")
            value = f.get_tensor(key if key is not None else keys[0])
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path} is not a readable safetensors file ({err})") from None
    if value.dim() not in (1, 2):
        raise DataError(f"{path}: an embedding must be (E,) or (n, E), got {tuple(value.shape)}")
    return (value[None] if value.dim() == 1 else value).float()


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder (or one image file), sorted; DataError if there are none."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; DataError if it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable image ({err})") from None


def set_embedding(encoder: ImageEncoder, files: Sequence[Path]) -> Tensor:
    """One unit embedding (E,) for a set of image files (a subject's): the encoder's own
    `embed_subject`, else the normalised mean of the images' unit embeddings."""
    if hasattr(encoder, "embed_subject"):
        return F.normalize(encoder.embed_subject(list(files)).float(), dim=0)
    rows = F.normalize(encoder(list(files)).float(), dim=1)
    return F.normalize(rows.mean(0), dim=0)


def subject_embedding(encoder: ImageEncoder, folder: str | Path) -> Tensor:
    """The set embedding (E,) of the images in a folder (or of one image file)."""
    return set_embedding(encoder, image_files(folder))


def _onnxruntime():  # noqa: ANN202  the optional module itself
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "the onnx-face encoder needs onnxruntime: pip install condlora[faces]"
        ) from None
    return onnxruntime


class OnnxFaceEncoder:
    """An insightface-style face-recognition ONNX model: aligned 112x112 RGB crops -> unit rows."""

    def __init__(self, path: str | Path, detector: str | Path = "") -> None:
        need = "an insightface-style recognition model (.onnx, 112x112 RGB crops in)"
        if not str(path):
            raise ConfigError(f"the onnx-face encoder has no model: give --encoder-path, {need}")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"face model not found: {path}; give a local file, {need}")
        ort = _onnxruntime()
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"{path} is not a readable ONNX model ({reason})") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        static = [s for s in shape[1:] if isinstance(s, int)]
        if len(shape) != 4 or static and shape[1:] != [3, FACE_SIZE, FACE_SIZE]:
            raise DataError(
                f"{path}: input {inp.name} has shape {shape}, expected [n, 3, 112, 112] "
                "(an insightface-style recognition model)"
            )
        self.path, self.input = path, inp.name
        self.detector = MTCNN.load(detector) if str(detector) else None
        out = self.session.get_outputs()[0].shape[-1]
        self.dim = out if isinstance(out, int) else self._run(np.zeros((1, 3, 112, 112))).shape[1]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch.astype(np.float32)})[0]

    def preprocess(self, paths: Sequence[Path]) -> np.ndarray:
        """(n, 3, 112, 112) float32 in [-1, 1]: the detector's aligned crops of the images,
        else the images themselves (DataError for one of another size)."""
        crops = []
        for path in paths:
            rgb = read_rgb(path)
            if self.detector is not None:
                rgb = self.detector.align(rgb, str(path))
            elif rgb.shape[:2] != (FACE_SIZE, FACE_SIZE):
                raise DataError(
                    f"{path} is {rgb.shape[1]}x{rgb.shape[0]}: the face model needs aligned "
                    f"{FACE_SIZE}x{FACE_SIZE} face crops (give --detector DIR with MTCNN's "
                    "weights to find and align the faces)"
                )
            crops.append(rgb.transpose(2, 0, 1))
        return (np.stack(crops).astype(np.float32) - 127.5) / 127.5

    def __call__(self, paths: Sequence[Path]) -> Tensor:
        """Unit embeddings (n, dim) of face crops."""
        out = torch.from_numpy(self._run(self.preprocess(paths)).reshape(len(paths), -1))
        return F.normalize(out.float(), dim=1)


register_encoder("onnx-face", lambda cfg: OnnxFaceEncoder(cfg.path, cfg.detector))
