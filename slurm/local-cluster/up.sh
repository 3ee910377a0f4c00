#!/usr/bin/env bash
# Start a real Slurm cluster of N nodes on this machine for tests and CI: Debian's slurm-wlm and munge, run as root
# without systemd. Every node is a slurmd in a network and UTS namespace of its own (pretrain-nodeI): host name
# nodeI, address 10.77.0.(I+1) on eth0, a veth pair into the bridge pretrain-br0, whose address 10.77.0.1 is
# slurmctld's (in this machine's own namespace). The namespaces have no route beyond that bridge. Inside each, a
# hosts file of the cluster is bind-mounted over /etc/hosts (only there: this machine's stays as it is), so every
# node name resolves on every node, as on a real cluster (the ranks meet at the first node by its name; gloo binds
# the address its host name resolves to). One munged serves all nodes (its socket is a file) and so does one
# slurmctld. The nodes share this machine's cores and memory: each claims all of them.
# Idempotent: a cluster of N nodes already up is reused. Prints the environment to source (SLURM_CONF).
#   usage: slurm/local-cluster/up.sh [--nodes N] [STATE_DIR]   (default 1 node, /tmp/pretrain-slurm)
set -euo pipefail
nodes=1
state=/tmp/pretrain-slurm
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=${2:-}; shift 2 || true ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    -*) echo "local-cluster: unknown option $1; usage: up.sh [--nodes N] [STATE_DIR]" >&2; exit 2 ;;
    *) state=$1; shift ;;
  esac
done
if ! [[ $nodes =~ ^[0-9]+$ ]] || [ "$nodes" -lt 1 ] || [ "$nodes" -gt 200 ]; then
  echo "local-cluster: --nodes '$nodes' is not a node count: pass 1 to 200" >&2
  exit 2
fi
conf="$state/slurm.conf"
bridge=pretrain-br0
subnet=10.77.0
here=$(cd "$(dirname "$0")" && pwd)

missing=()
command -v slurmctld >/dev/null && command -v munged >/dev/null || missing+=(slurm-wlm munge)
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "local-cluster: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The packages' scripts must not start daemons of their own (they would outlive down.sh): policy-rc.d says no.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The nodes that answer, as "name state" lines.
node_states() { SLURM_CONF="$conf" timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null; }
if [ -s "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
  running=$(grep -c '^NodeName=' "$conf" || true)
  if [ "$running" != "$nodes" ]; then
    echo "local-cluster: a cluster of $running node(s) runs from $state: stop it with down.sh first" >&2
    exit 1
  fi
  if [ "$(node_states | grep -cE ' (idle|mixed|allocated)$')" = "$nodes" ]; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
fi
bash "$here/down.sh" "$state"  # whatever a broken earlier start left

if [ -n "$(ip -o -4 addr show to "$subnet.0/24")" ]; then
  echo "local-cluster: $subnet.0/24 is in use on this machine (ip -4 addr): the cluster's bridge needs it" >&2
  exit 1
fi

mkdir -p "$state"/{spool,slurmd,log} /run/munge /etc/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  su -s /bin/sh munge -c /usr/sbin/munged
  cp /run/munge/munged.pid "$state/munged.pid"  # ours to stop in down.sh; a munged found running is left alone
fi

# The network: each name is recorded before it is made, for down.sh.
echo "$bridge" > "$state/bridge"
ip link add "$bridge" type bridge
ip addr add "$subnet.1/24" dev "$bridge"
ip link set "$bridge" up
printf '127.0.0.1 localhost\n%s.1 slurmctld\n' "$subnet" > "$state/hosts"
: > "$state/netns"
for i in $(seq 1 "$nodes"); do
  ns=pretrain-node$i
  echo "$ns" >> "$state/netns"
  ip netns add "$ns"
  ip link add "pretrain-v$i" type veth peer name eth0 netns "$ns"
  ip link set "pretrain-v$i" master "$bridge" up
  ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  echo "$subnet.$((i + 1)) node$i" >> "$state/hosts"
done

cpus=$(nproc)
mem=$(awk '/^MemTotal:/{print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > "$conf" <<CONF
ClusterName=pretrain-local
SlurmctldHost=localhost($subnet.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$state/spool
SlurmdSpoolDir=$state/slurmd/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
MpiDefault=none
KillWait=30
MinJobAge=300
# A job whose BeginTime (a requeue's hold) has passed starts within 2 s, not at the next pass of the main
# scheduler a minute later (the passage of time alone does not wake the backfill scheduler).
SchedulerParameters=sched_interval=2
CONF
for i in $(seq 1 "$nodes"); do
  echo "NodeName=node$i NodeAddr=$subnet.$((i + 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$conf"
done
echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$conf"

slurmctld -f "$conf"
for i in $(seq 1 "$nodes"); do
  # A mount namespace of its own too, for the hosts file (not `ip netns exec`, whose fresh /sys lacks the cgroup
  # file system that slurmd needs).
  mkdir -p "$state/slurmd/node$i"
  nsenter --net="/run/netns/pretrain-node$i" unshare --uts --mount sh -c \
    'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -f "$3"' sh "$state/hosts" "node$i" "$conf"
done
for _ in $(seq 1 60); do
  if [ "$(node_states | grep -cE ' (idle|mixed|allocated)$')" = "$nodes" ]; then
    echo "local-cluster: $nodes node(s) idle ($cpus CPUs, ${mem} MB each, shared)" >&2
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "local-cluster: not every node became idle in 60 s; see $state/log" >&2
exit 1
