#!/usr/bin/env bash
# Issue 28, items 1a and 1b: E_1 of order 1 (qa) alone at setting A' (docs/RESULTS.md, "Which of
# the paper's claims held"): plain SEE, --indicator-lr adapter, --general-negatives 20.
# Ran at commits 9b57185 (plain, adapter) and 348e9c0 (general20), on 1-2 CPU threads.
# Usage, from the repository root: bash docs/scripts/e1-probes.sh
set -euo pipefail
A="--sequence qa --tau 0.1 --max-train 200 --epochs 3 --batch-size 8 --lr 1e-3 --max-source 512 --max-target 128"
E="--max-eval 50 --max-new-tokens 128"
python train.py $A --out runs/e1-plain
python evaluate.py --run runs/e1-plain $E
python train.py $A --indicator-lr adapter --out runs/e1-adapter
python evaluate.py --run runs/e1-adapter $E
python train.py $A --general-negatives 20 --out runs/e1-general20
python evaluate.py --run runs/e1-general20 $E
