"""The command line: mistakes users can fix end in one error line, never a traceback.

Each case runs `python -m chainwatch.cli` in a subprocess. The processes start together
(each but the first pays ~3 s of imports) and every test checks the outcome of one of them.
"""

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@dataclass
class Outcome:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("chainwatch: error:")]


def cases(state_dir: Path) -> dict[str, list[str]]:
    return {
        "unknown flag": ["run", "--no-such-flag"],
        "wrong scheme": ["run", "--rpc", "ftp://x", "--metrics-port", "0",
                         "--state-dir", str(state_dir)],
        "unreachable node": ["run", "--rpc", f"http://127.0.0.1:{closed_port()}/SECRETKEY",
                             "--metrics-port", "0", "--state-dir", str(state_dir)],
        "collect without kafka": ["collect", "--rpc", "http://127.0.0.1:8545"],
        "unreachable kafka": ["detect", "--kafka", f"127.0.0.1:{closed_port()}",
                              "--metrics-port", "0"],
        "bad nodes file": ["run", "--nodes", str(state_dir / "missing.yaml")],
        "bad env value": ["run", "--rpc", "http://127.0.0.1:1"],  # with a bad env var below
        # output paths (relative to the fixture's directory, where `afile` is a file)
        "replay out is a file": ["replay", "records.jsonl", "--out", "afile"],
        "train out under a file": ["train", "--input", "records.jsonl", "--out", "afile/models"],
        "archive out is a file": ["archive", "--kafka", f"127.0.0.1:{closed_port()}",
                                  "--out", "afile"],
        "evaluate out is a directory": ["evaluate", "--from-recording", ".", "--out", "."],
        # BUSY_PORT: a port the fixture listens on meanwhile
        "replay metrics port in use": ["replay", "records.jsonl", "--metrics-port", "BUSY_PORT"],
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    tmp = tmp_path_factory.mktemp("cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAINWATCH_")}
    env["XDG_STATE_HOME"] = str(tmp / "xdg")
    special = {"bad env value": {"CHAINWATCH_METRICS_PORT": "not-a-port"}}
    (tmp / "afile").write_text("a file, not a directory\n")
    (tmp / "records.jsonl").write_text("")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    procs = {
        name: (args, subprocess.Popen(
            [sys.executable, "-m", "chainwatch.cli",
             *(port if a == "BUSY_PORT" else a for a in args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env, **special.get(name, {})}, cwd=tmp,
        ))
        for name, args in cases(tmp / "state").items()
    }
    done: dict[str, Outcome] = {}
    try:
        for name, (args, proc) in procs.items():
            out, err = proc.communicate(timeout=60)
            done[name] = Outcome(args, proc.returncode, out, err)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        busy.close()
    return done


NAMES = list(cases(Path("/unused")))


@pytest.mark.parametrize("name", NAMES)
def test_user_error_exits_non_zero_with_exactly_one_error_line(outcomes, name):
    o = outcomes[name]
    assert o.returncode != 0, o
    assert len(o.error_lines()) == 1, o.stderr
    assert "Traceback" not in o.stderr, o.stderr


def test_unknown_flag_names_the_flag(outcomes):
    o = outcomes["unknown flag"]
    assert o.returncode == 2
    assert "--no-such-flag" in o.error_lines()[0]


def test_wrong_scheme_says_which_schemes_work(outcomes):
    line = outcomes["wrong scheme"].error_lines()[0]
    assert "http://" in line and "ftp://" in line


def test_unreachable_node_error_hides_the_url_secret(outcomes):
    o = outcomes["unreachable node"]
    line = o.error_lines()[0]
    assert "did not answer" in line
    assert "127.0.0.1" in line
    # neither the error line nor any log line nor stdout shows the key in the URL path
    assert "SECRETKEY" not in o.stderr
    assert "SECRETKEY" not in o.stdout


def test_collect_without_kafka_asks_for_kafka(outcomes):
    assert "--kafka" in outcomes["collect without kafka"].error_lines()[0]



def test_unreachable_kafka_names_the_servers(outcomes):
    [line] = outcomes["unreachable kafka"].error_lines()
    assert "cannot reach Kafka at 127.0.0.1:" in line


def test_bad_env_value_names_the_variable(outcomes):
    [line] = outcomes["bad env value"].error_lines()
    assert "CHAINWATCH_METRICS_PORT" in line


@pytest.mark.parametrize("name", ["replay out is a file", "train out under a file",
                                  "archive out is a file"])
def test_an_output_directory_that_cannot_be_one_is_named_before_any_work(outcomes, name):
    line = outcomes[name].error_lines()[0]
    assert "--out afile" in line and "directory" in line, line


def test_evaluate_wants_a_report_file_not_a_directory(outcomes):
    assert "is a directory" in outcomes["evaluate out is a directory"].error_lines()[0]


def test_a_metrics_port_in_use_is_named(outcomes):
    line = outcomes["replay metrics port in use"].error_lines()[0]
    assert "cannot serve metrics" in line and "Address already in use" in line, line


@pytest.mark.parametrize("args", [["version"], ["replay", "no-such-source"]])
def test_the_process_leaves_its_objects_to_its_end_instead_of_collecting_them(args):
    """Once the command is done (well or with a user error), the objects are frozen: the
    interpreter's exit then skips the cyclic collector's walk over every library's
    objects (~0.6 s after a replay)."""
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
             f"sys.argv = ['chainwatch', *{args!r}]\n"
             "from chainwatch.cli import main\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    frozen = [line for line in done.stdout.splitlines() if line.startswith("frozen")]
    assert frozen and int(frozen[0].split()[1]) > 1_000, (done.stdout, done.stderr)
