"""nethook: look inside any PyTorch network and change it."""

__version__ = "0.1.0"
