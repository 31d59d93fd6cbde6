"""Scoring without PyTorch: the Prediction every scorer returns and the one prediction loop.

``Scorer`` holds what scoring needs (preprocessing, threshold, an engine taking uint8 numpy batches)
and the loop that turns images into Predictions; the PyTorch ``Detector`` (``methods.base``) and the
ONNX-backed detector (``inference.onnx_detector``) both subclass it. Nothing here imports torch.
"""

from insightad.scoring.prediction import Prediction
from insightad.scoring.scorer import Scorer

__all__ = ["Prediction", "Scorer"]
