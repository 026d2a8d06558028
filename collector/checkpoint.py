"""Checkpoints: the tracker's window, written atomically after the bus acknowledged."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from chainwatch.exceptions import ConfigError


class FileCheckpointStore:
    """One JSON file per (chain, node) in a state directory, named `<prefix>-<chain>-<node>`
    (`checkpoint` for the block collector, `mempool` for the mempool tracker)."""

    def __init__(self, directory: Path, prefix: str = "checkpoint") -> None:
        self.directory = directory
        self.prefix = prefix

    def path(self, chain_id: int, node: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node)
        return self.directory / f"{self.prefix}-{chain_id}-{safe}.json"

    def read(self, chain_id: int, node: str) -> dict[str, Any] | None:
        """The file's JSON object, None when there is no file; ConfigError when it is
        unreadable or not an object."""
        path = self.path(chain_id, node)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"checkpoint {path} is unreadable: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"checkpoint {path} is not a chainwatch checkpoint")
        return data

    def load(self, chain_id: int, node: str) -> dict[str, Any] | None:
        """A block collector checkpoint (with `refs`), None when there is none."""
        data = self.read(chain_id, node)
        if data is not None and not isinstance(data.get("refs"), list):
            raise ConfigError(f"checkpoint {self.path(chain_id, node)} "
                              "is not a chainwatch checkpoint")
        return data

    def save(self, chain_id: int, node: str, data: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state dir {self.directory}: {exc}") from None
        path = self.path(chain_id, node)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".ckpt-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
