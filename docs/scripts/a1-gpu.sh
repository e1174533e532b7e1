#!/usr/bin/env bash
# Setting A' rows (a1.sh) on one lent GPU, each row its own process, all at once: a 135M model
# leaves the GPU mostly idle in one process. Rows already started are not started again, so a
# second call waits on the first's. At the deadline, or when every row is scored, each row's run
# (without its resumable training state) is packed into OUTDIR/ROW.tgz.
# Usage, from the repository root: bash docs/scripts/a1-gpu.sh SECONDS OUTDIR row ...
set -uo pipefail
deadline=$(( $(date +%s) + $1 )); out=$2; shift 2
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
mkdir -p runs/logs
for r in "$@"; do
  [ -e "runs/logs/$r.log" ] && continue
  setsid bash docs/scripts/a1.sh "$r" > "runs/logs/$r.log" 2>&1 < /dev/null &
done
while [ "$(date +%s)" -lt "$deadline" ]; do
  done=0
  for r in "$@"; do [ -f "runs/a1-$r/eval.json" ] && done=$((done + 1)); done
  gpu=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)
  echo "$(date +%T) scored $done of $#; $gpu"
  [ "$done" -eq $# ] && break
  sleep 20
done
for r in "$@"; do
  tail -c 600 "runs/logs/$r.log" | tr '\r' '\n' | tail -n 4 | sed "s/^/$r | /"
  tar czf "$out/$r.tgz" --exclude='state.pt' "runs/logs/$r.log" \
    $(ls -d "runs/a1-$r" 2>/dev/null)
done
ls -la "$out"
