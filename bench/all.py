"""The GPU campaign in one command: the CUDA test tier, then train_speed.py, routing.py and
generation.py; a markdown table per part to --out, rewritten after each (see bench/README.md).

    python bench/all.py --out docs/GPU.md            # a CUDA machine
    python bench/all.py --quick --out /tmp/all.md    # every part at tiny shapes, on any device
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import common
import generation
import routing
import train_speed
from checkpoint import atomic_write

TRAIN = [("smollm2-135m", 16), ("tinyllama-1.1b", 8), ("llama2-7b", 4)]  # guessed to fit 80 GB
PLANS = {"full": [(train_speed, [f"--shape {s} --micro-batch {b} --mfu 8192{c}" for s, b in TRAIN
                                 for c in ("", " --grad-checkpoint")]),
                  (routing, ["--experts 1,2,5,10 --input 512 --output 64"]),
                  (generation, ["--batch 1,4,16 --input 256 --output 64"])],
         "quick": [(train_speed, [f"--shape small --micro-batch 2 --steps 1{c}"
                                  for c in ("", " --grad-checkpoint")]),
                   (routing, ["--shape small --experts 1,2 --input 32 --output 8"]),
                   (generation, ["--shape small --batch 1,4 --input 32 --output 8"])]}


def test_tier() -> str:
    """pytest -m cuda's failures, reasons for skipping and summary line."""
    lines = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEs", "-p",
                            "no:cacheprovider"], cwd=Path(__file__).resolve().parent.parent,
                           capture_output=True, text=True).stdout.splitlines() or [""]
    return "\n".join("    " + line for line in lines
                     if line.startswith(("FAILED", "ERROR", "SKIPPED")) or line == lines[-1])


def section(module, argvs: list[str]) -> str:
    """One table of the rows of `bench/<module>.py ARGV` for each ARGV; a failure is noted."""
    rows, notes = [], []
    for argv in argvs:
        notes.append(f"`bench/{module.__name__}.py {argv}`")
        try:
            rows += module.rows(common.parse(module.__doc__, module.OPTIONS, argv.split()))
        except Exception as e:  # one failure must not cost the other measurements' GPU time
            notes[-1] += f" failed: {type(e).__name__}: {e}"
    return "\\\n".join(notes) + "\n\n" + common.table(module.HEADER, rows)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-all.md", help="markdown file for the tables")
    p.add_argument("--quick", action="store_true", help="tiny shapes: every part runs, anywhere")
    args = p.parse_args()
    doc = [f"# bench/all.py{' --quick' * args.quick}\n\n{time.strftime('%Y-%m-%d %H:%M')}, "
           + common.machine("torch", "transformers", "peft")]
    for title, part in [("pytest -m cuda", test_tier)] + [
            (f"bench/{m.__name__}.py", lambda m=m, a=a: section(m, a))
            for m, a in PLANS["quick" if args.quick else "full"]]:
        t = time.perf_counter()
        doc.append(f"## {title}\n\n{part()}\n\n({time.perf_counter() - t:.0f} s)")
        print(doc[-1] + "\n", flush=True)
        atomic_write(Path(args.out), lambda f: f.write_text("\n\n".join(doc) + "\n"))


if __name__ == "__main__":
    main()
