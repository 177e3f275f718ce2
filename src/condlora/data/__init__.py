"""condlora.data: the embedded digits, CIFAR-10 (python format), image folders, EDM augmentation."""

from condlora.data.augment import AUGMENT_DIM, AugmentPipe
from condlora.data.cifar import CIFAR10_CLASSES, load_cifar10
from condlora.data.digits import NUM_CLASSES, load_digits_images
from condlora.data.folder import folder_layout, load_image_folder
from condlora.data.split import stratified_split

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
