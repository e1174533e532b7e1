#!/usr/bin/env bash
# Setting A' (docs/RESULTS.md): Table 1 at 200 examples per task, order 1, SmolLM2-135M-Instruct,
# fp32 pinned: on a CPU with native bf16 the default would be bf16 and the rows would not compare.
# Each line resumes where it stopped; a finished run is skipped (train) or re-scored (evaluate).
# Usage, from the repository root: bash docs/scripts/a1.sh [method ...]  (default: all rows)
set -euo pipefail
A="--order 1 --max-train 200 --epochs 3 --batch-size 8 --lr 1e-3 --max-source 512 --max-target 128 --dtype float32"
# 200 LIMA queries and 50 of each held-out task (--max-eval alone would cap LIMA at 50 too)
E="--max-eval 50 --max-ood 200 --max-new-tokens 128 --dtype float32"
declare -A FLAGS=(
  [see]="--tau 0.1"                                # SEE(10%)
  [mtl]="--method mtl"                             # MTL
  [nr]="--method non-rehearsal"                    # Non-rehearsal
  [randsel]="--method replay --tau 0.1"            # RandSel(10%)
  [stl]="--method stl"                             # AvgSTL
  [kmeans]="--method kmeans --tau 0.1"             # KMeansSel(10%) (issue 29)
  [ssr]="--method ssr --tau 0.1"                   # SSR, as many replayed as RandSel(10%) (issue 29)
  [moses]="--method moses"                         # MoSEs (issue 29)
  [seta]="--method seta --tau 0.1"                 # SETA (issue 29)
  # SETA with 1 task + 1 shared sub-expert per layer: MoSEs' 2
  [seta-matched]="--method seta --tau 0.1 --experts 1 --top-k 1"
  [see-adapter]="--tau 0.1 --indicator-lr adapter" # issue 28 item 1a
  [see-general20]="--tau 0.1 --general-negatives 20"  # issue 28 item 1b
)
rows=("$@")
[ $# -gt 0 ] || rows=(see mtl nr randsel stl)
for r in "${rows[@]}"; do
  python train.py $A ${FLAGS[$r]} --out runs/a1-$r
  python evaluate.py --run runs/a1-$r $E
done
python evaluate.py --report runs/a1-*/ --out runs/report-a1.md
