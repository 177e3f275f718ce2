"""The text encoder and the VAE of a diffusers pipeline, for `net.arch: diffusers`.

A `UNet2DConditionModel` is read with its pipeline's `text_encoder/` and `tokenizer/`
(siblings of `unet/`); a pipeline with a `vae/` (an `AutoencoderKL`) is a latent model.
Both stay frozen and outside the module tree (`Frozen`): they are in no state dict or
checkpoint, and the EMA copy shares them rather than copying them.

Captions: each caption is tokenised as the Stable Diffusion pipelines do (padded to the
tokenizer's model_max_length, truncated) and encoded once; its last hidden states are the
U-Net's `encoder_hidden_states`. The backbone takes a caption's index in the current table
(`set_prompts`) where a class model takes its class label; no index, or the index -1 (a
caption dropped in training, `train.label_dropout`; guidance's unconditional half) means the
empty prompt "" (the pipelines' unconditional prompt).

UC-LoRA's condition on a text model is [time embedding, pooled text embedding]: the
U-Net's own time embedding (what UC-LoRA reads on a UNet2DModel) joined with the text
encoder's pooled output (CLIP's end-of-text token), so the LoRA's strengths can follow the
prompt as they follow the class on a class model. It is the output of the backbone's
`text_condition` module; `lora bake` and `lora schedule` read it at `--prompt` ("").

Latents: images are encoded to z = (mean of the VAE's posterior - shift_factor) *
scaling_factor, once before training (`data.cache_latents`), or per batch with a draw from
the posterior (as diffusers' train_text_to_image does) when not cached; samples are decoded
with x = VAE.decode(z / scaling_factor + shift_factor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from condlora.core.errors import ConfigError

TEXT_MODEL = "UNet2DConditionModel"
ENCODE_BATCH = 8  # images or captions per call of the VAE or the text encoder


def fastest_device() -> torch.device:
    """The GPU where there is one (encoding the captions or the latents once), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Frozen:
    """A frozen pipeline part held outside the module tree; `copy.deepcopy` shares it."""

    def __deepcopy__(self, memo: dict) -> Frozen:
        return self


