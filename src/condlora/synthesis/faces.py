"""Faces in photos -> the aligned 112 x 112 crops a face-recognition model reads.

Detection: MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task
Cascaded Convolutional Networks"), a cascade of three small CNNs:
  P-Net, fully convolutional, over an image pyramid (scales m 0.709^k, m = 12 / smallest
      face, while the shorter side stays >= 12): a face score and box offsets for every
      12 x 12 window at stride 2; non-maximum suppression per scale (IoU 0.5), then over
      all scales (0.7); boxes moved by their offsets and made square;
  R-Net on 24 x 24 crops of those boxes: rescored, refined, NMS 0.7;
  O-Net on 48 x 48 crops: rescored, refined, five landmarks (left eye, right eye, nose,
      left and right mouth corner), NMS 0.7 of the overlap over the smaller box.
Inside the cascade boxes count pixels from 1 and inclusively (a box x1..x2 is x2 - x1 + 1
wide, its first pixel has index x1 - 1), and P-Net's offsets are fractions of x2 - x1, as
in the original MTCNN (written in Matlab), whose conventions the weights were trained with;
`detect` returns 0-based pixel coordinates. The weights are the ones facenet-pytorch's wheel ships
(`facenet_pytorch/data/pnet.pt`, `rnet.pt`, `onet.pt`: plain state dicts converted from the
original MTCNN), read weights-only from a local folder, never downloaded; the layers carry
those files' key names, and the dense layers read their input in (W, H, C) order, as the
converted weights expect. Inputs are (x - 127.5) / 128.

Alignment: the similarity (rotation, uniform scale, translation) that maps the five
landmarks onto insightface's ArcFace template for 112 x 112 crops closest in least squares
(Umeyama 1991, "Least-squares estimation of transformation parameters between two point
patterns"), applied as cv2.warpAffine applies it (each crop pixel centre takes the
bilinear value at the inverse-mapped point, zeros outside the image), with grid_sample.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condlora.core.errors import ConfigError, DataError
from condlora.core.safetensors_io import load_torch_weights_only

DETECTOR_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
CROP = 112
# insightface's ArcFace template: the five landmarks' places in a 112 x 112 crop (x, y)
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
THRESHOLDS = (0.6, 0.7, 0.7)  # face score each stage keeps (P-, R-, O-Net)
PYRAMID_FACTOR = 0.709  # scale step between pyramid levels
MIN_FACE = 20  # smallest face searched for, in pixels


def _conv(cin: int, cout: int, k: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(cin, cout, k), nn.PReLU(cout)


class PNet(nn.Module):
    """Proposal net: (n, 3, H, W) -> face probability (n, h, w), box offsets (n, 4, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv(10, 16, 3)
        self.conv3, self.prelu3 = _conv(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


def _whc(x: Tensor) -> Tensor:
    """(n, C, H, W) flattened in (W, H, C) order, as the converted dense weights read it."""
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refine net: (n, 3, 24, 24) -> face probability (n,), box offsets (n, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_whc(self.prelu3(self.conv3(x)))))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net: (n, 3, 48, 48) -> probability (n,), offsets (n, 4), landmarks (n, 10):
    five x then five y, as fractions of the box."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _conv(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_whc(self.prelu4(self.conv4(x)))))
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def nms(boxes: Tensor, scores: Tensor, threshold: float, over_min: bool = False) -> Tensor:
    """Indices of the boxes (n, 4: x1, y1, x2, y2, inclusive) kept by greedy non-maximum
    suppression, best first: a box goes when its overlap with a kept better one is above the
    threshold (intersection over union, or over the smaller box with over_min)."""
    if not over_min:
        try:
            from torchvision.ops import nms as torchvision_nms
        except ImportError:
            pass
        else:  # inclusive boxes as continuous ones: x2 + 1
            return torchvision_nms(boxes + boxes.new_tensor([0, 0, 1, 1]), scores, threshold)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort(descending=True), []
    while order.numel():
        i, rest = order[0], order[1:]
        keep.append(i)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        other = torch.minimum(area[i], area[rest]) if over_min else area[i] + area[rest] - inter
        order = rest[inter / other <= threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def _regress(boxes: Tensor, offsets: Tensor, inclusive: bool = True) -> Tensor:
    """Boxes moved by offsets given as fractions of their width and height (x2 - x1 + 1;
    P-Net's: x2 - x1, as the original MTCNN's first stage has it)."""
    size = (boxes[:, 2:] - boxes[:, :2] + (1 if inclusive else 0)).repeat(1, 2)
    return boxes + offsets * size


def _square(boxes: Tensor) -> Tensor:
    """Each box made square about its centre (side: its longer side), to whole pixels."""
    wh = boxes[:, 2:] - boxes[:, :2] + 1
    side = wh.max(1, keepdim=True).values.clamp(min=1)  # a box turned inside out: one pixel
    x1y1 = boxes[:, :2] + (wh - side) / 2
    return torch.cat([x1y1, x1y1 + side - 1], 1).floor()


def _crops(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """(n, 3, size, size): each box (1-based) cut from the image (zeros outside it),
    area-resized."""
    _, height, width = image.shape
    out = []
    for x1, y1, x2, y2 in (boxes.long() - 1).tolist():
        patch = image.new_zeros(3, y2 - y1 + 1, x2 - x1 + 1)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
        if sx1 <= sx2 and sy1 <= sy2:
            patch[:, sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = image[
                :, sy1 : sy2 + 1, sx1 : sx2 + 1
            ]
        out.append(F.interpolate(patch[None], size=(size, size), mode="area"))
    return torch.cat(out) if out else image.new_zeros(0, 3, size, size)


def _normalised(x: Tensor) -> Tensor:
    return (x - 127.5) / 128.0


def pyramid(height: int, width: int, min_face: float = MIN_FACE) -> list[float]:
    """P-Net's scales: m f^k for m = 12 / min_face, while the scaled shorter side is >= 12."""
    m = 12.0 / min_face
    scales, side = [], min(height, width) * m
    while side >= 12:
        scales.append(m * PYRAMID_FACTOR ** len(scales))
        side *= PYRAMID_FACTOR
    return scales


@dataclass
class Faces:
    """What a detection found, best first."""

    boxes: Tensor  # (n, 4) x1, y1, x2, y2: pixel coordinates from 0, inclusive
    scores: Tensor  # (n,) O-Net's face probability
    landmarks: Tensor  # (n, 5, 2) (x, y): left eye, right eye, nose, mouth corners

    @classmethod
    def none(cls) -> Faces:
        """No face."""
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))


class MTCNN:
    """The three nets and their thresholds; `detect` finds faces, `align` crops the largest."""

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        thresholds: tuple[float, float, float] = THRESHOLDS,
        min_face: float = MIN_FACE,
    ) -> None:
        self.pnet, self.rnet, self.onet = pnet.eval(), rnet.eval(), onet.eval()
        self.thresholds, self.min_face = thresholds, min_face

    @classmethod
    def load(cls, folder: str | os.PathLike) -> MTCNN:
        """The nets from facenet-pytorch's pnet.pt, rnet.pt, onet.pt in a local folder."""
        folder = Path(folder)
        what = "give the folder of facenet-pytorch's " + ", ".join(DETECTOR_FILES)
        if not folder.is_dir():
            raise ConfigError(f"face detector folder not found: {folder}; {what}")
        missing = [f for f in DETECTOR_FILES if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"face detector folder {folder} has no {missing[0]}; {what}")
        nets = (PNet(), RNet(), ONet())
        for net, name in zip(nets, DETECTOR_FILES, strict=True):
            _load_state(net, folder / name)
        return cls(*nets)

    @torch.no_grad()
    def detect(self, image: Tensor | np.ndarray) -> Faces:
        """The faces in an (H, W, 3) RGB image (uint8 or float in 0..255)."""
        img = torch.tensor(np.asarray(image)).permute(2, 0, 1).float()  # a copy
        boxes = self._propose(img)
        if len(boxes):
            boxes = self._refine(img, boxes)
        if not len(boxes):
            return Faces.none()
        return self._output(img, boxes)

    def _propose(self, img: Tensor) -> Tensor:
        """Stage 1: square candidate boxes (n, 4) over the pyramid."""
        _, height, width = img.shape
        found = []
        for scale in pyramid(height, width, self.min_face):
            size = (math.ceil(height * scale), math.ceil(width * scale))
            resized = F.interpolate(img[None], size=size, mode="area")
            prob, offsets = self.pnet(_normalised(resized))
            yx = (prob[0] >= self.thresholds[0]).nonzero()
            if not len(yx):
                continue
            score = prob[0, yx[:, 0], yx[:, 1]]
            xy = yx.flip(1).float()  # window (i, j): scaled pixels 2j + 1 .. 2j + 12, 1-based
            boxes = torch.cat([((2 * xy + 1) / scale).floor(), ((2 * xy + 12) / scale).floor()], 1)
            keep = nms(boxes, score, 0.5)
            found.append(
                torch.cat([boxes, score[:, None], offsets[0, :, yx[:, 0], yx[:, 1]].T], 1)[keep]
            )
        if not found:
            return torch.zeros(0, 4)
        every = torch.cat(found)
        every = every[nms(every[:, :4], every[:, 4], 0.7)]
        return _square(_regress(every[:, :4], every[:, 5:], inclusive=False))

    def _refine(self, img: Tensor, boxes: Tensor) -> Tensor:
        """Stage 2: the boxes R-Net keeps, refined and square (n, 4)."""
        prob, offsets = self.rnet(_normalised(_crops(img, boxes, 24)))
        passed = prob >= self.thresholds[1]
        boxes, prob, offsets = boxes[passed], prob[passed], offsets[passed]
        keep = nms(boxes, prob, 0.7)
        return _square(_regress(boxes[keep], offsets[keep]))

    def _output(self, img: Tensor, boxes: Tensor) -> Faces:
        """Stage 3: O-Net's scores, boxes and landmarks."""
        prob, offsets, marks = self.onet(_normalised(_crops(img, boxes, 48)))
        passed = prob >= self.thresholds[2]
        boxes, prob, offsets, marks = (t[passed] for t in (boxes, prob, offsets, marks))
        size = boxes[:, 2:] - boxes[:, :2] + 1  # landmarks: fractions of the box before refining
        points = (
            torch.stack([marks[:, :5], marks[:, 5:]], 2) * size[:, None] + boxes[:, None, :2] - 1
        )
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, prob, 0.7, over_min=True)
        return Faces(boxes[keep] - 1, prob[keep], points[keep])  # 0-based pixels

    def align(self, image: np.ndarray, where: str) -> np.ndarray:
        """The largest face of an (H, W, 3) uint8 RGB image as an aligned 112 x 112 crop;
        DataError if there is none."""
        faces = self.detect(image)
        if not len(faces.boxes):
            raise DataError(f"{where}: no face found (MTCNN)")
        wh = (faces.boxes[:, 2:] - faces.boxes[:, :2] + 1).clamp(min=0)
        largest = int((wh[:, 0] * wh[:, 1]).argmax())
        return align_face(image, faces.landmarks[largest])


