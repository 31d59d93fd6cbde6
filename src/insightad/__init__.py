"""InsightAD: visual anomaly detection from good images only.

Data flows ``data`` -> ``backbones`` -> ``methods`` -> ``model_file`` -> ``decide`` (thresholds)
-> ``evaluate`` / ``apps`` (predict, sort, serve, export).
"""

from insightad.errors import InsightADError  # noqa: E402
from insightad.version import __version__  # noqa: E402

__all__ = ["InsightADError", "__version__", "load_model", "create_detector", "Prediction"]


def __getattr__(name: str):  # lazy: keep `import insightad` light (no torch import)
    if name == "load_model":
        from insightad.model_file import load_model

        return load_model
    if name == "create_detector":
        from insightad.methods import create_detector

        return create_detector
    if name == "Prediction":
        from insightad.scoring import Prediction

        return Prediction
    raise AttributeError(name)
