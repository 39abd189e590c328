"""Sampling: ODE and consistency samplers, generation from exported models, and writing clips to disk."""
