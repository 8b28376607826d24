"""The ``moekit`` command line."""

from moekit.apps.cli.main import main

__all__ = ["main"]
