"""Rungate: a governance control plane for AI agent runs.

Importing the package has no side effects; `rungate.cli:main` is the entry point.
"""

__version__ = "0.1.0"
