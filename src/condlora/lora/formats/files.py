"""LoRA files on disk: find the layout, read into LoRAWeights, write any layout atomically.

The layout modules (peft, diffusers, kohya) are pure dict-to-dict functions; this module is
the thin file layer on top of them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from condlora.core.errors import LoRAError
from condlora.core.files import check_output_folder, first_missing
from condlora.core.safetensors_io import read_header, read_weights
from condlora.lora.formats import diffusers, kohya, peft
from condlora.lora.formats.keys import COMPONENTS, key_layout
from condlora.lora.formats.single import from_single_file
from condlora.lora.formats.weights import BaseModules, LoRAWeights

LAYOUTS = ("peft", "diffusers", "kohya")
# the factor names of every layout (kohya, peft / diffusers)
LORA_KEY_ENDS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a safetensors file (keys only, as None values, if not tensors).

    The header is checked before any tensor is read; LoRAError names the file and the damage.
    """
    if not tensors:
        metadata, entries = read_header(path, "LoRA file", LoRAError)
        return dict.fromkeys(entries), metadata
    metadata, out = read_weights(path, None, "LoRA file", LoRAError)
    return out, metadata


def _peft_folder(folder: Path) -> tuple[str, Path]:
    """('peft', folder) after checking that both of its files are there."""
    for name in (peft.CONFIG_NAME, peft.WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise LoRAError(f"peft folder {folder} has no {name}")
    return "peft", folder


def peft_components(folder: Path) -> dict[str, Path]:
    """The component folders (unet/, text_encoder/, text_encoder_2/) of a folder that holds
    a peft adapter per model, each checked; {} if it has none."""
    subs = {c: folder / c for c in COMPONENTS if (folder / c / peft.CONFIG_NAME).exists()}
    for sub in subs.values():
        _peft_folder(sub)
    return subs


def _read_peft(folder: Path) -> LoRAWeights:
    """A peft folder, or one with a peft folder per component, as LoRAWeights."""
    subs = peft_components(folder) or {None: folder}
    parts = {}
    for component, sub in subs.items():
        config = _read_json(sub / peft.CONFIG_NAME)
        tensors, _ = read_safetensors(sub / peft.WEIGHTS_NAME)
        parts[component] = peft.from_peft(tensors, config, str(sub), component)
    return peft.join_components(parts) if len(parts) > 1 else next(iter(parts.values()))


def _layout_of_keys(keys: Iterable[str], path: Path) -> str:
    """The layout that a LoRA file's keys belong to (kohya, comfyui or diffusers)."""
    keys = list(keys)
    if any(k.startswith(peft.PREFIX) for k in keys):
        raise LoRAError(
            f"{path} holds peft keys ({peft.PREFIX}...) but is not in a folder with its "
            f"{peft.CONFIG_NAME}; the scale cannot be known without it"
        )
    layout = key_layout(keys)
    if layout is None:
        raise LoRAError(f"{path} holds no LoRA keys of a known layout (peft, diffusers, kohya)")
    return layout


def detect_layout(path: str | os.PathLike) -> tuple[str, Path]:
    """(layout, path to read): a peft folder, or a diffusers, kohya or ComfyUI file."""
    path = Path(path)
    if not path.exists():
        raise LoRAError(f"LoRA not found: {path}")
    if path.is_dir():
        if (path / peft.CONFIG_NAME).exists() or (path / peft.WEIGHTS_NAME).exists():
            return _peft_folder(path)
        if peft_components(path):
            return "peft", path
        if (path / diffusers.WEIGHTS_NAME).is_file():
            return detect_layout(path / diffusers.WEIGHTS_NAME)
        raise LoRAError(
            f"{path} holds no LoRA ({peft.CONFIG_NAME} + {peft.WEIGHTS_NAME}, in it or in "
            f"unet/ and text_encoder/, or {diffusers.WEIGHTS_NAME})"
        )
    if path.name in (peft.CONFIG_NAME, peft.WEIGHTS_NAME):
        return _peft_folder(path.parent)
    keys, _ = read_safetensors(path, tensors=False)
    return _layout_of_keys(keys, path), path


def _read_json(path: Path) -> dict:
    """A JSON object from a file; LoRAError if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoRAError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise LoRAError(f"{path} does not hold a JSON object")
    return value


def as_base_modules(base: BaseModules | Iterable[str] | None) -> BaseModules | None:
    """A module list (names only) or a name -> shape mapping, as a mapping."""
    if base is None or isinstance(base, Mapping):
        return base
    return dict.fromkeys(base)


def read_lora(
    path: str | os.PathLike,
    base_modules: BaseModules | Iterable[str] | None = None,
    check_base: bool = True,
    other_kinds: bool = False,
    unmapped_ok: bool = False,
) -> LoRAWeights:
    """Any LoRA file or peft folder -> LoRAWeights, checked (finite, fits the base if given).

    base_modules names kohya modules; with check_base=False it serves only for that. Modules
    of other kinds (LoHa, LoKr, full, Tucker, DoRA) are a LoRAError unless other_kinds, and
    so are keys that map to no module (listed in `unmapped`) unless unmapped_ok.
    """
    layout, source = detect_layout(path)
    base = as_base_modules(base_modules)
    if layout == "peft":
        weights = _read_peft(source)
    else:
        tensors, metadata = read_safetensors(source)
        weights = from_single_file(tensors, metadata, base, str(source), layout)
    weights.check_finite(str(source))
    if check_base and base is not None and weights.resolved:
        weights.check_base(base, str(source))
    if weights.others and not other_kinds:
        name, m = next(iter(weights.others.items()))
        raise LoRAError(
            f"{source}: module {name} is {m.describe()}, not a low-rank pair "
            "(`condlora lora convert` turns it into one by SVD)"
        )
    if not unmapped_ok:
        weights.check_mapped(f"{source}: ")
    return weights


LoRAFiles = dict[Path, "tuple[dict[str, Tensor], dict] | str"]  # path -> tensors or text


def _save_atomically(files: LoRAFiles) -> None:
    """Write every file to a temporary name first, then rename them all into place; on a
    failure the temporary files and the folders made for them are removed."""
    made = [d for d in dict.fromkeys(first_missing(p.parent) for p in files) if d is not None]
    temps = {}
    try:
        for path, content in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = tmp = path.with_name(path.name + ".tmp")
            if isinstance(content, str):
                tmp.write_text(content)
            else:
                tensors, metadata = content
                tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
                save_file(tensors, str(tmp), metadata=metadata)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)


def holds(weights: LoRAWeights, layout: str) -> bool:
    """True if the layout holds every module of the LoRA as it is (other kinds included):
    kohya holds LyCORIS kinds and kohya DoRA, peft and diffusers an all-DoRA peft adapter."""
    if not weights.others:
        return True
    if layout == "kohya":  # not peft's DoRA vectors: dora_scale is another convention
        return not any("magnitude" in m.parts for m in weights.others.values())
    return layout in ("peft", "diffusers") and not peft.split_dora(weights)[0].others


def _check_replaceable(path: Path) -> None:
    """LoRAError if `path` exists and is not a LoRA's weights (a base model, say): a LoRA is
    written over another LoRA only. Only the header is read."""
    if not path.is_file():
        return
    try:
        keys, _ = read_safetensors(path, tensors=False)
    except LoRAError:
        keys = {}
    if not any(k.endswith(LORA_KEY_ENDS) for k in keys):
        raise LoRAError(f"{path} exists and is not a LoRA file: give a new name (it is kept)")


def lora_files(weights: LoRAWeights, path: str | os.PathLike, layout: str) -> LoRAFiles:
    """The files that write_lora would write (checked, nothing written yet)."""
    files = _lora_files(weights, Path(path), layout)
    for target in files:
        if target.suffix == ".safetensors":
            _check_replaceable(target)
    return files


def _lora_files(weights: LoRAWeights, path: Path, layout: str) -> LoRAFiles:
    """lora_files before the check of what they would replace."""
    if layout == "peft":
        return _peft_files(weights, path)
    if layout not in ("diffusers", "kohya"):
        raise LoRAError(f"unknown LoRA layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    writer = diffusers.to_diffusers if layout == "diffusers" else kohya.to_kohya
    tensors, metadata = writer(weights)
    metadata = metadata | kohya.modelspec(weights, path.stem)  # what LoRA managers show
    if path.suffix != ".safetensors":
        if layout == "kohya" or (path.exists() and not path.is_dir()):
            raise LoRAError(f"{layout} LoRAs are .safetensors files, got {path}")
        check_output_folder(path, "LoRA folder")
        path = path / diffusers.WEIGHTS_NAME
    if path.is_dir():
        raise LoRAError(f"{path} is a folder, not a {layout} LoRA file")
    check_output_folder(path.parent, "the folder of the LoRA file")
    return {path: (tensors, metadata)}


def _peft_files(weights: LoRAWeights, path: Path) -> LoRAFiles:
    """A peft folder's files: one adapter, or one per component (unet/, text_encoder/ ...)
    when the LoRA has text-encoder parts; never both forms in one folder."""
    if path.exists() and not path.is_dir():
        raise LoRAError(f"peft LoRAs are folders, but {path} is a file")
    check_output_folder(path, "LoRA folder")
    parts = peft.split_components(weights)
    stale = set(peft_components(path)) - set(parts)  # a part this LoRA would not replace
    if stale or ("" not in parts and (path / peft.CONFIG_NAME).exists()):
        raise LoRAError(f"{path} holds a peft LoRA of other parts: give a new folder (it is kept)")
    files: LoRAFiles = {}
    for component, part in parts.items():
        tensors, config = peft.to_peft(part)
        files[path / component / peft.WEIGHTS_NAME] = (tensors, {"format": "pt"})
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        files[path / component / peft.CONFIG_NAME] = text
    return files


def write_loras(loras: Iterable[tuple[LoRAWeights, str | os.PathLike]], layout: str) -> list[Path]:
    """Write several LoRAs in a layout, all or none: every path is checked before any write."""
    files: LoRAFiles = {}
    for weights, path in loras:
        files |= lora_files(weights, path, layout)
    _save_atomically(files)
    return list(files)


def write_lora(weights: LoRAWeights, path: str | os.PathLike, layout: str) -> list[Path]:
    """Write the LoRA in a layout: peft -> folder, diffusers -> folder or file, kohya -> file."""
    return write_loras([(weights, path)], layout)


def base_modules_of(model: nn.Module) -> dict[str, tuple[int, ...] | None]:
    """A model's module paths -> weight shapes (None for modules without a weight)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name:
            out[name] = tuple(weight.shape) if isinstance(weight, Tensor) else None
    return out


def _weight_shape(value: object, name: str, path: Path) -> tuple[int, ...] | None:
    """A module's weight shape from JSON: null, or a list of sizes >= 0; LoRAError if not."""
    if value is None:
        return None
    sizes = isinstance(value, list) and all(type(d) is int and d >= 0 for d in value)
    if not sizes:
        raise LoRAError(f"{path}: the shape of {name!r} must be a list of sizes, got {value!r}")
    return tuple(value)


# a condlora run folder: its EMA weights, else its training checkpoint (train.checkpoint's names)
RUN_FILES = ("ema.safetensors", "checkpoint.safetensors")
RUN_KIND = "image-diffusion"  # the checkpoints' `kind` of a condlora diffusion model
BACKBONE = "net.net."  # where a condlora Denoiser holds its backbone (denoiser.net.net)


def load_base_modules(path: str | os.PathLike) -> dict[str, tuple[int, ...] | None]:
    """A base model's modules from a file: the model's safetensors weights (names and shapes),
    a condlora run folder or checkpoint (its backbone's modules, as condlora names LoRAs),
    JSON (a list of names, name -> shape, or a diffusers U-Net's config.json), or text (one
    name per line, # comments)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RUN_FILES if (path / name).is_file()]
        if not found:
            raise LoRAError(
                f"{path} is a folder without {' or '.join(RUN_FILES)}: give a condlora run "
                "folder, a checkpoint, the base model's .safetensors or a module list"
            )
        path = found[0]
    if not path.is_file():
        raise LoRAError(f"base-modules file not found: {path}")
    if path.suffix == ".safetensors":
        metadata, entries = read_header(path, "base-modules file", LoRAError)
        if metadata.get("format", "").startswith("condlora-"):
            return _modules_of_run(path, metadata, entries)
        return {
            k[: -len(".weight")]: tuple(e["shape"])
            for k, e in entries.items()
            if k.endswith(".weight")
        }
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LoRAError(f"{path} is not a readable JSON file ({err})") from None
        if isinstance(value, dict) and "down_block_types" in value:
            return _modules_of_unet_config(value, path)
        if isinstance(value, dict):
            return {str(k): _weight_shape(v, k, path) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return dict.fromkeys(value)
        raise LoRAError(f"{path}: expected a list of module names or a name -> shape object")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise LoRAError(f"{path} is not a text file of module names") from None
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return dict.fromkeys(line for line in lines if line)


def _modules_of_run(path: Path, metadata: dict, entries: dict) -> dict[str, tuple[int, ...]]:
    """The backbone's modules of a condlora checkpoint or EMA file, named as condlora names
    LoRAs: without the wrapper's prefix, a LoRA-wrapped layer by its own name (the shape of
    its base layer), the adapters' own parameters left out."""
    kind = metadata.get("kind", "")
    if kind != RUN_KIND:
        raise LoRAError(f"{path} is a condlora {kind or 'unknown'} checkpoint, not a base model's")
    prefix = ("ema." if any(k.startswith("ema.") for k in entries) else "") + BACKBONE
    weights = {
        k[len(prefix) : -len(".weight")]: tuple(e["shape"])
        for k, e in entries.items()
        if k.startswith(prefix) and k.endswith(".weight")
    }
    wrapped = {n[: -len(".base_layer")] for n in weights if n.endswith(".base_layer")}
    out = {}
    for name, shape in weights.items():
        owner = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        inside = any(owner.startswith(f"{w}.") for w in wrapped)  # the adapter's own layers
        if not inside:
            out[owner] = shape
    if not out:
        raise LoRAError(f"{path}: no backbone weights under {prefix!r}")
    return out


def _modules_of_unet_config(config: dict, path: Path) -> dict[str, tuple[int, ...] | None]:
    """The modules of the diffusers UNet2DConditionModel that a config.json describes, built
    on the meta device (no weights, no memory); needs diffusers."""
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise LoRAError(f"{path} is a diffusers U-Net config: reading it needs diffusers") from None
    try:
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LoRAError(f"{path}: not a usable UNet2DConditionModel config ({first})") from None
    return base_modules_of(model)
