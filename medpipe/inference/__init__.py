"""Inference: checkpoints loaded once, sliding-window or whole-image prediction, flip TTA, ensembles."""
