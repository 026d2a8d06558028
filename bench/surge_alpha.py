"""miner_surge_rule's alpha: false episodes on normal producer mixes vs takeover latency.

    python -m bench.surge_alpha [--blocks 20000] [--alphas 1e-6,2e-6,5e-6,1e-5]
    python -m bench.surge_alpha --alphas 1e-6 --newcomer-alphas 1e-6,1e-5,2e-5

Normal traffic: producers drawn independently per block from fixed mixes (20 builders
with Zipf 1.2 weights as bench/synthetic.py draws them, 50 with Zipf 1.0, 5 and 20 equal
shares). The rule runs as MinerFamily runs it (a 100-block window, episodes held through
8-block pauses); every episode started is a false finding. Each alpha runs with each
newcomer alpha (the limit for a producer absent from the blocks before the window; "="
is the alpha itself, the rule before it had its own). Takeovers: the chance the
rule computes for a producer absent from the last 100 blocks that makes k of the next
n, i.e. the alpha needed to flag it by then. ~3 min for 20,000 blocks. Figures only.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import deque

from detector.families import Episodes, FamilyConfig
from detector.rules import beta_binomial_tail, miner_surge_rule

WINDOW = 100


def _zipf(n: int, s: float) -> list[float]:
    weights = [1 / (i + 1) ** s for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


MIXES = {
    "20 builders, Zipf 1.2": _zipf(20, 1.2),
    "50 producers, Zipf 1.0": _zipf(50, 1.0),
    "5 equal": [0.2] * 5,
    "20 equal": [0.05] * 20,
}


def false_episodes(producers: list[str], alpha: float, newcomer_alpha: float) -> int:
    config = FamilyConfig()
    episodes = Episodes(hold=config.miner_episode_hold)
    window: deque[str] = deque(maxlen=WINDOW)
    started = 0
    for height, producer in enumerate(producers):
        window.append(producer)
        hits = miner_surge_rule(list(window), chain_id=1, node="n", head=height,
                                windows=config.surge_windows, alpha=alpha,
                                newcomer_alpha=newcomer_alpha)
        started += len(episodes.update("rules", {(h.rule, h.subject): str(height)
                                                 for h in hits}))
    return started


def newcomer_chance(k: int, n: int, prior: int = WINDOW) -> float:
    """The rule's chance for a producer unseen in `prior` blocks making k of the next n."""
    return beta_binomial_tail(k, n, 0.5, prior + 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20_000)
    parser.add_argument("--alphas", default="1e-6,2e-6,5e-6,1e-5")
    parser.add_argument("--newcomer-alphas", default=f"=,{FamilyConfig().surge_newcomer_alpha:g}")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    newcomer = args.newcomer_alphas.split(",")
    runs = {f"{a:g}/{n}": (a, a if n == "=" else float(n)) for a in alphas for n in newcomer}
    for name, weights in MIXES.items():
        rng = random.Random(args.seed)
        producers = rng.choices([f"p{i}" for i in range(len(weights))], weights=weights,
                                k=args.blocks)
        row = {name: false_episodes(producers, a, n) for name, (a, n) in runs.items()}
        per_1k = {a: round(1000 * c / args.blocks, 3) for a, c in row.items()}
        print(json.dumps({"mix": name, "blocks": args.blocks, "false_episodes": row,
                          "per_1000_blocks": per_1k}), flush=True)
    for k, n in ((3, 3), (4, 4), (3, 4), (4, 5), (5, 6)):
        print(json.dumps({"takeover": f"newcomer makes {k} of the next {n}",
                          "chance": float(f"{newcomer_chance(k, n):.3g}")}))


if __name__ == "__main__":
    main()
