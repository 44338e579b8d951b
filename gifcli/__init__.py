"""gif: make a trained classifier forget training data with Generalized Influence Functions."""

__version__ = "0.1.0"
