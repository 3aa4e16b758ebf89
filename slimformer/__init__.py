"""slimformer: make a pretrained transformer small and fast for one task, with measured numbers."""

__version__ = "0.1.0"
