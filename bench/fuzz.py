"""Long fuzz run: the tests/property targets with many more examples each.

    .venv/bin/python -m bench.fuzz                      # 20000 inputs per target
    .venv/bin/python -m bench.fuzz --examples 2000 --only schema.decode,nodes.load_nodes

Prints per target "N inputs tried, C crashes" (and how many were rejected with the typed
error versus accepted), the time taken, and the first crashes with the shrunk input.
Exits 1 if any target crashed. The fast suite (pytest tests/property) runs the same
strategies and checks with a few hundred examples each.
"""

from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, Phase, given, settings

from tests.property.targets import Crash, Target, all_targets


def fuzz(target: Target, examples: int, seed: int | None) -> tuple[float, str | None]:
    """Run one target; returns (seconds, the shrunk failing input or None)."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # a long run must not replay or store examples of the test suite
        derandomize=seed is not None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def run(value: object) -> None:
        target.run(value)

    started = time.monotonic()
    try:
        run()
    except Crash as exc:
        return time.monotonic() - started, str(exc)[:500]
    return time.monotonic() - started, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="inputs per target")
    parser.add_argument("--only", default="", help="comma-separated target names")
    parser.add_argument("--seed", type=int, default=None, help="derandomize (repeatable run)")
    args = parser.parse_args(argv)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    targets = [t for t in all_targets() if not wanted or t.name in wanted]
    if wanted - {t.name for t in targets}:
        parser.error(f"unknown target(s): {', '.join(sorted(wanted - {t.name for t in targets}))}")
    failed = 0
    total = 0
    for target in targets:
        seconds, crash = fuzz(target, args.examples, args.seed)
        total += target.tried
        print(f"{target.figures()} in {seconds:.1f} s", flush=True)
        if crash:
            failed += 1
            print(f"  first crash (shrunk): {crash}", flush=True)
    print(f"total: {total} inputs tried, {failed} target(s) with crashes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
