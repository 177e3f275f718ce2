"""condlora.data: the embedded digits, image folders, the split and CIFAR-10 (python
format), all in images; captions of a folder's images; EDM augmentation (augment)."""

from condlora.data.augment import AUGMENT_DIM, AugmentPipe
from condlora.data.images import (
    CIFAR10_CLASSES,
    NUM_CLASSES,
    folder_layout,
    load_captions,
    load_cifar10,
    load_digits_images,
    load_image_folder,
    stratified_split,
)

__all__ = [
    "AUGMENT_DIM",
    "AugmentPipe",
    "CIFAR10_CLASSES",
    "NUM_CLASSES",
    "folder_layout",
    "load_cifar10",
    "load_captions",
    "load_digits_images",
    "load_image_folder",
    "stratified_split",
]
