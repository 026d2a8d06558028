"""Peer snapshots from net_peerCount and admin_peers. Domain code: no I/O.

Peer ids never leave this module in the clear: records carry sha256 prefixes, and
client names are folded into a short fixed list so they can be metric labels.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import PeerSnapshot
from collector.mappers import hex_to_int

KNOWN_CLIENTS: dict[str, str] = {
    name.lower(): name
    for name in (
        "Geth", "Nethermind", "Erigon", "Besu", "Reth", "Nimbus", "OpenEthereum", "Parity",
        "EthereumJS", "Bor", "Ethrex",
    )
}
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def hash_peer_id(peer_id: str) -> str:
    return hashlib.sha256(peer_id.encode()).hexdigest()[:16]


def parse_client(name: object) -> tuple[str, str]:
    """'Geth/v1.17.10-stable/linux-amd64/go1.26.8' -> ('Geth', 'v1.17.10')."""
    if not isinstance(name, str) or not name.strip():
        return "unknown", "unknown"
    parts = name.strip().split("/")
    client = KNOWN_CLIENTS.get(parts[0].strip().lower(), "other")
    version = "unknown"
    for part in parts[1:]:
        match = _VERSION.match(part.strip())
        if match:
            major, minor, patch = match.groups()
            version = f"v{major}.{minor}" + (f".{patch}" if patch is not None else "")
            break
    return client, version


class PeerTracker:
    """Turns successive polls into snapshots with the connects/disconnects between them."""

    def __init__(self, chain_id: int, node: str) -> None:
        self.chain_id = chain_id
        self.node = node
        self._previous: set[str] | None = None  # hashed ids at the last detailed poll
        self.connects_total = 0
        self.disconnects_total = 0

    def observe(self, peer_count_raw: Any, admin_peers_raw: Any | None, now: float) -> PeerSnapshot:
        peer_count = hex_to_int(peer_count_raw, "net_peerCount")
        fields: dict[str, Any] = {"detailed": False}
        if admin_peers_raw is not None:
            fields = self._detailed(admin_peers_raw)
        return PeerSnapshot(
            chain_id=self.chain_id,
            node=self.node,
            event_id=PeerSnapshot.id_for(self.chain_id, self.node, now),
            observed_at=now,
            peer_count=peer_count,
            **fields,
        )

    def _detailed(self, peers: Any) -> dict[str, Any]:
        if not isinstance(peers, list):
            raise MalformedRpcPayload("admin_peers: expected a list")
        current: set[str] = set()
        inbound = outbound = 0
        clients: dict[str, int] = {}
        versions: dict[str, int] = {}
        for peer in peers:
            if not isinstance(peer, Mapping):
                raise MalformedRpcPayload("admin_peers: expected peer objects")
            peer_id = peer.get("id") or peer.get("enode")
            if not isinstance(peer_id, str) or not peer_id:
                raise MalformedRpcPayload("admin_peers: peer without id")
            current.add(hash_peer_id(peer_id))
            network = peer.get("network")
            is_inbound = isinstance(network, Mapping) and network.get("inbound") is True
            inbound += is_inbound
            outbound += not is_inbound
            client, version = parse_client(peer.get("name"))
            clients[client] = clients.get(client, 0) + 1
            key = f"{client}/{version}"
            versions[key] = versions.get(key, 0) + 1
        previous = self._previous if self._previous is not None else set()
        connected = sorted(current - previous)
        disconnected = sorted(previous - current)
        self._previous = current
        self.connects_total += len(connected)
        self.disconnects_total += len(disconnected)
        return {
            "detailed": True,
            "inbound": inbound,
            "outbound": outbound,
            "clients": clients,
            "client_versions": versions,
            "connected": tuple(connected),
            "disconnected": tuple(disconnected),
        }
