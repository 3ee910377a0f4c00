#!/usr/bin/env bash
# Stop the local cluster's daemons by the pids up.sh recorded (slurmd, slurmctld, and munged if up.sh started it)
# and wait until they are gone.
#   usage: slurm/local-cluster/down.sh [STATE_DIR]   (default /tmp/pretrain-slurm)
set -uo pipefail
state=${1:-/tmp/pretrain-slurm}
pids=()
for f in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munged.pid"; do
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    pids+=("$(cat "$f")")
  fi
done
rm -f "$state/munged.pid"
[ ${#pids[@]} -eq 0 ] && exit 0
kill "${pids[@]}" 2>/dev/null
for _ in $(seq 1 60); do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive -eq 0 ] && exit 0
  sleep 0.5
done
echo "local-cluster: ${pids[*]} still alive after 30 s: killing" >&2
kill -9 "${pids[@]}" 2>/dev/null
exit 0
