"""The trainer's user-facing error: one line, no traceback at the command line."""

from __future__ import annotations


class TrainError(ValueError):
    """A problem with the user's input (a path, a data line, an option, a model); the message
    names it in one line. The CLI prints it and exits with status 2."""
