#!/usr/bin/env bash
# Stop the local cluster's daemons by their pids (slurmd, slurmctld, then munged) and wait until they are gone.
#   usage: slurm/local-cluster/down.sh [STATE_DIR]   (default /tmp/pretrain-slurm)
set -uo pipefail
state=${1:-/tmp/pretrain-slurm}
pids=()
for f in "$state/slurmd.pid" "$state/slurmctld.pid" /run/munge/munged.pid; do
  [ -s "$f" ] && pids+=("$(cat "$f")")
done
# munged may have been started before its pid file location was known.
pids+=($(pgrep -x munged || true) $(pgrep -x slurmd || true) $(pgrep -x slurmctld || true))
[ ${#pids[@]} -eq 0 ] && exit 0
kill "${pids[@]}" 2>/dev/null
for _ in $(seq 1 30); do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive -eq 0 ] && exit 0
  sleep 0.5
done
kill -9 "${pids[@]}" 2>/dev/null
exit 0
