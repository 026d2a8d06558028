"""Errors of the replay package; each carries a one-line message the CLI prints as is."""

import polars as pl

from chainwatch.exceptions import ChainwatchError

# what reading a damaged Parquet file raises: polars' errors, the OS's, and a panic of its
# reader (a BaseException, which `except Exception` would let through)
UNREADABLE: tuple[type[BaseException], ...] = (
    pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An error's message as one line (polars' span several), cut at `limit` characters."""
    return " ".join(str(exc).split())[:limit]


class ReplayError(ChainwatchError):
    """A replay or archive cannot run (missing file, unknown source, bad flag)."""


class RowError(ValueError):
    """One input row is invalid; the message is the one-line reason shown to the user."""
