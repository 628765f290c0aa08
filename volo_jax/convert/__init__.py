"""Weight conversion between the official PyTorch VOLO checkpoints and Flax NNX."""
