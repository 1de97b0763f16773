"""Training the learned parts of decoding methods (distilled drafts, ...) with optax + orbax."""
