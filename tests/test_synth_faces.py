"""Faces before the face model: MTCNN's cascade (random weights of the real shapes), the
similarity of the landmarks to ArcFace's template and the warp, each against a plain
reference, and one-line errors for a missing or wrong detector folder."""

import argparse
import math

import numpy as np
import pytest
import torch

from condlora.core.errors import ConfigError, DataError
from condlora.synthesis.faces import (
    ARCFACE_TEMPLATE,
    MTCNN,
    ONet,
    PNet,
    RNet,
    align_face,
    nms,
    pyramid,
    similarity_transform,
    warp_affine,
)

from .synth_common import write_detector

pytestmark = pytest.mark.usefixtures("one_thread")

# the keys and shapes of facenet-pytorch 2.6.0's data/pnet.pt, rnet.pt, onet.pt (read from its
# wheel once; the prelu weights and biases follow their layers)
FACENET_LAYERS = {
    PNet: {"conv1": (10, 3, 3, 3), "conv2": (16, 10, 3, 3), "conv3": (32, 16, 3, 3)}
    | {"conv4_1": (2, 32, 1, 1), "conv4_2": (4, 32, 1, 1)},
    RNet: {"conv1": (28, 3, 3, 3), "conv2": (48, 28, 3, 3), "conv3": (64, 48, 2, 2)}
    | {"dense4": (128, 576), "dense5_1": (2, 128), "dense5_2": (4, 128)},
    ONet: {"conv1": (32, 3, 3, 3), "conv2": (64, 32, 3, 3), "conv3": (64, 64, 3, 3)}
    | {"conv4": (128, 64, 2, 2), "dense5": (256, 1152), "dense6_1": (2, 256)}
    | {"dense6_2": (4, 256), "dense6_3": (10, 256)},
}


def test_state_dict_keys_are_facenet_pytorchs():
    for cls, layers in FACENET_LAYERS.items():
        want = {}
        for layer, shape in layers.items():
            want[f"{layer}.weight"], want[f"{layer}.bias"] = shape, shape[:1]
            if "_" not in layer:  # a hidden layer: its PReLU, numbered like it
                want[f"prelu{layer[-1]}.weight"] = shape[:1]
        got = {k: tuple(v.shape) for k, v in cls().state_dict().items()}
        assert got == want, cls.__name__


def similarity(scale, angle, shift):
    """A 2 x 3 similarity matrix, float64."""
    c, s = math.cos(angle), math.sin(angle)
    rows = [[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]]
    return torch.tensor(rows, dtype=torch.float64)


def apply(matrix, points):
    return points.double() @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_a_known_one():
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64)
    for scale, angle, shift in ((0.4, 0.3, (-20.0, 15.0)), (2.5, -2.0, (3.0, -40.0))):
        known = similarity(scale, angle, shift)
        inverse = torch.linalg.inv(torch.cat([known, torch.tensor([[0.0, 0.0, 1.0]]).double()]))[:2]
        landmarks = apply(inverse, template)  # where the template's points lie in a photo
        torch.testing.assert_close(
            similarity_transform(landmarks, template), known, atol=1e-5, rtol=0
        )


def bilinear_reference(image, matrix, size):
    """cv2.warpAffine's rule, written out pixel by pixel."""
    inverse = np.linalg.inv(np.vstack([matrix.numpy(), [0, 0, 1]]))[:2]
    channels, height, width = image.shape
    out = np.zeros((channels, size, size))
    for v in range(size):
        for u in range(size):
            x, y = inverse @ [u, v, 1]
            x0, y0 = math.floor(x), math.floor(y)
            for dy in (0, 1):
                for dx in (0, 1):
                    xi, yi = x0 + dx, y0 + dy
                    weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
                    if 0 <= xi < width and 0 <= yi < height:
                        out[:, v, u] += weight * image[:, yi, xi].numpy()
    return torch.from_numpy(out).float()


def test_warp_matches_a_plain_bilinear_reference():
    image = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0)) * 255
    matrix = similarity(0.7, 0.4, (-5.0, 3.0))  # part of the crop falls outside the image
    torch.testing.assert_close(
        warp_affine(image, matrix, 24), bilinear_reference(image, matrix, 24), atol=1e-3, rtol=0
    )


