"""The package version, read by pyproject.toml (``[tool.setuptools.dynamic]``) and
``sparse_prefill.__version__``: its one home."""

__version__ = "0.1.0"
