"""The errors lengthwise raises on purpose. A `UserError` is bad input the caller can fix: the CLI prints its one
line and exits 2. Any other exception is a defect and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: an option, a file, a model or a combination lengthwise refuses; the message says what is accepted."""


class UnsupportedModelError(UserError):
    """A model (or one of its layers) that a method cannot serve; the message names the feature."""
