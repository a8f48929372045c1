class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the config; the message lists what."""
