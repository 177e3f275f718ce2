"""condlora.data: the embedded digits, image folders and the split (images), CIFAR-10 (python
format, cifar), EDM augmentation (augment)."""

from condlora.data.augment import AUGMENT_DIM, AugmentPipe
from condlora.data.cifar import CIFAR10_CLASSES, load_cifar10
from condlora.data.images import (
    NUM_CLASSES,
    folder_layout,
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
    "load_digits_images",
    "load_image_folder",
    "stratified_split",
]
