#!/usr/bin/env bash
# Exit 0 when the local cluster of slurm/local/start.sh [DIR] is running.
DIR="$(realpath -m "${1:-${MEGALM_SLURM_DIR:-/tmp/megalm-slurm-$(id -u)}}")"
[ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null
