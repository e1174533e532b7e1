"""Forward+backward throughput of model.py against transformers' Llama on
the same config and weights.

    python bench/forward_backward.py --shape smollm2-135m --batch 4 --seq 256
Prints tokens/s for both and the ratio (ours / reference). A benchmark, not a test.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import build  # noqa: E402
from model import ModelConfig  # noqa: E402

SHAPES = {  # Hugging Face config.json fields; weights are random
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048,
                           num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                           tie_word_embeddings=False),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                      num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "small": dict(model_type="llama", vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                  num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=688, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
}


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step(run, idx):
    logits = run(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx.flatten()).backward()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    import transformers
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SHAPES[args.shape]
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg),
                                                        attn_implementation="sdpa")
    ours = build(ModelConfig.from_hf(cfg),
                 {k: v.detach().clone() for k, v in ref.state_dict().items()}, torch.float32, "cpu")
    ours.train(), ref.train()
    runs = {"ours (model.py)": ours, "transformers": lambda idx: ref(idx).logits}
    idx = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq))
    times = {name: [] for name in runs}
    for i in range(args.steps + 2):  # interleaved, so both see the same machine state
        for name, run in runs.items():
            t = time.perf_counter()
            step(run, idx)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
            (ours if name.startswith("ours") else ref).zero_grad(set_to_none=True)
    tokens = args.batch * args.seq
    rate = {name: tokens / (sorted(ts)[len(ts) // 2]) for name, ts in times.items()}  # median step
    print(f"shape {args.shape}, batch {args.batch} x {args.seq} tokens, fp32 CPU, {args.threads} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'implementation':<18}{'tokens/s':>12}")
    for name, r in rate.items():
        print(f"{name:<18}{r:>12.1f}")
    ours_rate, ref_rate = rate.values()
    print(f"ratio ours / transformers: {ours_rate / ref_rate:.2f}x")


if __name__ == "__main__":
    main()
