"""bigbatch: distributed large-batch training and what batch size does to training."""

__version__ = "0.1.0"
