"""The package version (one place: ``ptune.__version__``, saved adapters, exports, ``ptune --version``)."""

__version__ = "0.1.0"
