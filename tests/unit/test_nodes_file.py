import pytest

from chainwatch.bootstrap import node_configs
from chainwatch.exceptions import ConfigError
from chainwatch.nodes import load_nodes
from chainwatch.settings import load_settings

GOOD = """
nodes:
  - name: geth-1
    rpc: ${TEST_GETH1_RPC}
    ws: ws://127.0.0.1:8546
    expected_block_time: 2
  - name: geth-2
    rpc: http://127.0.0.1:9545
    peers: false
"""


def write(tmp_path, text):
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    return path


def test_nodes_file_reads_every_node_and_expands_secrets_from_the_environment(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TEST_GETH1_RPC", "https://mainnet.example/v3/KEY123")
    nodes = load_nodes(write(tmp_path, GOOD))
    assert [n.name for n in nodes] == ["geth-1", "geth-2"]
    assert nodes[0].rpc.get_secret_value() == "https://mainnet.example/v3/KEY123"
    assert "KEY123" not in repr(nodes[0])
    assert nodes[0].expected_block_time == 2 and nodes[1].expected_block_time == 12
    assert nodes[1].peers is False and nodes[1].mempool is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD, "TEST_GETH1_RPC is not set"),
        ("nodes: [", "not valid YAML"),
        ("nodes: []", "nodes"),
        ("nodes:\n  - name: a\n", "rpc"),
        ("nodes:\n  - name: a\n    rpc: http://x\n    colour: red\n", "colour"),
        ("nodes:\n  - {name: a, rpc: 'http://x'}\n  - {name: a, rpc: 'http://y'}\n",
         "duplicate node name(s) a"),
        ("nodes:\n  - {name: 'bad name', rpc: 'http://x'}\n", "name"),
    ],
)
def test_a_bad_nodes_file_is_one_clear_line(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("TEST_GETH1_RPC", raising=False)
    with pytest.raises(ConfigError) as err:
        load_nodes(write(tmp_path, text))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read nodes file"):
        load_nodes(tmp_path / "nope.yaml")


def test_nodes_file_and_rpc_flag_together_are_refused(tmp_path):
    path = write(tmp_path, "nodes:\n  - {name: a, rpc: 'http://x'}\n")
    with pytest.raises(ConfigError, match="not both"):
        node_configs(load_settings(nodes=path, rpc="http://y"))


def test_a_wrong_url_scheme_in_the_nodes_file_names_the_node(tmp_path):
    path = write(tmp_path, "nodes:\n  - {name: edge-3, rpc: 'ftp://x'}\n")
    with pytest.raises(ConfigError, match="node 'edge-3' must start with http"):
        node_configs(load_settings(nodes=path))
