"""Files the page hands out: a LoRA in the layout the visitor picks, as one downloadable file.

peft LoRAs are folders (adapter_config.json + adapter_model.safetensors), so they travel as
a zip holding that folder; diffusers and kohya LoRAs are single safetensors files. Every
file goes into a fresh folder under the server's temporary folder.
"""

from __future__ import annotations

import os
import re
import uuid
import zipfile
from pathlib import Path

from condlora.core.errors import DataError
from condlora.lora.formats import LAYOUTS, LoRAWeights, write_lora


def safe_stem(text: str) -> str:
    """A file-name stem made of letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "lora"


def zip_folder(folder: Path, path: Path) -> Path:
    """Zip a folder's files under its own name (written to a temporary name, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{folder.name}/{file.name}")
    os.replace(tmp, path)
    return path


def lora_download(weights: LoRAWeights, layout: str, root: Path, stem: str) -> Path:
    """The LoRA as one file in `layout` inside a new folder under `root`."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown LoRA layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    folder = root / uuid.uuid4().hex
    folder.mkdir(parents=True)
    stem = f"{safe_stem(stem)}-{layout}"
    if layout == "peft":
        write_lora(weights, folder / stem, "peft")
        return zip_folder(folder / stem, folder / f"{stem}.zip")
    return write_lora(weights, folder / f"{stem}.safetensors", layout)[0]
