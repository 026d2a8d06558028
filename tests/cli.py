"""The chainwatch CLI as tests start it in a child process."""

from __future__ import annotations

import sys

# `python -m chainwatch.cli` that writes every thread's stack to stderr on SIGUSR1, so a
# test can show where a process that does not end, or does nothing, is waiting.
_WITH_STACK_DUMPS = (
    "import faulthandler, runpy, signal, sys; "
    "faulthandler.register(signal.SIGUSR1, all_threads=True); "
    "sys.argv[0] = 'chainwatch'; runpy.run_module('chainwatch.cli', run_name='__main__')"
)


def cli_with_stack_dumps(*args: str) -> list[str]:
    """The command line running `chainwatch ARGS` able to dump its stacks on SIGUSR1."""
    return [sys.executable, "-c", _WITH_STACK_DUMPS, *args]
