"""Checkpoint scoring: feature statistics, the Fréchet distance (FID or FD-ConvNet), the feature
ConvNet, and the choice of the best checkpoint."""
