"""gif: make a trained classifier forget part of its training data with Generalized Influence Functions."""

__version__ = "0.1.0"
