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


def _expand(value: object, where: str) -> object:
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    return value


def load_nodes(path: Path) -> list[NodeConfig]:
    """Parse and validate a nodes file; every problem is one ConfigError line."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read nodes file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"nodes file {path} is not valid YAML{where}") from None
    try:
        parsed = NodesFile.model_validate(_expand(raw, str(path)))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(f"nodes file {path}: {loc}: {first['msg']}") from None
    names = [n.name for n in parsed.nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"nodes file {path}: duplicate node name(s) {', '.join(dupes)}")
    return parsed.nodes
