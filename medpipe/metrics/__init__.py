"""Evaluation metrics: bootstrap confidence intervals and classification metrics (pure numpy)."""
