"""Config-driven experiments: a grid of methods and batch sizes with autoregressive decoding as the same-run baseline (`jdecode experiment`)."""
