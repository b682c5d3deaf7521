"""Example third-party UNMERGE plugin (decomposer ``bic-nnls``)."""

__version__ = "0.2.0"
