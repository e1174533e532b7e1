"""The GPU campaign in one command: every benchmark in order, one markdown
table each, written to --out.

    python bench/all.py --out docs/GPU.md            # a CUDA machine: about 20 minutes on an H100 (planned)
    python bench/all.py --quick --out /tmp/all.md    # every part at tiny shapes, on any device: a few minutes

Parts: (1) the CUDA test tier (pytest -m cuda; skipped tests on a machine without a GPU); (2)
LoRA training tokens/s and peak memory, ours against transformers + PEFT, with and without
activation checkpointing, at the SmolLM2-135M, TinyLlama-1.1B and Llama-2-7B shapes (random
weights, a micro-batch per shape), and MFU against this device's measured matmul rate; (3)
routing latency over M = 1, 2, 5, 10 experts, plain / sequential / parallel, Eq. 8 beside; (4)
generation tokens/s against transformers. The dtype is train.py's rule
(checkpoint.resolve_dtype): bf16 on a GPU. A part that fails is reported in its section and the
campaign goes on; the file is rewritten after every part.
"""
import argparse
import datetime
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import generation  # noqa: E402
import routing  # noqa: E402
import train_speed  # noqa: E402
from checkpoint import atomic_write, resolve_dtype  # noqa: E402
from forward_backward import SHAPES, timed  # noqa: E402

# (shape, micro-batch) for training, and the routing and generation settings; the
# micro-batches are guesses that fit an 80 GB GPU at the benchmark's lengths (prompts up to
# 400 tokens, responses up to 60)
PLANS = {
    "full": dict(train=[("smollm2-135m", 16), ("tinyllama-1.1b", 8), ("llama2-7b", 4)], steps=5,
                 matmul=8192,
                 routing=dict(shape="smollm2-135m", experts=[1, 2, 5, 10], input=512, output=64,
                              repeats=2),
                 generation=dict(shape="smollm2-135m", batches=[1, 4, 16], input=256, output=64,
                                 repeats=3)),
    "quick": dict(train=[("small", 2)], steps=2, matmul=1024,
                  routing=dict(shape="small", experts=[1, 2], input=32, output=8, repeats=1),
                  generation=dict(shape="small", batches=[1, 4], input=32, output=8, repeats=1)),
}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def test_tier() -> str:
    """The device-parametrised tests' cuda cases: counts per outcome, and the failures by name."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEs", "-p",
                          "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    counts = dict((k, int(n)) for n,
                  k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                  out.stdout.splitlines()[-1]))
    rows = [[k, n] for k, n in counts.items()] + [["seconds", f"{time.perf_counter() - t:.0f}"]]
    lines = out.stdout.splitlines()
    skipped = sorted({line.split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")})
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return (table(["outcome", "tests"], rows)
            + "".join(f"\n\nskipped: {reason}" for reason in skipped)
            + "".join(f"\n\n    {line}" for line in failed))


def body_parameters(cfg: dict) -> int:
    """Weights of the transformer blocks (no embeddings, no output head), from a config.json."""
    d, head = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    attention = 2 * d * d + 2 * d * cfg["num_key_value_heads"] * head
    return cfg["num_hidden_layers"] * (attention + 3 * d * cfg["intermediate_size"])


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of one n x n x n matmul in dtype: the device's attainable peak, measured."""
    a, b = torch.randn(n, n, device=device,
                       dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, 5)


def training(plan: dict, device: str, dtype: torch.dtype) -> str:
    """tokens/s, peak memory and MFU of ours and transformers + PEFT, each
    with and without checkpointing.

    MFU counts 4 N FLOPs per token, N the blocks' weights: the forward pass (2 N) and the gradient
    with respect to the activations (2 N); the frozen weights get no gradient of their own.
    Attention scores, the output head and checkpointing's recomputation are left out, as usual.
    """
    peak = matmul_rate(device, dtype, plan["matmul"])
    rows = []
    for shape, micro in plan["train"]:
        flops = 4 * body_parameters(SHAPES[shape])
        for checkpointed in (False, True):
            for name, r in train_speed.run(shape, micro, plan["steps"], 1,
                                           str(dtype).removeprefix("torch."), checkpointed).items():
                rows.append([shape, micro, name, "yes" if checkpointed else "no",
                             f"{r['tokens_per_s']:.0f}", f"{r['peak_mib']:.0f}",
                             f"{100 * r['tokens_per_s'] * flops / peak:.1f}"])
    note = (f"\n\nMFU against the measured {plan['matmul']}^3 matmul rate, {peak / 1e12:.2f} "
            f"TFLOP/s in {dtype}; "
            "peak memory: CUDA max allocated, CPU peak resident set of the worker process.")
    return table(["shape", "micro-batch", "implementation", "checkpointing", "tokens/s", "peak MiB",
                  "MFU %"], rows) + note


