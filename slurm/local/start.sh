#!/usr/bin/env bash
# Start a 2-node emulated Slurm cluster on this machine (one slurmctld, two slurmd on 127.0.0.1).
#   slurm/local/start.sh [DIR]      (default DIR: $MEGALM_SLURM_DIR or /tmp/megalm-slurm-$UID)
# Idempotent: a cluster already running from DIR is reused. Prints the SLURM_CONF to export.
# Ports: $MEGALM_SLURM_PORT (default 16817) for slurmctld, the next three for slurmd.
set -euo pipefail
DIR="$(realpath -m "${1:-${MEGALM_SLURM_DIR:-/tmp/megalm-slurm-$(id -u)}}")"
PORT="${MEGALM_SLURM_PORT:-16817}"
for tool in slurmctld slurmd munged sinfo; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; install Slurm with slurm/local/install.sh (apt-get install slurm-wlm munge)" >&2; exit 2; }
done
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
mkdir -p "$DIR/state"
CONF="$DIR/slurm.conf"
HOST="$(hostname)"
cat > "$CONF.tmp.$$" <<CONF
ClusterName=megalm-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=1 State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 3)) CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF.tmp.$$" "$CONF"  # a name of its own: two starts at once must not share one temp file
export SLURM_CONF="$CONF"
if [ ! -s /etc/munge/munge.key ]; then
    echo "error: /etc/munge/munge.key missing; run slurm/local/install.sh" >&2; exit 2
fi
# munged is the machine's auth daemon: start it when none answers, never stop it.
if ! munge -n </dev/null >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    munged --force
fi
alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
for node in node1 node2; do
    alive "$DIR/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
done
for _ in $(seq 1 300); do  # up to 30 s; ready in ~3 s here
    if [ "$(sinfo -h -o '%T %D' 2>/dev/null | awk '$1 ~ /^(idle|mixed|allocated)/ {n += $2} END {print n+0}')" -ge 2 ]; then
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 0.1
done
echo "error: the local Slurm cluster in $DIR did not come up; see $DIR/slurmctld.log and $DIR/slurmd-*.log" >&2
sinfo >&2 || true
exit 1
