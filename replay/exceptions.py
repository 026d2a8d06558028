"""Errors of the replay package; each carries a one-line message the CLI prints as is."""

from chainwatch.exceptions import ChainwatchError


class ReplayError(ChainwatchError):
    """A replay or archive cannot run (missing file, unknown source, bad flag)."""


class RowError(ValueError):
    """One input row is invalid; the message is the one-line reason shown to the user."""
