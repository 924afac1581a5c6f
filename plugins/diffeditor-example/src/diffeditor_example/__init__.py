"""An example third-party task plugin for diffeditor (see README.md beside pyproject.toml)."""

__version__ = "0.1.0"