def routing_latency(plan: dict, device: str, dtype: torch.dtype) -> str:
    p = plan["routing"]
    rows = []
    for m in p["experts"]:
        r = routing.measure(p["shape"], m, p["input"], p["output"], p["repeats"], device, dtype)
        rows.append([m, f"{1e3 * r['plain']:.1f}", f"{1e3 * r['ttft']:.1f}",
                     f"{1e3 * r['tpot']:.2f}", f"{1e3 * r['sequential']:.1f}",
                     f"{100 * (r['sequential'] / r['plain'] - 1):.1f}",
                     f"{100 * r['eq8']:.1f}", f"{100 * r['appendix']:.1f}",
                     f"{1e3 * r['parallel']:.1f}", f"{100 * (r['parallel'] / r['plain'] - 1):.1f}"])
    return (f"Shape {p['shape']}, input {p['input']}, output {p['output']} tokens, batch 1, median "
            f"of {p['repeats']} " "(see bench/routing.py)\n\n" +
            table(["M", "plain ms", "TTFT ms", "TPOT ms", "sequential ms", "seq. +%", "Eq. 8 +%",
                   "App. E +%", "parallel ms", "par. +%"], rows))


def generation_speed(plan: dict, device: str, dtype: torch.dtype) -> str:
    p = plan["generation"]
    rows = [[r["batch"], f"{r['ours']:.1f}", f"{r['transformers']:.1f}",
             f"{r['ours'] / r['transformers']:.2f}"]
            for r in generation.measure(p["shape"], p["batches"], p["input"], p["output"],
                                        p["repeats"], device, dtype)]
    return (f"Shape {p['shape']}, prompts {p['input'] // 2}-{p['input']} tokens, {p['output']} "
            f"new, greedy, median of {p['repeats']}\n\n"
            + table(["batch", "ours tok/s", "transformers tok/s", "ratio"], rows))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-all.md", help="markdown file for the tables")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes: checks that every part runs, on any device")
    args = p.parse_args()
    import peft
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(None, device)
    plan = PLANS["quick" if args.quick else "full"]
    cpu = getattr(torch.cpu, "get_capabilities", dict)().get("cpu_name", platform.machine())
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{cpu} CPU"
    doc = [f"# bench/all.py{' --quick' * args.quick}\n\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
           f"{machine}, {torch.get_num_threads()} threads, {dtype}, torch {torch.__version__}, "
           f"transformers {transformers.__version__}, peft {peft.__version__}"]
    parts = [("CUDA test tier (pytest -m cuda)", test_tier),
             ("Training: ours against transformers + PEFT", lambda: training(plan, device, dtype)),
             ("Routing latency", lambda: routing_latency(plan, device, dtype)),
             ("Generation", lambda: generation_speed(plan, device, dtype))]
    for title, part in parts:
        print(f"== {title}", flush=True)
        t = time.perf_counter()
        try:
            body = part()
        # the campaign goes on: one broken part must not cost the others' GPU time
        except Exception as e:
            body = f"failed: {type(e).__name__}: {e}"
        section = f"## {title}\n\n{body}\n\n({time.perf_counter() - t:.0f} s)"
        print(section + "\n", flush=True)
        doc.append(section)
        atomic_write(Path(args.out), lambda f: f.write_text("\n\n".join(doc) + "\n"))
    print(f"tables written to {args.out}")


if __name__ == "__main__":
    main()
