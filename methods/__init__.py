"""Distillation recipes, trainer, samplers, data, evaluation and CLI."""
