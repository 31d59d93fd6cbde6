"""The shared training loop (epochs, optimiser, early stopping, checkpoints, resume, curves)."""

from insightad.training.augment import (
                                        Augment,
                                        available_augmentations,
                                        get_augmentation,
                                        per_image,
                                        register_augmentation,
)
from insightad.training.data import data_fingerprint, load_images, sources_digest, validation_split
from insightad.training.loop import Objective, TrainingLoop, TrainResult, fingerprint

__all__ = ["Augment", "Objective", "TrainResult", "TrainingLoop", "available_augmentations", "fingerprint",
           "data_fingerprint", "get_augmentation", "load_images", "per_image", "register_augmentation", "sources_digest",
           "validation_split"]
