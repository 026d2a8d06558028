"""Settings: every CLI option can also come from a CHAINWATCH_* environment variable.

Precedence: command-line flag, then environment, then the default here. Secrets
(RPC URLs, SASL password) are SecretStr: they print as '**********'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from chainwatch.exceptions import ConfigError


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "chainwatch"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHAINWATCH_", extra="ignore")

    # the node(s): --nodes FILE, or one node from --rpc/--ws/--node
    nodes: Path | None = None
    expected_block_time: float = Field(default=12.0, gt=0)
    rpc: SecretStr | None = None
    ws: SecretStr | None = None
    node: str = Field(default="node", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    poll_interval: float = Field(default=2.0, gt=0)
    rpc_timeout: float = Field(default=10.0, gt=0)
    start_block: int | None = Field(default=None, ge=0)
    window: int = Field(default=64, ge=2)
    max_reorg_depth: int = Field(default=128, ge=1)
    state_dir: Path = Field(default_factory=default_state_dir)
    mempool: bool = True  # follow pending transactions (single node; per node in --nodes)
    mempool_poll_interval: float = Field(default=2.0, gt=0)
    mempool_snapshot_interval: float = Field(default=10.0, gt=0)
    mempool_reconcile_interval: float = Field(default=30.0, gt=0)
    mempool_drop_grace: float = Field(default=30.0, ge=0)  # gone from the pool this long
    # records waiting for the bus; past it new ones are dropped and counted
    mempool_max_outbox: int = Field(default=100_000, ge=1)
    # tracked pending txs saved to the state dir at most this often (and at shutdown)
    mempool_save_interval: float = Field(default=30.0, gt=0)
    peers: bool = True  # poll the peer set (single node; per node in --nodes)
    peer_interval: float = Field(default=15.0, gt=0)

    # the bus
    kafka: str | None = None
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_partitions: int = Field(default=6, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    topic_prefix: str = Field(default="chainwatch", pattern=r"^[A-Za-z0-9._-]+$")
    group: str = "chainwatch-detector"

    # the detector
    models: Path | None = None  # directory written by `chainwatch train`
    model_kind: Literal["iforest", "hbos", "ecod", "copod", "sk_iforest"] = "iforest"
    warmup_blocks: int = Field(default=200, ge=10)
    refit_every_blocks: int = Field(default=1000, ge=10)
    contamination: float = Field(default=0.001, gt=0, lt=0.5)
    reorg_warning_depth: int = Field(default=2, ge=1)
    reorg_critical_depth: int = Field(default=6, ge=1)
    lag_start_blocks: int = Field(default=3, ge=1)
    lag_clear_blocks: int = Field(default=1, ge=0)
    stall_factor: float = Field(default=3.0, gt=0)
    status_interval: float = Field(default=5.0, gt=0)

    # per-finding alerts
    alertmanager: str | None = None  # Alertmanager base URL, e.g. http://alertmanager:9093
    alertmanager_severity: Literal["info", "warning", "critical"] = "warning"
    alertmanager_ttl: float = Field(default=3600.0, gt=0)  # endsAt = observed_at + ttl

    # the process
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool | None = None


def load_settings(**overrides: object) -> Settings:
    """Settings from flags (non-None overrides), environment and defaults; one-line errors."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        flag = "--" + field.replace("_", "-")
        raise ConfigError(
            f"invalid value for {flag} (or CHAINWATCH_{field.upper()}): {first['msg']}"
        ) from None
