"""A local diffusers `UNet2DModel` as the backbone of an image run (`net.arch: diffusers`).

`net.pretrained` names a model folder (its `config.json` and weights) or a pipeline folder
(its `unet/` and `scheduler/`; a text model's `text_encoder/` and `tokenizer/`, a latent
model's `vae/`: `diffusers_text`); it is read with `local_files_only`, nothing is downloaded.
The base weights are frozen (a run trains its conditional LoRA only) unless
`net.train_base` (a baseline trained from the folder's weights). The network sees
what a DDPM-trained diffusers U-Net expects: the VP input sqrt(abar) x0 + sqrt(1 - abar) n
(condlora's discrete objectives' c_in) and the timestep (their noise label, in [0, T-1]),
and predicts epsilon (`diffusion.objective: ddpm`) or v (`v`), as the pipeline's
scheduler says; a config that disagrees with the scheduler is refused in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from condlora.core.config import from_dict
from condlora.core.errors import ConfigError
from condlora.diffusion.precond import BETA_RANGES
from condlora.image.config import Config
from condlora.image.diffusers_text import (
    TEXT_MODEL,
    LatentCodec,
    TextEncoder,
    condition_width,
    pipeline_parts,
)

PREDICTIONS = {"epsilon": "ddpm", "v_prediction": "v"}  # scheduler prediction_type -> objective
# beta_schedule -> schedule (linear and scaled_linear with the scheduler's beta_start, beta_end)
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# the model classes read, and the module whose output is their condition embedding (UC-LoRA's
# input; a DiT's first block embeds the time and the class together)
MODELS = {
    "UNet2DModel": "unet.time_embedding",
    "DiTTransformer2DModel": "unet.transformer_blocks.0.norm1.emb",
    TEXT_MODEL: "text_condition",  # [time embedding, pooled text]: diffusers_text
}


class DiffusersUNet(nn.Module):
    """condlora's backbone call net(x, noise_labels, class_labels) on a UNet2DModel, a
    DiT (`DiTTransformer2DModel`, class-conditional; a learned-variance DiT's variance
    channels are dropped: condlora trains its epsilon or v half) or a UNet2DConditionModel
    (`text`: its labels are caption indices). `vae`: it runs on the VAE's latents."""

    def __init__(
        self, unet: nn.Module, text: TextEncoder | None = None, vae: LatentCodec | None = None
    ) -> None:
        super().__init__()
        self.unet = unet  # the model (a DiT too: the name keeps the state-dict names)
        self.is_dit = type(unet).__name__ == "DiTTransformer2DModel"
        classes = unet.config.num_embeds_ada_norm if self.is_dit else unet.config.num_class_embeds
        self.num_classes = int(classes or 0)
        self.text, self.vae = text, vae  # frozen, outside the module tree
        if text is not None:  # UC-LoRA's input: this module's output, set in _condition
            self.text_condition = nn.Identity()
            self._pooled: Tensor | None = None
            unet.time_embedding.register_forward_hook(self._condition)
        self.frozen_base = True  # net.train_base false: the folder's weights stay as they are
        self._pretrained = frozenset(self.state_dict())  # before any LoRA is injected

    def _condition(self, module: nn.Module, args: tuple, temb: Tensor) -> None:
        """After the time embedding: [time embedding, pooled text] through text_condition."""
        if self._pooled is not None:
            self.text_condition(torch.cat([temb, self._pooled.to(temb.dtype)], dim=-1))

    def from_pretrained_state(self, key: str) -> bool:
        """Is this state-dict entry the folder's own frozen weight (a LoRA-wrapped layer's
        `base_layer` included)? Then checkpoints leave it out (`train.checkpoint`)."""
        return self.frozen_base and key.replace(".base_layer.", ".") in self._pretrained

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        """The model's output; class weights (batch, K) are read as their argmax class."""
        labels = None
        if self.num_classes and class_labels is not None:
            labels = class_labels.argmax(-1) if class_labels.dim() == 2 else class_labels.long()
        t = noise_labels.to(x.dtype)
        if self.text is not None:
            hidden, self._pooled = self.text.lookup(class_labels, len(x), x)
            try:
                return self.unet(x, t, encoder_hidden_states=hidden).sample
            finally:
                self._pooled = None
        if self.is_dit:
            return self.unet(x, timestep=t, class_labels=labels).sample[:, : x.shape[1]]
        return self.unet(x, t, class_labels=labels).sample


