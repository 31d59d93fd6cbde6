"""A model ready to score: loading on an engine, the ONNX-backed detector, exporting a detector."""
