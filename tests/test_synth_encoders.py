"""Condition encoders: a tiny ONNX face model of ArcFace's signature that the test exports
itself, precomputed embedding files, the registry, and one-line errors for bad input."""

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from condlora.cli import main
from condlora.core.errors import ConfigError, DataError
from condlora.lora.formats import read_lora
from condlora.synthesis import encoders
from condlora.synthesis.collection import LoRADataset
from condlora.synthesis.config import EncoderConfig
from condlora.synthesis.encoders import (
    OnnxFaceEncoder,
    build_encoder,
    read_embeddings,
    register_encoder,
    subject_embedding,
)
from condlora.synthesis.faces import MTCNN
from condlora.synthesis.training import train_synthesis

from .synth_common import SPEC, linear_collection, tiny_config, write_detector

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFace(nn.Module):
    """ArcFace's signature: (n, 3, 112, 112) in [-1, 1] -> (n, 512)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)  # 112 / 8 = 14
        self.fc = nn.Linear(4 * 14 * 14, 512)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def export(model, path, size=112):
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, size, size),),
            str(path),
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}},
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def face_model(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyFace().eval()
    return model, export(model, tmp_path_factory.mktemp("onnx") / "face.onnx")


def write_faces(folder, n, size=(112, 112), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8) for _ in range(n)]
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"face{i}.png")
    return pixels


def test_onnx_face_encoder_matches_the_model_on_normalised_crops(face_model, tmp_path):
    model, path = face_model
    pixels = write_faces(tmp_path / "faces", 3)
    encoder = build_encoder(EncoderConfig(kind="onnx-face", path=str(path)))
    assert isinstance(encoder, OnnxFaceEncoder) and encoder.dim == 512
    got = encoder(sorted((tmp_path / "faces").iterdir()))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = F.normalize(model((x - 127.5) / 127.5), dim=1)
    assert got.shape == (3, 512)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))
    subject = subject_embedding(encoder, tmp_path / "faces")
    torch.testing.assert_close(subject, F.normalize(want.mean(0), dim=0), atol=1e-5, rtol=0)


def test_encoder_errors_are_one_line(face_model, tmp_path, monkeypatch):
    _, path = face_model
    encoder = OnnxFaceEncoder(path)
    write_faces(tmp_path / "small", 1, size=(100, 112))
    with pytest.raises(DataError, match=r"is 100x112: the face model needs aligned 112x112"):
        subject_embedding(encoder, tmp_path / "small")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        subject_embedding(encoder, tmp_path / "bad")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        subject_embedding(encoder, tmp_path / "notes")
    with pytest.raises(ConfigError, match="face model not found: .*nope.onnx"):
        OnnxFaceEncoder(tmp_path / "nope.onnx")
    (tmp_path / "fake.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="fake.onnx is not a readable ONNX model"):
        OnnxFaceEncoder(tmp_path / "fake.onnx")
    small = export(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 8)), tmp_path / "s.onnx", 64)
    with pytest.raises(DataError, match=r"expected \[n, 3, 112, 112\]"):
        OnnxFaceEncoder(small)
    with pytest.raises(ConfigError, match="unknown encoder kind 'arcface2'"):
        build_encoder(EncoderConfig(kind="arcface2"))
    with pytest.raises(ConfigError, match="--embedding FILE"):
        build_encoder(EncoderConfig())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were missing
    with pytest.raises(ConfigError, match=r"pip install condlora\[faces\]"):
        OnnxFaceEncoder(path)


def test_read_embeddings(tmp_path):
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 4)}, str(tmp_path / "e.safetensors"))
    assert torch.equal(read_embeddings(tmp_path / "e.safetensors", "a"), torch.ones(1, 4))
    assert read_embeddings(tmp_path / "e.safetensors", "b").shape == (2, 4)
    with pytest.raises(DataError, match="holds 2 embeddings"):
        read_embeddings(tmp_path / "e.safetensors")
    with pytest.raises(DataError, match="no embedding named 'c'"):
        read_embeddings(tmp_path / "e.safetensors", "c")
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable safetensors"):
        read_embeddings(tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def face_collection(tmp_path_factory):
    """A 'nearest' model over 16 LoRAs with 512-d unit embeddings (no training needed)."""
    root = tmp_path_factory.mktemp("faces")
    path = linear_collection(root / "ds.safetensors", n=16, e_dim=512)[0]
    return train_synthesis(tiny_config(path, "method=nearest"), root / "m"), LoRADataset(path)


def test_generate_from_images_through_the_face_model(face_model, face_collection, tmp_path):
    model, path = face_model
    model_dir, dataset = face_collection
    write_faces(tmp_path / "subject", 2, seed=4)
    args = ["synth", "generate", "--model", str(model_dir), "--images", str(tmp_path / "subject")]
    args += ["--encoder", "onnx-face", "--encoder-path", str(path)]
    assert main([*args, "--out", str(tmp_path / "lora")]) == 0
    # the nearest LoRA to the subject's embedding, computed by hand
    subject = subject_embedding(OnnxFaceEncoder(path), tmp_path / "subject")
    emb = torch.from_numpy(np.array(dataset.embeddings))
    best = int((F.normalize(emb, dim=1) @ subject).argmax())
    assert torch.equal(SPEC.flatten(read_lora(tmp_path / "lora")), dataset.row(best))


def test_generate_from_photos_through_the_detector(face_model, face_collection, tmp_path, capsys):
    """--detector: each photo's largest face, aligned by MTCNN, is what the face model reads
    (random detector weights that find faces everywhere; photos of any size)."""
    _, path = face_model
    model_dir, dataset = face_collection
    detector = write_detector(tmp_path / "mtcnn")
    for i, size in enumerate(((60, 45), (50, 70))):
        write_faces(tmp_path / "photos", 1, size=size, seed=i)
        (tmp_path / "photos" / "face0.png").rename(tmp_path / "photos" / f"p{i}.png")
    args = ["synth", "generate", "--model", str(model_dir), "--images", str(tmp_path / "photos")]
    args += ["--encoder", "onnx-face", "--encoder-path", str(path), "--detector", str(detector)]
    assert main([*args, "--out", str(tmp_path / "lora")]) == 0
    # by hand: the detector's crops saved as images, through the encoder without a detector
    mtcnn = MTCNN.load(detector)
    (tmp_path / "crops").mkdir()
    for photo in sorted((tmp_path / "photos").iterdir()):
        crop = mtcnn.align(np.asarray(Image.open(photo).convert("RGB")), str(photo))
        Image.fromarray(crop).save(tmp_path / "crops" / photo.name)
    subject = subject_embedding(OnnxFaceEncoder(path), tmp_path / "crops")
    emb = torch.from_numpy(np.array(dataset.embeddings))
    best = int((F.normalize(emb, dim=1) @ subject).argmax())
    assert torch.equal(SPEC.flatten(read_lora(tmp_path / "lora")), dataset.row(best))
    missing = [*args[:-1], str(tmp_path / "nope"), "--out", str(tmp_path / "other")]
    capsys.readouterr()
    assert main(missing) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condlora: error: face detector folder not found") and "\n" not in err
    assert not (tmp_path / "other").exists()
    with pytest.raises(ConfigError, match="is for onnx-face, not 'other'"):
        build_encoder(EncoderConfig(kind="other", detector=str(detector)))


def test_unreadable_image_exits_2_and_keeps_the_old_file(face_model, face_collection, tmp_path):
    _, path = face_model
    model_dir, _ = face_collection
    (tmp_path / "subject").mkdir()
    (tmp_path / "subject" / "face.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "old.safetensors"
    out.write_bytes(b"an earlier LoRA")
    args = ["synth", "generate", "--model", str(model_dir), "--images", str(tmp_path / "subject")]
    args += ["--encoder-path", str(path), "--encoder", "onnx-face", "--out", str(out)]
    args += ["--format", "kohya"]
    assert main(args) == 2
    assert out.read_bytes() == b"an earlier LoRA"


def test_registered_encoder_kind(face_collection, tmp_path, monkeypatch):
    model_dir, dataset = face_collection
    calls = []

    class Fixed:
        dim = 512

        def __init__(self, cfg):
            calls.append(cfg)

        def __call__(self, paths):
            return torch.from_numpy(np.array(dataset.embeddings[[3] * len(paths)]))

    monkeypatch.setattr(encoders, "ENCODERS", dict(encoders.ENCODERS))
    register_encoder("fixed", Fixed)
    write_faces(tmp_path / "s", 2, size=(8, 8))
    args = ["synth", "generate", "--model", str(model_dir), "--images", str(tmp_path / "s")]
    assert main([*args, "--encoder", "fixed", "--out", str(tmp_path / "l")]) == 0
    assert calls[0].kind == "fixed"
    assert torch.equal(SPEC.flatten(read_lora(tmp_path / "l")), dataset.row(3))
