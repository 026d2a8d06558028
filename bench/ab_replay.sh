#!/usr/bin/env bash
# Alternate `chainwatch replay` runs of an older commit and of the working tree, so that
# a VM whose speed drifts compares like with like (docs/performance.md, "Replay").
#
#   bench/ab_replay.sh OLD_REV [RUNS] [REPLAY ARGS...]
#
# Default replay args: the bench's mainnet day with trained models (make the archives
# and models first: docs/performance.md). Each side runs from its own tree's directory:
# `python -m` puts the working directory ahead of PYTHONPATH.
set -euo pipefail
old_rev=$1
runs=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
root=$(git rev-parse --show-toplevel)
scratch=$(mktemp -d)
git -C "$root" worktree add -q --detach "$scratch/old" "$old_rev"
trap 'git -C "$root" worktree remove --force "$scratch/old"; rm -rf "$scratch"' EXIT
ln -s "$root/.cache" "$scratch/old/.cache"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(.cache/bench-archive --models .cache/bench-models --to 7200)
fi
run() {  # $1: the tree, $2: where its report goes
  (cd "$1" && PYTHONPATH="$1" "$root/.venv/bin/python" -m chainwatch.cli replay \
     "${args[@]}" --out "$2" --no-progress 2>&1 | grep '^replayed')
}
for i in $(seq "$runs"); do
  echo "old $old_rev: $(run "$scratch/old" "$scratch/out-old")"
  echo "new (working tree): $(run "$root" "$scratch/out-new")"
done
if cmp -s "$scratch/out-old/findings.jsonl" "$scratch/out-new/findings.jsonl"; then
  echo "findings: byte for byte the same"
else
  echo "findings: differ"
fi
