"""Evaluation on the moving-shapes benchmark: the analyzer, metrics, budget curves, sampling-time tuning."""
