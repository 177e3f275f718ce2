"""Composition: turn a Config into data, a backbone with LoRA injected, and a denoiser.

This is the one place where the ground-floor packages (lora, nets, diffusion,
data) meet. The backbone never learns about LoRA: `ConditionedNet` sets the
LoRA condition around each backbone call, from the arguments the denoiser
already passes (noise label and class label).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from condlora.core.errors import ConfigError, DataError
from condlora.data import (
    folder_layout,
    load_cifar10,
    load_digits_images,
    load_image_folder,
    stratified_split,
)
from condlora.data.augment import AUGMENT_DIM
from condlora.diffusion import (
    Denoiser,
    IDDPMDenoiser,
    Preconditioner,
    iddpm_precond,
    make_precond,
)
from condlora.image.config import ARCHS, DATA_SETS, DECODER_NLLS, Config
from condlora.lora import conditioning, inject, lora_layers
from condlora.nets import ADMUNet, DDPMppUNet, SmallUNet
from condlora.nets.unet import COND_MODES

# The module whose output is the backbone's condition embedding (UC-LoRA's input).
EMB_MODULES = {"small_unet": "embed", "adm": "time_embed", "ddpmpp": "map_act"}
LORA_METHODS_SEEING_CLASS = ("class", "time+class", "uc")


class ConditionedNet(nn.Module):
    """Calls the backbone inside `conditioning(...)`, deriving t from its noise label.

    Sampling fast path: without gradients, when the whole batch shares its noise level and
    class, every LoRA layer applies W + dW(w) as one weight (decided inside the layer, for
    every method, UC-LoRA included), so the adapters cost nothing per position.
    """

    def __init__(self, net: nn.Module, precond: Preconditioner, pass_labels: bool) -> None:
        super().__init__()
        self.net = net
        self.precond = precond
        self.pass_labels = pass_labels  # does the backbone itself take class labels?
        self.lora = list(lora_layers(net).values())

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone output with the LoRA condition (t, y) set for this call."""
        t = self.precond.time_of_label(noise_labels)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        labels = class_labels if self.pass_labels else None
        with conditioning(self.net, t=t, y=class_labels):
            return self.net(x, noise_labels, labels, **extra)


def resolve_data(cfg: Config) -> Config:
    """The config with data.channels and data.num_classes filled in from the data set.

    A folder's classes are its subfolders; the trainer stores the resolved config, so a
    finished run rebuilds without the data.
    """
    d = cfg.data
    if d.name not in DATA_SETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATA_SETS)}")
    if d.name != "digits" and not d.path:
        raise ConfigError(f"data.name {d.name} needs data.path (where the data lies)")
    if d.name == "cifar10" and d.resolution != 32:
        raise ConfigError("cifar10 images are 32x32: set data.resolution: 32")
    channels, classes = DATA_SETS[d.name]
    if d.num_classes < 0 and classes is None:
        classes = len(folder_layout(d.path)[2])
    fills = {"channels": d.channels or channels}
    if d.num_classes < 0:
        fills["num_classes"] = classes
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **fills))


def num_classes(cfg: Config) -> int:
    """Number of classes the model is conditioned on (0: unconditional)."""
    if not cfg.net.class_conditional:
        return 0
    classes = resolve_data(cfg).data.num_classes
    if classes == 0:
        raise ConfigError(
            f"{cfg.data.path} has no class subfolders: set net.class_conditional: false"
        )
    return classes


def image_channels(cfg: Config) -> int:
    """Channels of the configured images."""
    return resolve_data(cfg).data.channels


def _check(cfg: Config) -> None:
    if cfg.net.arch not in ARCHS:
        raise ConfigError(f"unknown net.arch '{cfg.net.arch}'; valid: {', '.join(ARCHS)}")
    if cfg.net.cond_mode not in COND_MODES:
        raise ConfigError(
            f"unknown net.cond_mode '{cfg.net.cond_mode}'; valid: {', '.join(COND_MODES)}"
        )
    method = cfg.lora.method
    if cfg.net.cond_mode != "scale_shift" and method == "none":
        raise ConfigError(
            f"net.cond_mode '{cfg.net.cond_mode}' adds LoRA conditioning: set lora.method "
            "(time, class, uc, time+class)"
        )
    lora_only = cfg.net.cond_mode == "lora_only"
    if cfg.net.augment_dim and cfg.net.arch != "ddpmpp":
        raise ConfigError("net.augment_dim needs net.arch ddpmpp (the net with that label)")
    if cfg.train.augment_p > 0 and cfg.net.augment_dim != AUGMENT_DIM:
        raise ConfigError(
            f"train.augment_p > 0 feeds {AUGMENT_DIM}-d augmentation labels to the net: "
            f"set net.arch ddpmpp and net.augment_dim {AUGMENT_DIM}"
        )
    if lora_only and cfg.net.arch == "adm" and "uc" in method.split("+"):
        raise ConfigError(
            "net.arch adm in cond_mode lora_only has no embedding MLP for UC-LoRA to read: "
            "use lora.method time, class or time+class"
        )
    if lora_only and cfg.net.class_conditional and method not in LORA_METHODS_SEEING_CLASS:
        raise ConfigError(
            f"with net.cond_mode lora_only the class reaches the model only through LoRA, "
            f"but lora.method '{method}' does not see it: use one of "
            f"{', '.join(LORA_METHODS_SEEING_CLASS)}"
        )


