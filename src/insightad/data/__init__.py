"""Data: discover a dataset's layout, read images and masks safely, bring them to the model's size."""

from insightad.data.images import IMAGE_EXTENSIONS, is_image_file, load_image, load_mask
from insightad.data.layouts import Dataset, Sample, discover
from insightad.data.preprocess import Preprocessing

__all__ = ["IMAGE_EXTENSIONS", "Dataset", "Preprocessing", "Sample", "discover", "is_image_file",
           "load_image", "load_mask"]