def test_a_warped_image_lands_back():
    """A photo made from a crop (each colour linear in the crop's coordinates) by a known
    similarity: the landmarks where the template lands give the crop back."""
    to_crop = similarity(0.45, -0.25, (-30.0, -20.0))  # photo pixel -> crop pixel
    height, width = 300, 280
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    uv = apply(to_crop, torch.stack([x, y], -1).reshape(-1, 2)).reshape(height, width, 2)
    colour = lambda u, v: torch.stack([u + v, 2 * u + 10, 200 - v], -1)  # noqa: E731
    photo = colour(uv[..., 0], uv[..., 1]).clamp(0, 255).round().to(torch.uint8).numpy()
    inverse = torch.linalg.inv(torch.cat([to_crop, torch.tensor([[0.0, 0.0, 1.0]]).double()]))[:2]
    landmarks = apply(inverse, torch.tensor(ARCFACE_TEMPLATE))
    crop = torch.from_numpy(align_face(photo, landmarks)).float()
    v, u = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    want = colour(u, v).clamp(0, 255)
    inside = (want > 2).all(-1) & (want < 253).all(-1)  # no clipping nearby
    xy = apply(inverse, torch.stack([u, v], -1).reshape(-1, 2)).reshape(112, 112, 2)
    inside &= (xy >= 1).all(-1) & (xy[..., 0] < width - 2) & (xy[..., 1] < height - 2)
    assert inside.float().mean() > 0.5
    assert (crop - want)[inside].abs().max() <= 1.0  # rounding to uint8 twice


def plain_nms(boxes, scores, threshold, over_min):
    """Greedy suppression, written out."""
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        good = True
        for j in kept:
            a, b = boxes[i].tolist(), boxes[j].tolist()
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            area = [(r[2] - r[0] + 1) * (r[3] - r[1] + 1) for r in (a, b)]
            other = min(area) if over_min else sum(area) - w * h
            good = good and w * h / other <= threshold
        if good:
            kept.append(i)
    return kept


def test_nms_matches_a_plain_reference():
    g = torch.Generator().manual_seed(1)
    corner = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([corner, corner + 5 + torch.rand(60, 2, generator=g) * 30], 1)
    scores = torch.rand(60, generator=g)
    for threshold, over_min in ((0.5, False), (0.7, False), (0.7, True), (0.2, True)):
        got = nms(boxes, scores, threshold, over_min).tolist()
        assert got == plain_nms(boxes, scores, threshold, over_min)
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_pyramid_scales():
    assert pyramid(100, 160, 20) == pytest.approx([0.6 * 0.709**k for k in range(5)])
    assert pyramid(11, 200, 12) == []  # smaller than one window


def test_the_cascade_gives_well_formed_faces(tmp_path):
    detector = MTCNN.load(write_detector(tmp_path / "mtcnn"))
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    faces = detector.detect(image)
    n = len(faces.boxes)
    assert n >= 1
    assert faces.boxes.shape == (n, 4) and faces.landmarks.shape == (n, 5, 2)
    assert faces.scores.shape == (n,) and (faces.scores >= 0.7).all()
    assert torch.isfinite(faces.boxes).all() and torch.isfinite(faces.landmarks).all()
    assert (faces.scores[:-1] >= faces.scores[1:]).all()  # best first
    crop = detector.align(image, "photo")
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert not detector.detect(image[:10, :10]).boxes.numel()  # below the smallest window
    strict = MTCNN(detector.pnet, detector.rnet, detector.onet, thresholds=(1.1, 1.1, 1.1))
    assert strict.detect(image).landmarks.shape == (0, 5, 2)
    with pytest.raises(DataError, match="photo: no face found"):
        strict.align(image, "photo")


def test_detector_folder_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="face detector folder not found: .*nope"):
        MTCNN.load(tmp_path / "nope")
    folder = write_detector(tmp_path / "d")
    (folder / "onet.pt").unlink()
    with pytest.raises(ConfigError, match=r"has no onet.pt; give the folder of facenet-pytorch"):
        MTCNN.load(folder)
    torch.save(PNet().state_dict(), folder / "onet.pt")  # another net's weights
    with pytest.raises(DataError, match="onet.pt does not hold MTCNN's ONet weights"):
        MTCNN.load(folder)
    torch.save(argparse.Namespace(w=1), folder / "onet.pt")  # a pickled object
    with pytest.raises(DataError, match="onet.pt: refused"):
        MTCNN.load(folder)
