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
from chainwatch.schema import INT64_MAX, PeerSnapshot
from collector.mappers import hex_to_int

KNOWN_CLIENTS: dict[str, str] = {
    name.lower(): name
    for name in (
        "Geth", "Nethermind", "Erigon", "Besu", "Reth", "Nimbus", "OpenEthereum", "Parity",
        "EthereumJS", "Bor", "Ethrex",
    )
}
# bounded digits: a peer chooses its own name, and a version must not be arbitrary text
_VERSION = re.compile(r"v?(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?(?!\d)")
_CLIENT_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def hash_peer_id(peer_id: str) -> str:
    """A stable stand-in for a peer id (sha256, 16 hex chars): enough to diff peer sets."""
    # surrogatepass: a JSON "\ud800" in an id crashed here (found by tests/property)
    return hashlib.sha256(peer_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def parse_client(name: object) -> tuple[str, str]:
    """'Geth/v1.17.10-stable/linux-amd64/go1.26.8' -> ('Geth', 'v1.17.10').

    The client is one of KNOWN_CLIENTS, "other", or "unknown" (empty or garbage); the
    version is the first segment after the client that starts with one (a custom
    identity may come first), as v<major>.<minor>[.<patch>], else "unknown".
    """
    if not isinstance(name, str):
        return "unknown", "unknown"
    parts = name.strip().split("/")
    if not _CLIENT_TOKEN.fullmatch(parts[0].strip()):
        return "unknown", "unknown"
    client = KNOWN_CLIENTS.get(parts[0].strip().lower(), "other")
    for part in parts[1:]:
        match = _VERSION.match(part.strip())
        if match:
            numbers = [str(int(n)) for n in match.groups() if n is not None]
            return client, "v" + ".".join(numbers)
    return client, "unknown"


class PeerTracker:
    """Turns successive polls into snapshots with the connects/disconnects between them."""

    def __init__(self, chain_id: int, node: str) -> None:
        self.chain_id = chain_id
        self.node = node
        self._previous: set[str] | None = None  # hashed ids at the last detailed poll
        self.connects_total = 0
        self.disconnects_total = 0

    def observe(self, peer_count_raw: Any, admin_peers_raw: Any | None, now: float) -> PeerSnapshot:
        """One poll: net_peerCount, and admin_peers when the node allows it (else None).

        With admin_peers the count is the list's: the two calls are not one instant, and
        a peer that left between them gave a snapshot of 2 peers that listed 1 and its
        disconnect (CI, 2026-12-01). Malformed input raises before any state changes, so
        the next poll diffs against the last good detailed one.
        """
        peer_count = hex_to_int(peer_count_raw, "net_peerCount")
        if peer_count > INT64_MAX:  # found by tests/property: invalid in the record
            raise MalformedRpcPayload(f"net_peerCount: {peer_count} is not a peer count")
        fields: dict[str, Any] = {"detailed": False}
        if admin_peers_raw is not None:
            current, fields = self._detailed(admin_peers_raw)
            previous = self._previous if self._previous is not None else set()
            connected, disconnected = sorted(current - previous), sorted(previous - current)
            fields |= {"connected": tuple(connected), "disconnected": tuple(disconnected)}
            self._previous = current
            peer_count = len(current)
            self.connects_total += len(connected)
            self.disconnects_total += len(disconnected)
        return PeerSnapshot(
            chain_id=self.chain_id,
            node=self.node,
            event_id=PeerSnapshot.id_for(self.chain_id, self.node, now),
            observed_at=now,
            peer_count=peer_count,
            **fields,
        )

    @staticmethod
    def _detailed(peers: Any) -> tuple[set[str], dict[str, Any]]:
        """geth's admin_peers list -> (hashed ids, per-peer snapshot fields).

        inbound/outbound are None when a peer does not say its direction (non-geth
        shapes): a guess would show up as a wrong split in the metrics.
        """
        if not isinstance(peers, list):
            raise MalformedRpcPayload("admin_peers: expected a list")
        seen: dict[str, Mapping[str, Any]] = {}
        for peer in peers:
            if not isinstance(peer, Mapping):
                raise MalformedRpcPayload("admin_peers: expected peer objects")
            peer_id = peer.get("id") or peer.get("enode")
            if not isinstance(peer_id, str) or not peer_id:
                raise MalformedRpcPayload("admin_peers: peer without id")
            network = peer.get("network", {})
            if not isinstance(network, Mapping):
                raise MalformedRpcPayload("admin_peers: peer network is not an object")
            inbound = network.get("inbound")
            if inbound is not None and not isinstance(inbound, bool):
                raise MalformedRpcPayload("admin_peers: peer network.inbound is not a bool")
            seen[hash_peer_id(peer_id)] = peer  # a peer listed twice counts once
        directions = [p.get("network", {}).get("inbound") for p in seen.values()]
        known = None not in directions
        clients: dict[str, int] = {}
        versions: dict[str, int] = {}
        for peer in seen.values():
            client, version = parse_client(peer.get("name"))
            clients[client] = clients.get(client, 0) + 1
            versions[f"{client}/{version}"] = versions.get(f"{client}/{version}", 0) + 1
        return set(seen), {
            "detailed": True,
            "inbound": sum(d is True for d in directions) if known else None,
            "outbound": sum(d is False for d in directions) if known else None,
            "clients": clients,
            "client_versions": versions,
        }
