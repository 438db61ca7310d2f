"""thrifty: faithful, runnable implementations of label- and compute-thrifty deep-learning systems."""

__version__ = "0.1.0"
