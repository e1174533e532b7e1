#!/usr/bin/env bash
# Issue 28 item 2: zero-shot MMLU (paper Fig. 4), 10 questions per subject (570), for SmolLM2 and
# for the runs of docs/scripts/a1.sh. MMLU (MIT): test/<subject>_test.csv in $SEE_MMLU_DIR, as
# hendrycks/test ships them or as the Hub's cais/mmlu export (a header line, answers 0-3).
# Usage, from the repository root: SEE_MMLU_DIR=... bash docs/scripts/mmlu.sh [base]
set -euo pipefail
M="--per-subject 10 --dtype float32"  # fp32 as in a1.sh
if [ "${1:-}" = base ]; then
  python general.py $M   # the base model alone
else
  python general.py $M --run runs/a1-see --run runs/a1-mtl --run runs/a1-nr --run runs/a1-randsel \
                    --run runs/a1-kmeans --run runs/a1-see-adapter --run runs/a1-see-general20
fi
