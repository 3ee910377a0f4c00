#!/usr/bin/env bash
# Remove what up.sh made: its daemons (slurmctld, every slurmd, and munged if up.sh started it) by the pids it
# recorded, every process still in the nodes' namespaces (the steps of a job still running), the namespaces, the
# bridge and veth pairs, the spool directories, pid files and hosts file. The logs in STATE_DIR/log stay.
#   usage: slurm/local-cluster/down.sh [STATE_DIR]   (default /tmp/pretrain-slurm)
set -uo pipefail
state=${1:-/tmp/pretrain-slurm}
namespaces=()
[ -s "$state/netns" ] && mapfile -t namespaces < "$state/netns"

# Stop `pids` with `signal`; those alive after `patience` half-seconds get SIGKILL.
stop() {
  local signal=$1 patience=$2
  shift 2
  [ $# -eq 0 ] && return
  kill "-$signal" "$@" 2>/dev/null
  for _ in $(seq 1 "$patience"); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && return
    sleep 0.5
  done
  echo "local-cluster: $* still alive after $((patience / 2)) s: killing" >&2
  kill -9 "$@" 2>/dev/null
}

daemons=()
for f in "$state"/slurmd-*.pid "$state/slurmctld.pid" "$state/munged.pid"; do
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    daemons+=("$(cat "$f")")
  fi
done
stop TERM 60 "${daemons[@]}"

leftovers=()
for ns in "${namespaces[@]}"; do
  mapfile -t -O ${#leftovers[@]} leftovers < <(ip netns pids "$ns" 2>/dev/null)
done
stop TERM 10 "${leftovers[@]}"
for ns in "${namespaces[@]}"; do
  ip netns del "$ns" 2>/dev/null  # its veth pair goes with it
done
if [ -s "$state/bridge" ]; then
  ip link del "$(cat "$state/bridge")" 2>/dev/null
fi
rm -rf "$state/spool" "$state/slurmd" "$state"/*.pid "$state/netns" "$state/bridge" "$state/hosts"
exit 0
