"""Training: data pipeline, loop and recipes."""
