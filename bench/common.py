"""What the benchmarks share: Llama shapes, ours and transformers' model on the same weights, the
command line, timing that alternates the sides call by call, markdown tables."""
import argparse
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import build, device_name, resolve_dtype  # noqa: E402
from model import ModelConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if DEVICE == "cuda" else lambda: None  # CUDA runs asynchronously


KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rope_theta")
SHAPES = {name: dict(zip(KEYS, v), model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=t)
          for name, (*v, t) in {  # Hugging Face config.json fields; weights are random
              "smollm2-135m": (49152, 576, 30, 9, 3, 1536, 8192, 1e5, True),
              "tinyllama-1.1b": (32000, 2048, 22, 32, 4, 5632, 2048, 1e4, False),
              "llama2-7b": (32000, 4096, 32, 32, 32, 11008, 4096, 1e4, False),
              "small": (8192, 256, 4, 8, 2, 688, 2048, 1e4, False)}.items()}


def parse(doc: str, options: dict, argv: list[str] | None = None) -> argparse.Namespace:
    """--shape, --dtype (default: train.py's rule), --rounds and `options`, {name: default}."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    for name, default in {"rounds": 5, **options}.items():
        how = (dict(action="store_true") if default is False else  # a list: comma-separated ints
               dict(type=lambda s: [int(x) for x in s.split(",")]) if isinstance(default, list)
               else dict(type=type(default)))
        p.add_argument(f"--{name.replace('_', '-')}", default=default, **how)
    args = p.parse_args(argv)
    args.dtype = resolve_dtype(args.dtype, DEVICE)
    return args


def models(shape: str, dtype: torch.dtype):
    """Ours (model.py) and transformers' Llama on the same random weights, sharing their tensors."""
    import transformers
    torch.manual_seed(0)
    cfg = SHAPES[shape]
    with torch.device(DEVICE):  # drawn where they run: a 7B shape is slow to draw on a CPU
        ref = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**cfg), attn_implementation="sdpa", dtype=dtype)
    return build(ModelConfig.from_hf(cfg), dict(ref.state_dict()), dtype, DEVICE), ref


def alternate(sides: dict, rounds: int, steps: int = 1) -> tuple[dict[str, list[float]], str]:
    """Seconds per round of each side's calls fn(0) .. fn(steps - 1), and the 1-minute load average
    before → after. The sides take turns call by call: shifting load falls on all alike."""
    for fn in sides.values():
        fn(0)
    before = os.getloadavg()[0]
    times = {name: [0.0] * rounds for name in sides}
    for r in range(rounds):
        for step in range(steps):
            for name in list(sides)[::-1 if r % 2 else 1]:  # who goes first alternates
                sync()
                t = time.perf_counter()
                sides[name](step)
                sync()
                times[name][r] += time.perf_counter() - t
    return times, f"{before:.1f}→{os.getloadavg()[0]:.1f}"


def spread(xs, fmt: str = ".2f") -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs):{fmt}} ({xs[0]:{fmt}}–{xs[-1]:{fmt}})"


def speeds(times: dict[str, list[float]], work: float) -> list[str]:
    """Cells: each side's work / s at its median round, then ours / theirs per round."""
    ours, theirs = times.values()
    return ([f"{work / statistics.median(t):.1f}" for t in times.values()]
            + [spread(t / o for o, t in zip(ours, theirs))])


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def machine(*packages: str) -> str:
    return ", ".join([device_name(DEVICE), *(f"{p} {version(p)}" for p in packages)])


def report(args: argparse.Namespace, header: list[str], rows) -> str:
    return f"{machine('torch', 'transformers')}; {vars(args)}\n\n{table(header, rows(args))}"
