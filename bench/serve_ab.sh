#!/usr/bin/env bash
# Is a serve slowdown the code or the host? Runs an older commit and the working tree on this
# machine, interleaved: in-process decode steps (bench/decode_step.py), then end to end with one
# client program for both (the older commit's bench_serve.py, so the requests are the same).
#   bench/serve_ab.sh 73a556b [rounds]
set -euo pipefail
ref=${1:?usage: bench/serve_ab.sh GIT_REF [ROUNDS]}; rounds=${2:-2}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$here/.venv/bin/python
old=$(mktemp -d)/old
mkdir -p "$here/bench/results"
git -C "$here" worktree add -q --detach "$old" "$ref"
trap 'git -C "$here" worktree remove --force "$old"' EXIT
grep "model name" /proc/cpuinfo | head -1
for i in $(seq "$rounds"); do
  for side in "$old" "$here"; do
    echo "== $([ "$side" = "$here" ] && echo working-tree || echo "$ref") round $i, load $(cut -d' ' -f1 /proc/loadavg)"
    "$py" "$here/bench/decode_step.py" "$side"
    out=$here/bench/results/serve_ab_$(basename "$side")_$i  # .json, and Ray's log lines
    (cd "$side" && PYTHONPATH=$side "$py" "$old/bench/bench_serve.py" --clients 1 16 --rounds 1 \
        --json "$out.json" 2> "$out.log" | grep -E "^ +(1|16) \|")
  done
done
