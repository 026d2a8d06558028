"""Write (or, with --check, verify) the rendered rule files.

    python -m alerts.render           # regenerate after editing alerts/config.yaml
    python -m alerts.render --check   # exit 1 if a committed file is out of date (CI)
"""

from __future__ import annotations

import sys
from pathlib import Path

from alerts.mixin import load_config, render

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = (
    ROOT / "alerts" / "chainwatch.rules.yaml",
    ROOT / "helm" / "chainwatch" / "files" / "rules" / "chainwatch.rules.yaml",
)


def main(argv: list[str]) -> int:
    text = render(load_config())
    stale = [p for p in OUTPUTS if not p.exists() or p.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run python -m alerts.render)")
        return 1 if stale else 0
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
