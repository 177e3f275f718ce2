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
    load_captions,
    load_cifar10,
    load_digits_images,
    load_image_folder,
    stratified_split,
)
from condlora.diffusion import (
    Denoiser,
    IDDPMDenoiser,
    Preconditioner,
    iddpm_precond,
    make_precond,
)
from condlora.image.config import Config
from condlora.image.diffusers_net import (
    check_against_model,
    emb_module,
    is_text_model,
    load_unet,
)
from condlora.lora import conditioning, inject, lora_layers
from condlora.lora.runtime import checkpointed
from condlora.nets import ADMUNet, DDPMppUNet, SmallUNet

# The module whose output is the backbone's condition embedding (UC-LoRA's input).
EMB_MODULES = {
    "small_unet": "embed",
    "adm": "time_embed",
    "ddpmpp": "map_act",
}  # net.arch diffusers: by the folder's model class (`diffusers_net.MODELS`)


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


def num_classes(cfg: Config) -> int:
    """Number of classes the model is conditioned on (0: unconditional)."""
    return cfg.data.num_classes if cfg.net.class_conditional else 0


def image_channels(cfg: Config) -> int:
    """Channels of the configured images."""
    return cfg.data.channels


def lora_config(cfg: Config):  # noqa: ANN201 - returns condlora.lora.LoRAConfig
    """The LoRA config with the fields that follow from the rest of the config filled in."""
    lcfg = cfg.lora
    fills = {}
    if "uc" in lcfg.method.split("+") and lcfg.emb_module is None:
        arch = cfg.net.arch
        if arch == "diffusers":  # a text model's condition module holds no Linear: its width
            fills["emb_module"], width = emb_module(cfg.net.pretrained)
            fills |= {"emb_dim": width} if width and lcfg.emb_dim is None else {}
        else:
            fills["emb_module"] = EMB_MODULES[arch]
        if cfg.net.arch == "ddpmpp":  # the hook sits on a SiLU: no Linear to read the width from
            fills["emb_dim"] = cfg.net.model_channels * 4
    if "class" in lcfg.method.split("+"):
        fills["num_classes"] = max(num_classes(cfg), 1)
    return dataclasses.replace(lcfg, **fills)


def build_net(cfg: Config) -> nn.Module:
    """The backbone alone, exactly as configured (no LoRA)."""
    n = cfg.net
    lora_only = n.cond_mode == "lora_only"
    uses_embedding = not lora_only or "uc" in cfg.lora.method.split("+")
    labels_in_net = cfg.net.class_conditional and uses_embedding
    if n.arch == "diffusers":
        net = load_unet(n.pretrained)
        check_against_model(cfg, net)
        net.frozen_base = not n.train_base  # checkpoints leave a frozen base out
        if n.gradient_checkpointing:  # LoRA layers inside a block recompute as they ran
            net.unet.enable_gradient_checkpointing(checkpointed)
        return net.requires_grad_(True) if n.train_base else net
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
    net = build_net(cfg)
    d = cfg.diffusion
    if cfg.lora.method != "none":
        inject(net, lora_config(cfg))
    # the backbone takes class labels (a text model: caption indices)
    pass_labels = getattr(net, "num_classes", 0) > 0 or getattr(net, "text", None) is not None
    if d.objective == "iddpm":  # epsilon + learned variance: the net has 2x the channels
        precond = iddpm_precond(d.num_timesteps, d.schedule, **beta_range(cfg))
        exact = d.decoder_nll == "exact"
        net = ConditionedNet(net, precond, pass_labels)
        return IDDPMDenoiser(net, precond, exact_decoder_nll=exact)
    edm = {"sigma_data": d.sigma_data, "P_mean": d.p_mean, "P_std": d.p_std}
    precond = make_precond(
        d.objective,
        schedule=d.schedule,
        num_timesteps=d.num_timesteps,
        **(edm if d.objective == "edm" else beta_range(cfg)),
    )
    return Denoiser(ConditionedNet(net, precond, pass_labels), precond, d.loss_reduction)


def beta_range(cfg: Config) -> dict[str, float]:
    """The beta_start / beta_end that the config sets (the schedule's own where it sets none)."""
    d = cfg.diffusion
    return {k: v for k, v in (("beta_start", d.beta_start), ("beta_end", d.beta_end)) if v}


def build_data(
    cfg: Config,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels), (held-out images, labels) for the configured data set."""
    d = cfg.data
    if d.name == "cifar10":
        return load_cifar10(d.path, "train"), load_cifar10(d.path, "test")
    if d.name == "digits":
        images, labels = load_digits_images(d.resolution)
    else:
        images, labels, _ = load_image_folder(d.path, d.resolution, d.channels)
        labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    if not 0 <= d.holdout < len(images):
        raise DataError(f"data.holdout {d.holdout} must be below the {len(images)} images")
    if is_text_config(cfg):  # a random split; the labels become caption indices
        captions = torch.tensor(caption_index(load_captions(d.path))[1])
        (train_x, _), (held_x, _) = stratified_split(
            torch.arange(len(images)), labels * 0, holdout=d.holdout, seed=d.split_seed
        )
        return (images[train_x], captions[train_x]), (images[held_x], captions[held_x])
    return stratified_split(images, labels, holdout=d.holdout, seed=d.split_seed)


def caption_index(captions: list[str]) -> tuple[list[str], list[int]]:
    """(the distinct captions in order of first use, each image's index among them)."""
    distinct = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(distinct)}
    return distinct, [where[c] for c in captions]


def is_text_config(cfg: Config) -> bool:
    """Does the config train a text model (a diffusers UNet2DConditionModel)?"""
    return cfg.net.arch == "diffusers" and is_text_model(cfg.net.pretrained)
