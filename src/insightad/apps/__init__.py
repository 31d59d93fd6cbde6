"""Applications of a trained model: train a model file, predict, sort a folder, serve, export."""