def model_folder(path: str | Path) -> Path:
    """The folder of the model: `path` itself (a model folder) or a pipeline's `unet/` (or a
    DiT pipeline's `transformer/`)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"net.pretrained {path} is not a folder (a diffusers model or pipeline)")
    for folder in (path, path / "unet", path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(
        f"net.pretrained {path} holds no diffusers config.json (nor unet/config.json)"
    )


def load_unet(path: str | Path) -> DiffusersUNet:
    """The frozen UNet2DModel of a local folder, wrapped as a condlora backbone (under the
    meta device, as parameter counts are made: its structure alone, no weights read)."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("net.arch diffusers needs diffusers: pip install diffusers") from None
    folder = model_folder(path)
    kind = model_class(folder)
    if kind not in MODELS:
        raise ConfigError(
            f"{folder} holds a {kind}; net.arch diffusers reads a {' or a '.join(MODELS)}"
        )
    cls = getattr(diffusers, kind)
    try:
        if torch.get_default_device().type == "meta":
            unet = cls.from_config(cls.load_config(folder))
        else:
            unet = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{folder}: the U-Net does not load ({err})") from None
    text, vae = pipeline_parts(Path(path), folder, kind)
    return DiffusersUNet(unet.requires_grad_(False).eval(), text, vae)


def image_side(sample_size: int | list[int] | tuple[int, ...]) -> int:
    """A diffusers config's sample_size (an int, or [height, width]) as the square's side."""
    return sample_size if isinstance(sample_size, int) else sample_size[0]


