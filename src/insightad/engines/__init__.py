"""Engines that run a graph: PyTorch (the reference) and ONNX Runtime (fast on CPU).

One export-and-verify routine (``export``), ONNX Runtime sessions (``onnx_runtime``) and the fit-time
feature runner (``features``). Nothing here knows about Detectors.
"""