def _config(folder: Path) -> dict:
    """The config.json of a pipeline part (ConfigError where it cannot be read)."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: no readable config.json ({err})") from None


class TextEncoder(Frozen):
    """A pipeline's tokenizer and text encoder (loaded at first use), with a table of
    encoded captions that the backbone indexes."""

    def __init__(self, root: Path | None) -> None:
        parts = [root / "tokenizer", root / "text_encoder"] if root is not None else []
        if (
            root is None
            or not all(p.is_dir() for p in parts)
            or not (parts[1] / "config.json").is_file()
        ):
            raise ConfigError(
                f"a {TEXT_MODEL} needs its pipeline's text_encoder/ and tokenizer/ beside unet/: "
                f"give net.pretrained the pipeline folder{f' ({root} lacks them)' if root else ''}"
            )
        self.root = root
        self.config = _config(root / "text_encoder")
        self._parts: tuple | None = None
        self._empty: tuple[Tensor, Tensor] | None = None  # the empty prompt's encoding
        self.hidden = self.pooled = None  # the table: (n, L, D) and (n, P)
        self.prompts: list[str] = []  # the captions the table's rows encode

    def width(self) -> int:
        """Width of the pooled text embedding (the projection's with a projection)."""
        with_projection = "Projection" in self.config.get("architectures", [""])[0]
        return int(self.config["projection_dim" if with_projection else "hidden_size"])

    def _load(self) -> tuple:
        if self._parts is None:
            import transformers

            name = self.config.get("architectures", ["CLIPTextModel"])[0]
            bars = transformers.utils.logging.is_progress_bar_enabled()
            transformers.utils.logging.disable_progress_bar()  # a bar per load of a local file
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    self.root / "tokenizer", local_files_only=True
                )
                encoder = getattr(transformers, name).from_pretrained(
                    self.root / "text_encoder", local_files_only=True
                )
            except (OSError, ValueError, AttributeError) as err:
                raise ConfigError(f"{self.root}: the text encoder does not load ({err})") from None
            finally:
                if bars:
                    transformers.utils.logging.enable_progress_bar()
            self._parts = (tokenizer, encoder.requires_grad_(False).eval())
        return self._parts

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(hidden states (n, L, D), pooled (n, P)) of the prompts (callers give distinct
        ones), float32 on the CPU; encoded on the GPU where there is one."""
        tokenizer, encoder = self._load()
        encoder.to(fastest_device())  # while encoding, then back: the table alone is kept
        hidden, pooled = [], []
        for start in range(0, len(prompts), ENCODE_BATCH):
            ids = tokenizer(
                prompts[start : start + ENCODE_BATCH],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(encoder.device))
            hidden.append(out[0].float().cpu())
            pooled.append(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
        encoder.to("cpu")
        return torch.cat(hidden), torch.cat(pooled).float().cpu()

    def set_prompts(self, prompts: list[str]) -> None:
        """The captions that the backbone's labels 0..n-1 name from now on."""
        self.hidden, self.pooled = self.encode(prompts)
        self.prompts = list(prompts)

    def lookup(self, labels: Tensor | None, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder_hidden_states, pooled) of a batch: the table's rows `labels` (-1: the
        empty prompt), or the empty prompt's for all n rows; on `like`'s device and dtype."""
        if self._empty is None:
            self._empty = self.encode([""])
        empty = [v.expand(n, *v.shape[1:]) for v in self._empty]
        if labels is None:
            return empty[0].to(like), empty[1].to(like)
        idx = labels.long().cpu()
        if (idx >= 0).any() and self.hidden is None:
            raise ConfigError("no captions set for the text model (set_prompts)")
        null = (idx < 0).view(-1, 1, 1)  # the empty prompt
        if self.hidden is None:
            return empty[0].to(like), empty[1].to(like)
        hidden = torch.where(null, empty[0], self.hidden[idx.clamp(min=0)])
        pooled = torch.where(null[:, :, 0], empty[1], self.pooled[idx.clamp(min=0)])
        return hidden.to(like), pooled.to(like)


class LatentCodec(Frozen):
    """A pipeline's AutoencoderKL (loaded at first use): images <-> scaled latents."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = _config(folder)
        if self.config.get("_class_name") != "AutoencoderKL":
            raise ConfigError(
                f"{folder} holds a {self.config.get('_class_name')}; net.arch diffusers reads "
                "an AutoencoderKL as the pipeline's vae/"
            )
        self.factor = 2 ** (len(self.config.get("block_out_channels", [64])) - 1)
        self.scale = float(self.config.get("scaling_factor", 0.18215))
        self.shift = float(self.config.get("shift_factor") or 0.0)
        self._vae = None

    def _load(self, device: torch.device) -> torch.nn.Module:
        if self._vae is None:
            import diffusers

            try:
                vae = diffusers.AutoencoderKL.from_pretrained(self.folder, local_files_only=True)
            except (OSError, ValueError, RuntimeError) as err:
                raise ConfigError(f"{self.folder}: the VAE does not load ({err})") from None
            self._vae = vae.requires_grad_(False).eval()
        return self._vae.to(device)

    @torch.no_grad()
    def encode(
        self, images: Tensor, draw: bool = False, device: torch.device | None = None
    ) -> Tensor:
        """Latents z = (posterior mean, or a draw - shift) * scale of images in [-1, 1],
        computed on `device` (default: the images'), returned on the images' device."""
        vae = self._load(device or images.device)
        out = []
        for part in images.split(ENCODE_BATCH):
            posterior = vae.encode(part.to(vae.device, vae.dtype)).latent_dist
            z = posterior.sample() if draw else posterior.mode()
            out.append(((z.float() - self.shift) * self.scale).to(images.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in about [-1, 1] of latents z: VAE.decode(z / scale + shift)."""
        vae = self._load(latents.device)
        out = [
            vae.decode((z / self.scale + self.shift).to(vae.dtype)).sample.float()
            for z in latents.split(ENCODE_BATCH)
        ]
        return torch.cat(out)


def pipeline_parts(
    path: Path, folder: Path, kind: str
) -> tuple[TextEncoder | None, LatentCodec | None]:
    """(text encoder, VAE) of the pipeline that the model `folder` (found from net.pretrained
    `path`) belongs to: a text model's encoder (ConfigError where it is missing), and the
    VAE where the pipeline has a vae/. A model folder given alone has no pipeline."""
    root = Path(path) if folder != Path(path) else None
    text = TextEncoder(root) if kind == TEXT_MODEL else None
    vae = root / "vae" if root is not None else None
    return text, LatentCodec(vae) if vae is not None and vae.is_dir() else None


def condition_width(path: Path, unet_config: dict) -> int:
    """Width of a text model's UC-LoRA condition: time embedding + pooled text embedding."""
    time = unet_config.get("time_embedding_dim") or 4 * unet_config["block_out_channels"][0]
    return int(time) + TextEncoder(Path(path)).width()