def model_class(folder: Path) -> str | None:
    """The model class of a model folder's config.json (None if it cannot be read): its
    `_class_name`, except that a DiT saved under the older generic name (Transformer2DModel
    with ada_norm_zero, as the DiT checkpoints are) reads as DiTTransformer2DModel, the class
    diffusers itself loads it as."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero":
        return "DiTTransformer2DModel"
    return kind


def emb_module(path: str | Path) -> tuple[str, int | None]:
    """(the condition-embedding module (UC-LoRA's input) of the model in a diffusers folder,
    its width where the module holds no Linear to read it from: a text model's)."""
    folder = model_folder(path)
    kind = model_class(folder)
    if kind == TEXT_MODEL:
        config = json.loads((folder / "config.json").read_text())
        return MODELS[kind], condition_width(Path(path), config)
    return MODELS.get(kind, MODELS["UNet2DModel"]), None


def scheduler_objective(path: str | Path) -> dict | None:
    """The diffusion settings (DiffusionConfig's objective, schedule, num_timesteps and, for
    linear and scaled_linear betas, beta_start and beta_end) that a pipeline folder's
    scheduler trained with, or None for a model folder without one."""
    config = Path(path) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return None
    s = json.loads(config.read_text())
    prediction, betas = s.get("prediction_type", "epsilon"), s.get("beta_schedule", "linear")
    if prediction not in PREDICTIONS or betas not in SCHEDULES:
        raise ConfigError(
            f"{config}: prediction_type {prediction!r} with beta_schedule {betas!r} is not "
            f"supported (supported: {', '.join(PREDICTIONS)}; {', '.join(SCHEDULES)})"
        )
    if s.get("trained_betas") or s.get("rescale_betas_zero_snr"):
        raise ConfigError(f"{config}: trained_betas and zero-SNR rescaling are not supported")
    schedule = SCHEDULES[betas]
    wanted = {"objective": PREDICTIONS[prediction], "schedule": schedule}
    wanted["num_timesteps"] = int(s.get("num_train_timesteps", 1000))
    if schedule in BETA_RANGES:  # diffusers' defaults where the file names none
        start, end = s.get("beta_start", 1e-4), s.get("beta_end", 0.02)
        wanted |= {"beta_start": float(start), "beta_end": float(end)}
    return wanted


def diffusion_settings(cfg: Config) -> dict:
    """The config's diffusion settings as `scheduler_objective` gives them (its schedule's
    own betas where it sets none)."""
    d = cfg.diffusion
    got = {"objective": d.objective, "schedule": d.schedule, "num_timesteps": d.num_timesteps}
    if d.schedule in BETA_RANGES:
        start, end = BETA_RANGES[d.schedule]
        got |= {"beta_start": d.beta_start or start, "beta_end": d.beta_end or end}
    return got


def same_settings(wanted: dict, got: dict) -> bool:
    """Do two `scheduler_objective` settings agree (the betas up to float rounding)?"""
    if wanted.keys() != got.keys():
        return False
    return all(
        math.isclose(got[k], v) if isinstance(v, float) else got[k] == v for k, v in wanted.items()
    )


def settings_text(settings: dict) -> str:
    """'objective ddpm, schedule linear, ...' of diffusion settings."""
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def check_against_model(cfg: Config, net: DiffusersUNet) -> None:
    """ConfigError unless the data, the objective and the classes fit the loaded U-Net."""
    c, d = net.unet.config, cfg.data
    size, channels = image_side(c.sample_size), c.in_channels
    out = c.out_channels or c.in_channels  # a DiT: None, or 2x with a learned variance
    fits = out == c.in_channels or (net.is_dit and out == 2 * c.in_channels)
    what = "the U-Net takes"
    if net.vae is not None:  # the data are images; the U-Net sees their latents
        fits = fits and net.vae.config.get("latent_channels", 4) == c.in_channels
        size, channels = size * net.vae.factor, net.vae.config.get("in_channels", 3)
        what = "the pipeline's VAE takes"
    if (d.resolution, d.channels) != (size, channels) or not fits:
        raise ConfigError(
            f"{what} {channels} x {size} x {size} images: set data.resolution "
            f"{size} and data.channels {channels} (got {d.channels} x {d.resolution})"
        )
    if net.text is not None:
        check_text_config(cfg)
    wanted, got = scheduler_objective(cfg.net.pretrained), diffusion_settings(cfg)
    if wanted is not None and not same_settings(wanted, got):
        raise ConfigError(
            f"the pipeline's scheduler trained {settings_text(wanted)}: set "
            f"diffusion.{', .'.join(wanted)} so (got {settings_text(got)})"
        )
    if got["objective"] not in ("ddpm", "v"):
        raise ConfigError("net.arch diffusers trains with diffusion.objective ddpm or v")
    if cfg.net.class_conditional and cfg.train.label_dropout > 0:
        raise ConfigError(
            "a UNet2DModel's class embedding has no null class: set train.label_dropout 0 "
            "(classifier-free guidance is not supported on net.arch diffusers)"
        )
    if net.is_dit and not cfg.net.class_conditional:
        raise ConfigError("a DiT is class-conditional: set net.class_conditional true")
    if cfg.net.class_conditional and net.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"the U-Net has {net.num_classes} class embeddings, the data {d.num_classes} "
            "classes (set net.class_conditional: false for an unconditional U-Net)"
        )


def check_text_config(cfg: Config) -> None:
    """ConfigError unless a text model's config conditions on captions alone."""
    if cfg.net.class_conditional or "class" in cfg.lora.method:
        raise ConfigError(
            f"a {TEXT_MODEL} is conditioned on captions, without class labels: set "
            "net.class_conditional false and lora.method time or uc (class methods need "
            "class labels)"
        )


def is_text_model(path: str | Path) -> bool:
    """Is the model in a diffusers folder a text model (a UNet2DConditionModel)?"""
    return model_class(model_folder(path)) == TEXT_MODEL


def is_model_folder(path: str | Path) -> bool:
    """Does `path` hold a model that net.arch diffusers reads (`model_folder`, `MODELS`)?"""
    try:
        return model_class(model_folder(path)) in MODELS
    except ConfigError:
        return False


def folder_config(path: str | Path, data: str | Path) -> Config:
    """The image Config of a diffusers folder used as it is (a frozen base, no run of its
    own): its U-Net's image size (a latent model's: its VAE's images) and classes, its
    scheduler's objective (epsilon on DDPM's linear betas without one), DDIM with 50 steps,
    and the image folder `data`."""
    folder = model_folder(path)
    c = json.loads((folder / "config.json").read_text())
    size, channels = image_side(c.get("sample_size", 32)), int(c.get("in_channels", 3))
    _, vae = pipeline_parts(Path(path), folder, model_class(folder))
    if vae is not None:
        size, channels = size * vae.factor, int(vae.config.get("in_channels", 3))
    classes = int(c.get("num_class_embeds") or c.get("num_embeds_ada_norm") or 0)
    diffusion = scheduler_objective(path) or {"objective": "ddpm", "schedule": "linear"}
    data_cfg = {"name": "folder", "path": str(data), "resolution": size}
    data_cfg |= {"channels": channels, "num_classes": classes or -1}
    diffusion |= {"sampler": "ddim", "sample_steps": 50}
    net = {"arch": "diffusers", "pretrained": str(path), "class_conditional": bool(classes)}
    return from_dict(
        Config, {"name": Path(path).name, "data": data_cfg, "net": net, "diffusion": diffusion}
    )


def backbone_modules(denoiser: nn.Module) -> tuple[nn.Module, str]:
    """(the module whose names a LoRA file uses, the prefix of those names in the backbone):
    the diffusers U-Net itself for `net.arch: diffusers`, else the backbone."""
    backbone = denoiser.net.net
    if isinstance(backbone, DiffusersUNet):
        return backbone.unet, "unet."
    return backbone, ""


def diffusers_backbone(denoiser: nn.Module) -> DiffusersUNet | None:
    """The DiffusersUNet inside an image denoiser (None for condlora's own networks)."""
    backbone = getattr(getattr(denoiser, "net", None), "net", None)  # any denoiser-like module
    return backbone if isinstance(backbone, DiffusersUNet) else None


def model_shape(denoiser: nn.Module, cfg: Config) -> tuple[int, int, int]:
    """(C, H, W) of what the network denoises: the images, or a latent model's latents."""
    net = diffusers_backbone(denoiser)
    if net is not None and net.vae is not None:
        side = image_side(net.unet.config.sample_size)
        return net.unet.config.in_channels, side, side
    return cfg.data.channels, cfg.data.resolution, cfg.data.resolution


def to_images(denoiser: nn.Module, x: Tensor) -> Tensor:
    """Samples as images: a latent model's latents decoded by its VAE, others as they are."""
    net = diffusers_backbone(denoiser)
    if net is None or net.vae is None:
        return x
    return net.vae.decode(x.to(next(net.unet.parameters()).device)).to(x.device)


def text_encoder(denoiser: nn.Module) -> TextEncoder | None:
    """The text encoder of a text model's denoiser (None: a class or unconditional model)."""
    net = diffusers_backbone(denoiser)
    return None if net is None else net.text


def check_pixel_model(denoiser: nn.Module, what: str) -> None:
    """ConfigError where the base is a text or latent pipeline, for a command that feeds
    images straight to the network (`what`)."""
    net = diffusers_backbone(denoiser)
    if net is not None and (net.text is not None or net.vae is not None):
        raise ConfigError(
            f"{what} reads pixel-space models without captions; a text-to-image or latent "
            "pipeline is not supported there yet"
        )
