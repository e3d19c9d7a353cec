#!/usr/bin/env bash
# Stop the local cluster started by slurm/local/start.sh [DIR]: only the daemons in DIR's pid files.
set -uo pipefail
DIR="$(realpath -m "${1:-${MEGALM_SLURM_DIR:-/tmp/megalm-slurm-$(id -u)}}")"
pids=()
for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && pids+=("$(cat "$f")")
done
[ ${#pids[@]} -eq 0 ] && exit 0
kill "${pids[@]}" 2>/dev/null
for _ in $(seq 1 100); do
    still=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && still=1; done
    [ $still -eq 0 ] && exit 0
    sleep 0.1
done
kill -9 "${pids[@]}" 2>/dev/null
exit 0
