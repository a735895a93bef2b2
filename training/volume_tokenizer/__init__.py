"""Training stage 1: the VQ-VAE volume tokenizer (data, training, evaluation)."""
