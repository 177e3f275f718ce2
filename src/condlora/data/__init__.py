"""condlora.data: the embedded digits data set (and, later, real-scale loaders)."""

from condlora.data.digits import NUM_CLASSES, NUM_DIGITS, load_digits_images, split_digits

__all__ = ["NUM_CLASSES", "NUM_DIGITS", "load_digits_images", "split_digits"]
