"""Output directories checked before the work that fills them starts.

A replay, a training run or an archive can take an hour; finding only at the end that
`--out` names a file or a place that cannot be written would waste it, and the error
would come as a traceback. They are checked at the start, with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path

from chainwatch.exceptions import ConfigError


def output_directory(path: Path, flag: str = "--out") -> Path:
    """`path`, created with its parents if missing; a ConfigError naming the flag and the
    reason when it is not a directory this process can write to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{flag} {path}: exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: this user cannot write to it")
    return path


def written(path: Path, exc: OSError) -> ConfigError:
    """The one-line error for a failed write under an output directory (a full disk)."""
    return ConfigError(f"cannot write {exc.filename or path}: {exc.strerror or exc}")