def _load_state(net: nn.Module, path: Path) -> None:
    """A net's weights from a state-dict file, read weights-only; DataError in one line."""
    state = load_torch_weights_only(path, f"MTCNN's {type(net).__name__} weights")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if got != want:
        wrong = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise DataError(
            f"{path} does not hold MTCNN's {type(net).__name__} weights as facenet-pytorch "
            f"ships them (first difference: {wrong[0] if wrong else 'not a dict'})"
        )
    net.load_state_dict(state)


def similarity_transform(src: Tensor, dst: Tensor) -> Tensor:
    """The 2 x 3 matrix [c R | t] of the similarity that maps points src (n, 2) closest onto
    dst (n, 2) in least squares (Umeyama 1991, eqs. 40-42), float64."""
    src, dst = torch.as_tensor(src).double(), torch.as_tensor(dst).double()
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    a, b = src - mean_src, dst - mean_dst
    variance = a.pow(2).sum(1).mean()  # sigma_x^2
    u, d, vt = torch.linalg.svd(b.T @ a / len(src))  # Sigma_xy = U D V^T
    s = torch.ones(2, dtype=torch.float64)
    if torch.linalg.det(u) * torch.linalg.det(vt) < 0:  # a reflection: S = diag(1, -1)
        s[-1] = -1
    rotation = u @ torch.diag(s) @ vt
    scale = (d * s).sum() / variance
    shift = mean_dst - scale * rotation @ mean_src
    return torch.cat([scale * rotation, shift[:, None]], 1)


