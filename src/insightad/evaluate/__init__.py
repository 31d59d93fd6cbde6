"""Evaluation: metrics of a model on a labelled dataset (image level, and pixel level for maps)."""
