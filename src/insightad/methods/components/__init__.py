"""Pieces several methods share: nearest neighbours, coreset selection, maps, patch Gaussians, pooling."""