def warp_affine(image: Tensor, matrix: Tensor, size: int = CROP) -> Tensor:
    """(C, size, size): crop pixel (u, v) takes the image's (C, H, W) bilinear value at
    M^-1 (u, v), zeros outside, for M (2 x 3) from image to crop pixel coordinates."""
    full = torch.cat([matrix.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    inverse = torch.linalg.inv(full)[:2]
    v, u = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    points = torch.stack([u, v, torch.ones_like(u)], -1).double() @ inverse.T  # (size, size, 2)
    _, height, width = image.shape
    # pixel centres at whole coordinates -> grid_sample's [-1, 1] (align_corners=False)
    grid = torch.stack([(2 * points[..., 0] + 1) / width, (2 * points[..., 1] + 1) / height], -1)
    out = F.grid_sample(
        image[None].float(), (grid - 1)[None].float(), "bilinear", "zeros", align_corners=False
    )
    return out[0]


def align_face(image: np.ndarray, landmarks: Tensor) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image's face with these five landmarks as ArcFace's aligned
    (112, 112, 3) uint8 crop."""
    matrix = similarity_transform(landmarks, torch.tensor(ARCFACE_TEMPLATE))
    img = torch.tensor(np.asarray(image)).permute(2, 0, 1).float()
    crop = warp_affine(img, matrix).round().clamp(0, 255).to(torch.uint8)
    return crop.permute(1, 2, 0).numpy()
