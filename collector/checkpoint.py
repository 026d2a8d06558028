"""Checkpoints: the tracker's window, written atomically after the bus acknowledged."""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from chainwatch.exceptions import ConfigError


def file_stem(prefix: str, chain_id: int, node: str) -> str:
    """`<prefix>-<chain>-<node>` with the node name made safe for a file name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node)
    return f"{prefix}-{chain_id}-{safe}"


class FileCheckpointStore:
    """One JSON file per (chain, node) in a state directory, named `<prefix>-<chain>-<node>`
    (`checkpoint` for the block collector, `mempool` for the mempool tracker)."""

    def __init__(self, directory: Path, prefix: str = "checkpoint") -> None:
        self.directory = directory
        self.prefix = prefix

    def path(self, chain_id: int, node: str) -> Path:
        return self.directory / f"{file_stem(self.prefix, chain_id, node)}.json"

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


class JournalStore:
    """Append-only JSON-lines files beside a state file: what the bus acknowledged after
    the state's last save. One file per generation, `<prefix>-<chain>-<node>.journal.<n>`:
    a save starts a new generation and names it in the state, and deletes the older ones
    once written, so a restart reads exactly what came after the state it restores.

    Lines are appended without fsync: a killed process leaves them in the page cache
    (a machine crash can lose the last ones, as it can lose unsynced broker writes).
    """

    def __init__(self, directory: Path, prefix: str = "mempool") -> None:
        self.directory = directory
        self.prefix = prefix

    def _stem(self, chain_id: int, node: str) -> str:
        return f"{file_stem(self.prefix, chain_id, node)}.journal."

    def generations(self, chain_id: int, node: str) -> list[tuple[int, Path]]:
        """The journal files there are, oldest generation first."""
        stem = self._stem(chain_id, node)
        found = []
        try:
            paths = list(self.directory.glob(glob.escape(stem) + "*"))
        except OSError:
            return []
        for path in paths:
            suffix = path.name[len(stem):]
            if suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def append(self, chain_id: int, node: str, generation: int, lines: list[bytes]) -> None:
        """Append one line per payload (each a JSON document without newlines)."""
        if not lines:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self._stem(chain_id, node)}{generation}"
        with path.open("ab") as f:
            f.write(b"".join(line + b"\n" for line in lines))

    def read(self, chain_id: int, node: str, first_generation: int) -> list[bytes]:
        """The lines of every generation from `first_generation` on, in order. A last
        line cut short by a kill is returned as it is (the caller's parser skips it)."""
        lines: list[bytes] = []
        for generation, path in self.generations(chain_id, node):
            if generation >= first_generation:
                try:
                    lines.extend(line for line in path.read_bytes().split(b"\n") if line)
                except OSError as exc:
                    raise ConfigError(f"journal {path.name} is unreadable: {exc}") from None
        return lines

    def drop_before(self, chain_id: int, node: str, generation: int) -> None:
        """Delete the generations older than `generation` (a state covering them is saved)."""
        for older, path in self.generations(chain_id, node):
            if older < generation:
                path.unlink(missing_ok=True)