def lora_config(cfg: Config):  # noqa: ANN201 - returns condlora.lora.LoRAConfig
    """The LoRA config with the fields that follow from the rest of the config filled in."""
    lcfg = cfg.lora
    fills = {}
    if "uc" in lcfg.method.split("+") and lcfg.emb_module is None:
        fills["emb_module"] = EMB_MODULES[cfg.net.arch]
        if cfg.net.arch == "ddpmpp":  # the hook sits on a SiLU: no Linear to read the width from
            fills["emb_dim"] = cfg.net.model_channels * 4
    if "class" in lcfg.method.split("+"):
        fills["num_classes"] = max(num_classes(cfg), 1)
    return dataclasses.replace(lcfg, **fills)


def build_net(cfg: Config) -> nn.Module:
    """The backbone alone, exactly as configured (no LoRA)."""
    cfg = resolve_data(cfg)
    _check(cfg)
    n = cfg.net
    lora_only = n.cond_mode == "lora_only"
    uses_embedding = not lora_only or "uc" in cfg.lora.method.split("+")
    labels_in_net = cfg.net.class_conditional and uses_embedding
    try:
        if n.arch == "adm":
            return _adm(cfg)
        if n.arch == "ddpmpp":
            return _ddpmpp(cfg)
        return _small_unet(cfg, uses_embedding, labels_in_net)
    except ValueError as err:  # the net's own checks (sizes that do not divide, ...)
        raise ConfigError(f"net: {err}") from None


def _shared_net_args(cfg: Config) -> dict:
    """Constructor arguments that every U-Net takes from the config in the same way."""
    n = cfg.net
    return {
        "img_resolution": cfg.data.resolution,
        "in_channels": image_channels(cfg),
        "model_channels": n.model_channels,
        "channel_mult": tuple(n.channel_mult),
        "num_blocks": n.num_blocks,
        "attn_resolutions": tuple(n.attn_resolutions),
        "cond_mode": n.cond_mode,
        "dropout": n.dropout,
    }


def _small_unet(cfg: Config, uses_embedding: bool, labels_in_net: bool) -> nn.Module:
    n = cfg.net
    return SmallUNet(
        **_shared_net_args(cfg),
        out_channels=image_channels(cfg),
        num_heads=n.num_heads,
        num_classes=num_classes(cfg) if labels_in_net else 0,
        keep_embedding=uses_embedding,
        noise_channels=n.noise_channels,
        patch_size=n.patch_size,
    )


def _adm(cfg: Config) -> nn.Module:
    learned_variance = cfg.diffusion.objective == "iddpm"  # epsilon and variance channels
    return ADMUNet(
        **_shared_net_args(cfg),
        out_channels=image_channels(cfg) * (2 if learned_variance else 1),
        num_heads=cfg.net.num_heads,
        num_classes=num_classes(cfg) if cfg.net.cond_mode != "lora_only" else 0,
        timestep_scale=1000 / cfg.diffusion.num_timesteps,  # as IDDPM's rescale_timesteps
    )


def _ddpmpp(cfg: Config) -> nn.Module:
    return DDPMppUNet(
        **_shared_net_args(cfg),
        out_channels=image_channels(cfg),
        num_classes=num_classes(cfg),
        augment_dim=cfg.net.augment_dim,
        noise_channels=cfg.net.noise_channels,
    )


def build_denoiser(cfg: Config) -> Denoiser:
    """Backbone + injected LoRA + objective, as one denoiser D(x, sigma, class_labels=...)."""
    cfg = resolve_data(cfg)
    net = build_net(cfg)
    d = cfg.diffusion
    if cfg.lora.method != "none":
        inject(net, lora_config(cfg))
    pass_labels = getattr(net, "num_classes", 0) > 0
    if d.objective == "iddpm":  # epsilon + learned variance: the net has 2x the channels
        precond = iddpm_precond(d.num_timesteps, d.schedule)
        exact = _decoder_nll_is_exact(cfg)
        return IDDPMDenoiser(ConditionedNet(net, precond, pass_labels), precond, **exact)
    edm = {"sigma_data": d.sigma_data, "P_mean": d.p_mean, "P_std": d.p_std}
    precond = make_precond(
        d.objective,
        schedule=d.schedule,
        num_timesteps=d.num_timesteps,
        **(edm if d.objective == "edm" else {}),
    )
    return Denoiser(ConditionedNet(net, precond, pass_labels), precond, d.loss_reduction)


def _decoder_nll_is_exact(cfg: Config) -> dict[str, bool]:
    """IDDPMDenoiser's exact_decoder_nll from diffusion.decoder_nll; "sum" loss refused."""
    d = cfg.diffusion
    if d.decoder_nll not in DECODER_NLLS:
        raise ConfigError(
            f"unknown diffusion.decoder_nll '{d.decoder_nll}'; valid: {', '.join(DECODER_NLLS)}"
        )
    if d.loss_reduction != "mean":
        raise ConfigError(
            "diffusion.loss_reduction applies to edm, ddpm and v: the iddpm objective takes "
            "improved-diffusion's mean over pixels (set loss_reduction: mean)"
        )
    return {"exact_decoder_nll": d.decoder_nll == "exact"}


def build_data(
    cfg: Config,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels), (held-out images, labels) for the configured data set."""
    d = resolve_data(cfg).data
    if d.name == "cifar10":
        return load_cifar10(d.path, "train"), load_cifar10(d.path, "test")
    if d.name == "digits":
        images, labels = load_digits_images(d.resolution)
    else:
        images, labels, _ = load_image_folder(d.path, d.resolution, d.channels)
        labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    if not 0 <= d.holdout < len(images):
        raise DataError(f"data.holdout {d.holdout} must be below the {len(images)} images")
    return stratified_split(images, labels, holdout=d.holdout, seed=d.split_seed)
