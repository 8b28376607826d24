"""The errors and warnings of moekit's files: a damaged file, and what moekit did on the user's behalf."""

from __future__ import annotations


class IntegrityError(ValueError):
    """A file or folder moekit reads is corrupt, truncated, incomplete or not what it claims to be."""


class MoekitWarning(UserWarning):
    """Something moekit did on the user's behalf that they should know of (a checkpoint skipped, a
    setting applied on resume); the command line prints it as one line."""
