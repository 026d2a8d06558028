"""The nodes a collector follows: from `--nodes FILE` (YAML) or the single-node flags.

    nodes:
      - name: geth-1
        rpc: ${GETH1_RPC}            # ${VAR} is read from the environment (keep keys there)
        ws: ws://10.0.0.5:8546        # optional: newHeads and pending txs over WebSocket
        expected_block_time: 12       # seconds; a node is stalled after 3x this without a head
        mempool: true                 # follow pending transactions (default true)
        peers: true                   # poll net_peerCount / admin_peers (default true)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from chainwatch.exceptions import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    rpc: SecretStr
    ws: SecretStr | None = None
    expected_block_time: float = Field(default=12.0, gt=0)
    mempool: bool = True
    peers: bool = True


class NodesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: list[NodeConfig] = Field(min_length=1)


def _expand(value: object, where: str, done: dict[int, object] | None = None) -> object:
    """Replace ${VAR} in every string.

    A YAML alias is one shared object: expand it once (``done``, by id) and share the
    result, so that a small file of nested aliases cannot expand into billions of strings
    (found by tests/property; a 458-byte file took 50 s before).
    """
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict | list):
        done = {} if done is None else done
        if id(value) not in done:
            done[id(value)] = (
                {k: _expand(v, where, done) for k, v in value.items()}
                if isinstance(value, dict)
                else [_expand(v, where, done) for v in value]
            )
        return done[id(value)]
    return value


def load_nodes(path: Path) -> list[NodeConfig]:
    """Parse and validate a nodes file; every problem is one ConfigError line."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read nodes file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # found by tests/property: a binary file crashed here
        raise ConfigError(f"nodes file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"nodes file {path} is not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"nodes file {path} is nested too deeply") from None
    try:
        parsed = NodesFile.model_validate(_expand(raw, str(path)))
    except RecursionError:  # a self-referencing alias (&a [*a])
        raise ConfigError(f"nodes file {path} is nested too deeply or refers to itself") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        # one line even when a key holds a newline (found by bench/fuzz.py)
        reason = " ".join(f"{loc[:80]}: {first['msg']}".split())
        raise ConfigError(f"nodes file {path}: {reason}") from None
    names = [n.name for n in parsed.nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"nodes file {path}: duplicate node name(s) {', '.join(dupes)}")
    return parsed.nodes
