"""The Inception-v3 feature network used for FID (the TF 2015-12-05 graph as ported to PyTorch).

Differences from the ImageNet Inception-v3: BatchNorm eps 1e-3, average pools in the mixed blocks
ignore padding (count_include_pad=False), Mixed_7c pools its last branch with max pooling, and the
classifier is 1008-way. Module names follow the `pt_inception-2015-12-05` state dict so it loads
strictly. Inputs are float images in [-1, 1], resized to 299x299 inside the module.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.errors import DataError
from condlora.core.safetensors_io import describe_mismatch, read_weights

WEIGHTS_HINT = (
    "download pt_inception-2015-12-05-6726825d.pth (the pytorch-fid release) "
    "and pass its path with --inception-weights"
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], **kw: object):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, BN, ReLU."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pooled branches at 35x35."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches along channels."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class MixedB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the strided conv, double conv and max-pool branches."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches at 17x17."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches along channels."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class MixedD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the two strided conv branches and a max pool."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """Mixed_7b/7c: expanded filter bank at 8x8; 7c max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the 1x1, split 3x3, split double 3x3 and pooled branches."""
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """FID Inception-v3: (N, 3, H, W) images in [-1, 1] -> (N, 2048) pool3 features."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for features; kept so weights load strictly
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "FIDInception":
        """Always stays in eval mode: BatchNorm statistics are part of the metric."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to 299x299 (bilinear), run Conv2d_1a_3x3 .. Mixed_7c, global average pool."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"FID Inception needs (N, 3, H, W) images, got shape {tuple(x.shape)}")
        with torch.no_grad():
            x = x.to(self.fc.weight.dtype)
            if x.shape[-2:] != (299, 299):
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":  # header checked first; NaN / inf refused
        try:
            return read_weights(path, None, "FID Inception weights file", DataError)[1]
        except DataError as err:
            raise DataError(f"cannot read FID Inception weights: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt files raise many different types
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read FID Inception weights {path}: {msg}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DataError(f"FID Inception weights {path} are not a state dict of tensors")
    return state


def load_fid_inception(path: str | Path) -> FIDInception:
    """Load FID Inception weights from a .safetensors or .pth state dict, checked strictly."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"FID Inception weights not found at {path}: {WEIGHTS_HINT}")
    state = _read_state_dict(path)
    with torch.device("meta"):  # skip the random init: every tensor is loaded below
        model = FIDInception()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    problems = describe_mismatch(expected, state, optional)
    if problems:
        raise DataError(f"FID Inception weights {path} do not fit: {problems}")
    for k in optional:
        state.setdefault(k, torch.zeros((), dtype=torch.long))
    model.to_empty(device="cpu").load_state_dict(state, strict=True)
    return model.eval()
