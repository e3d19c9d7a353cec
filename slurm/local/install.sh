#!/usr/bin/env bash
# Install Slurm and munge from the distribution (Debian/Ubuntu) for the local test cluster.
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y slurm-wlm munge || { apt-get update && apt-get install -y slurm-wlm munge; }
fi
# munge authenticates every Slurm message; it needs a key (the package usually creates one).
if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
fi
echo "slurm: $(slurmctld -V)"
