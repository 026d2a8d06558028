"""Prints the fuzz figures ("N inputs tried, 0 crashes") at the end of the run."""

from __future__ import annotations

import pytest

from tests.property.test_fuzz import TARGETS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tried = [t for t in TARGETS.values() if t.tried]
    if not tried:
        return
    terminalreporter.section("fuzz figures")
    for target in tried:
        terminalreporter.write_line(target.figures())
