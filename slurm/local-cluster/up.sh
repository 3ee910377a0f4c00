#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine for tests and CI: Debian's slurm-wlm and munge, run as root
# without systemd. Idempotent: a cluster already up is reused. Prints the environment to source (SLURM_CONF).
# This machine is one node: several tasks run on it, several nodes cannot be simulated here.
#   usage: slurm/local-cluster/up.sh [STATE_DIR]   (default /tmp/pretrain-slurm)
set -euo pipefail
state=${1:-/tmp/pretrain-slurm}
conf="$state/slurm.conf"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "local-cluster: installing slurm-wlm and munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The packages' scripts must not start daemons of their own (they would outlive down.sh): policy-rc.d says no.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if [ -f "$conf" ] && SLURM_CONF="$conf" timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "export SLURM_CONF=$conf"
  exit 0
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

cpus=$(nproc)
mem=$(awk '/^MemTotal:/{print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > "$conf" <<CONF
ClusterName=pretrain-local
SlurmctldHost=localhost
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
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
MpiDefault=none
KillWait=30
MinJobAge=300
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

slurmctld -f "$conf"
slurmd -f "$conf" -N localhost
for _ in $(seq 1 60); do
  if SLURM_CONF="$conf" sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'; then
    echo "local-cluster: node idle ($cpus CPUs, ${mem} MB)" >&2
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "local-cluster: the node did not become idle in 60 s; see $state/log" >&2
exit 1
