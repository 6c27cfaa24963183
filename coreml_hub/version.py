"""The package's version, in a module of its own so that every layer can name it (the package
facade sits above them all)."""

__version__ = "0.1.0"
