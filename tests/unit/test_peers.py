"""Peer snapshots: hashed ids, client labels, connects and disconnects."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainwatch.exceptions import MalformedRpcPayload
from chainwatch.schema import PeerSnapshot
from collector.peers import PeerTracker, hash_peer_id, parse_client

GETH = "Geth/v1.17.10-stable-abc/linux-amd64/go1.26.8"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (GETH, ("Geth", "v1.17.10")),
        ("Geth/myname/v1.13.0-stable/linux-amd64/go1.21", ("Geth", "v1.13.0")),
        ("Nethermind/v1.25.4+1234abcd/linux-x64/dotnet8.0.1", ("Nethermind", "v1.25.4")),
        ("erigon/v2.60.0/linux-amd64/go1.22.4", ("Erigon", "v2.60.0")),
        ("reth/v1.0.0-1e5e8a9/x86_64-unknown-linux-gnu", ("Reth", "v1.0.0")),
        ("besu/v24.1.0/linux-x86_64/openjdk-java-21", ("Besu", "v24.1.0")),
        ("nimbus-eth1/v0.1.0-abc/linux-amd64/Nim-2.0.4", ("other", "v0.1.0")),
        ("GETH/1.13.5/linux", ("Geth", "v1.13.5")),  # no leading v, any casing
        ("Geth/v01.002.0003", ("Geth", "v1.2.3")),
        ("Geth/v2.60", ("Geth", "v2.60")),
        ("SomeNewClient/v0.1", ("other", "v0.1")),
        ("Geth", ("Geth", "unknown")),
        ("Geth/custom/linux-amd64/go1.21", ("Geth", "unknown")),  # go1.21 is not it
        ("Geth/v1234567.1.1", ("Geth", "unknown")),  # not a version a label can hold
        ("", ("unknown", "unknown")),
        ("   ", ("unknown", "unknown")),
        ("\x00\x01/v1.0.0", ("unknown", "unknown")),
        ("/v1.0.0", ("unknown", "unknown")),
        (None, ("unknown", "unknown")),
        (42, ("unknown", "unknown")),
    ],
)
def test_client_names_fold_into_a_short_list(name, expected):
    assert parse_client(name) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_client_name_gives_a_label_from_the_fixed_list(name):
    client, version = parse_client(name)
    assert client in {"Geth", "Nethermind", "Erigon", "Besu", "Reth", "Nimbus", "OpenEthereum",
                      "Parity", "EthereumJS", "Bor", "Ethrex", "other", "unknown"}
    assert version == "unknown" or (version.startswith("v") and len(version) <= 21)


def test_peer_ids_are_hashed_to_sixteen_stable_hex_chars():
    assert hash_peer_id("abc") == hash_peer_id("abc") != hash_peer_id("abd")
    assert len(hash_peer_id("abc")) == 16 and int(hash_peer_id("abc"), 16) >= 0


def peer(peer_id: str, inbound: bool | None = False, name: str = GETH) -> dict:
    network = {"localAddress": "127.0.0.1:30303", "remoteAddress": "127.0.0.1:40404",
               "static": False, "trusted": False}
    if inbound is not None:
        network["inbound"] = inbound
    return {"id": peer_id, "enode": f"enode://{peer_id}@127.0.0.1:30303", "name": name,
            "caps": ["eth/68"], "network": network, "protocols": {}}


def test_a_detailed_snapshot_counts_directions_and_clients_with_hashed_ids():
    tracker = PeerTracker(1, "n")
    snap = tracker.observe("0x3", [peer("p1"), peer("p2", True, "Nethermind/v1.2.3"),
                                   peer("p3")], now=1.0)
    assert (snap.peer_count, snap.detailed, snap.inbound, snap.outbound) == (3, True, 1, 2)
    assert snap.clients == {"Geth": 2, "Nethermind": 1}
    assert snap.client_versions == {"Geth/v1.17.10": 2, "Nethermind/v1.2.3": 1}
    assert set(snap.connected) == {hash_peer_id(p) for p in ("p1", "p2", "p3")}
    assert snap.disconnected == ()
    assert (snap.observed_at, snap.event_id) == (1.0, PeerSnapshot.id_for(1, "n", 1.0))
    assert "p1@" not in snap.model_dump_json()


def test_connects_and_disconnects_diff_against_the_last_detailed_snapshot():
    tracker = PeerTracker(1, "n")
    tracker.observe("0x2", [peer("p1"), peer("p2")], now=1.0)
    counts_only = tracker.observe(7, None, now=2.0)
    assert (counts_only.peer_count, counts_only.detailed) == (7, False)
    assert counts_only.inbound is None and counts_only.clients == {}
    assert counts_only.connected == () == counts_only.disconnected
    later = tracker.observe("0x2", [peer("p1"), peer("p3")], now=3.0)
    assert later.connected == (hash_peer_id("p3"),)
    assert later.disconnected == (hash_peer_id("p2"),)  # p2 left during the counts-only poll
    same = tracker.observe("0x2", [peer("p3"), peer("p1")], now=4.0)
    assert same.connected == () == same.disconnected
    assert (tracker.connects_total, tracker.disconnects_total) == (3, 1)


def test_a_peer_listed_twice_counts_once():
    snap = PeerTracker(1, "n").observe("0x1", [peer("p1"), peer("p1")], now=1.0)
    assert (snap.outbound, snap.clients, len(snap.connected)) == (1, {"Geth": 1}, 1)


def test_the_count_is_the_lists_when_a_peer_leaves_between_the_two_calls():
    """net_peerCount said 2, then admin_peers listed 1: the snapshot says 1 peer, as its
    list, directions, clients and disconnect do; counts only, net_peerCount's."""
    tracker = PeerTracker(1, "n")
    tracker.observe("0x2", [peer("p1"), peer("p2")], now=1.0)
    snap = tracker.observe("0x2", [peer("p1")], now=2.0)
    assert (snap.peer_count, snap.outbound, snap.disconnected) == (1, 1, (hash_peer_id("p2"),))
    assert tracker.observe("0x2", None, now=3.0).peer_count == 2


