#!/usr/bin/env bash
# Issue 28 item 2: zero-shot MMLU (paper Fig. 4), 10 questions per subject (570), for SmolLM2 and
# for the runs of docs/scripts/a1.sh. MMLU: hendrycks/test's test/*_test.csv (MIT) in $SEE_MMLU_DIR.
# Usage, from the repository root: SEE_MMLU_DIR=... bash docs/scripts/mmlu.sh [base]
set -euo pipefail
if [ "${1:-}" = base ]; then
  python general.py --per-subject 10   # the base model alone
else
  python general.py --per-subject 10 --run runs/a1-see --run runs/a1-mtl --run runs/a1-nr \
                    --run runs/a1-randsel --run runs/a1-see-adapter --run runs/a1-see-general20
fi
