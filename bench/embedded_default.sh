#!/usr/bin/env bash
# The embedded default as the README's quick start runs it (`llmpy train`, plus any flags given
# here: the tuning runs in bench/RESULTS.md), in a scratch directory that is removed after.
# Prints the load average before, the command's wall time (start-up included), then the run's
# summary line: wall time, final train loss and
# the val loss over the whole val split.
#   bash bench/embedded_default.sh [--lr 3e-3 --steps 400 ...]
set -euo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) | flags: ${*:-(none)}"
t0=$(date +%s.%N)
(cd "$dir" && llmpy train "$@" > train.log)
echo "command wall time: $(echo "$(date +%s.%N) - $t0" | bc) s"
grep -E "^done: " "$dir/train.log"
sed -n '/^--- sample at step/,/^---$/p' "$dir/train.log" | head -12
