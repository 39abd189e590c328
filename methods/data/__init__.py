"""Training data: the moving-shapes benchmark, text embeddings, shards of precomputed latents, batch sources."""
