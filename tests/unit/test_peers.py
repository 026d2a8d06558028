"""Peer snapshots: hashed ids, client labels, connects and disconnects."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import PeerSnapshot
from collector.peers import PeerTracker, hash_peer_id, parse_client


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Geth/v1.17.10-stable/linux-amd64/go1.26.8", ("Geth", "v1.17.10")),
        ("Geth/myname/v1.13.0-stable-abc/linux-amd64/go1.21", ("Geth", "v1.13.0")),
        ("Nethermind/v1.25.4+1234/linux-x64/dotnet8", ("Nethermind", "v1.25.4")),
        ("erigon/v2.60.0-dev/linux-amd64/go1.22", ("Erigon", "v2.60.0")),
        ("reth/v1.0.0-abc/x86_64-unknown-linux-gnu", ("Reth", "v1.0.0")),
        ("besu/v24.1.0/linux-x86_64/openjdk-java-21", ("Besu", "v24.1.0")),
        ("SomeNewClient/v0.1", ("other", "v0.1")),
        ("", ("unknown", "unknown")),
        (None, ("unknown", "unknown")),
        ("Geth", ("Geth", "unknown")),
    ],
)
def test_client_names_fold_into_a_short_list(name, expected):
    assert parse_client(name) == expected


def peer(peer_id: str, inbound: bool, name: str = "Geth/v1.17.10-stable/linux-amd64/go1.26"):
    return {"id": peer_id, "name": name, "network": {"inbound": inbound}}


def test_snapshots_count_directions_clients_and_churn_with_hashed_ids():
    tracker = PeerTracker(1, "n")
    first = tracker.observe("0x2", [peer("p1", False), peer("p2", True, "Nethermind/v1.2.3")],
                            now=1.0)
    assert (first.peer_count, first.inbound, first.outbound) == (2, 1, 1)
    assert first.clients == {"Geth": 1, "Nethermind": 1}
    assert first.client_versions == {"Geth/v1.17.10": 1, "Nethermind/v1.2.3": 1}
    assert set(first.connected) == {hash_peer_id("p1"), hash_peer_id("p2")}
    assert "p1" not in first.model_dump_json().replace(hash_peer_id("p1"), "")

    counts_only = tracker.observe(1, None, now=2.0)
    assert not counts_only.detailed and counts_only.connected == ()

    later = tracker.observe("0x2", [peer("p1", False), peer("p3", False)], now=3.0)
    assert later.connected == (hash_peer_id("p3"),)
    assert later.disconnected == (hash_peer_id("p2"),)  # diffed against the last detailed
    assert (tracker.connects_total, tracker.disconnects_total) == (3, 1)


@pytest.mark.parametrize("bad", [{}, [1], [{"name": "x"}], "peers"])
def test_malformed_admin_peers_is_a_typed_error(bad):
    with pytest.raises(MalformedRpcPayload):
        PeerTracker(1, "n").observe("0x1", bad, now=1.0)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.text(max_size=6)),
       st.one_of(st.none(), st.lists(st.dictionaries(
           st.sampled_from(["id", "name", "network", "enode"]),
           st.one_of(st.none(), st.text(max_size=10), st.integers(), st.booleans(),
                     st.dictionaries(st.just("inbound"), st.booleans())),
           max_size=4), max_size=4)))
def test_peer_tracker_only_ever_raises_malformed_payload(count, peers):
    try:
        snapshot = PeerTracker(1, "n").observe(count, peers, now=1.0)
    except MalformedRpcPayload as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(snapshot, PeerSnapshot)