def test_directions_are_unknown_when_a_peer_does_not_say():
    snap = PeerTracker(1, "n").observe("0x2", [peer("p1", True), peer("p2", None)], now=1.0)
    assert snap.inbound is None and snap.outbound is None
    assert snap.clients == {"Geth": 2}


@pytest.mark.parametrize(
    ("count", "peers", "why"),
    [
        ("12", None, "net_peerCount"),
        (-1, None, "net_peerCount"),
        ("0x1", {}, "expected a list"),
        ("0x1", "peers", "expected a list"),
        ("0x1", [1], "peer objects"),
        ("0x1", [{"name": GETH}], "without id"),
        ("0x1", [{"id": ""}], "without id"),
        ("0x1", [{"id": "p", "network": "in"}], "network"),
        ("0x1", [{"id": "p", "network": {"inbound": 1}}], "inbound"),
    ],
)
def test_malformed_replies_are_typed_errors(count, peers, why):
    with pytest.raises(MalformedRpcPayload, match=why):
        PeerTracker(1, "n").observe(count, peers, now=1.0)


def test_a_malformed_poll_changes_nothing():
    tracker = PeerTracker(1, "n")
    tracker.observe("0x1", [peer("p1")], now=1.0)
    with pytest.raises(MalformedRpcPayload):
        tracker.observe("0x2", [peer("p2"), "junk"], now=2.0)
    with pytest.raises(MalformedRpcPayload):
        tracker.observe("bad", [peer("p3")], now=3.0)
    snap = tracker.observe("0x1", [peer("p1")], now=4.0)
    assert snap.connected == () == snap.disconnected
    assert (tracker.connects_total, tracker.disconnects_total) == (1, 0)


PEER_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=10), st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["inbound", "remoteAddress"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))),
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(), st.text(max_size=6),
              st.sampled_from(["0x", "0x0", "0x1f", "0xzz"])),
    st.one_of(st.none(), st.integers(), st.text(max_size=5), st.dictionaries(
        st.text(max_size=3), st.integers(), max_size=2), st.lists(st.one_of(
            st.integers(), st.text(max_size=3),
            st.dictionaries(st.sampled_from(["id", "name", "network", "enode"]), PEER_VALUES,
                            max_size=4)), max_size=5)),
)
def test_observe_gives_a_snapshot_or_malformed_payload_and_nothing_else(count, peers):
    try:
        snapshot = PeerTracker(1, "n").observe(count, peers, now=1.0)
    except MalformedRpcPayload as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(snapshot, PeerSnapshot)
