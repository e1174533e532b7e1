"""Batched greedy generation, as evaluation runs it: ours (model.generate, KV cache) against
transformers' generate, on the same randomly initialised model and prompts.

    python bench/generation.py --shape smollm2-135m --batch 1,4,16 --input 256 --output 64

Prompts have lengths from input/2 to input (left-padded in one batch); no EOS, so every row makes
`output` tokens. Prints generated tokens/s per batch size and the ratio. A benchmark, not a test.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import build, resolve_dtype  # noqa: E402
from forward_backward import SHAPES, timed  # noqa: E402
from model import ModelConfig, generate  # noqa: E402


def measure(shape: str, batches: list[int], n_input: int, n_output: int, repeats: int, device: str,
            dtype: torch.dtype) -> list[dict]:
    """Generated tokens/s of ours and of transformers, one row per batch size."""
    import transformers
    torch.manual_seed(0)
    cfg = SHAPES[shape]
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg),
                                                            attn_implementation="sdpa", dtype=dtype)
    ours = build(ModelConfig.from_hf(cfg),
                 {k: v.detach().clone() for k, v in ref.state_dict().items()}, dtype, device)
    ref.eval()
    g = torch.Generator().manual_seed(0)

    def hf_generate(prompts):
        P = max(map(len, prompts))
        ids = torch.tensor([[0] * (P - len(q)) + q for q in prompts], device=device)
        mask = torch.tensor([[0] * (P - len(q)) + [1] * len(q) for q in prompts], device=device)
        with torch.no_grad():
            ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_output,
                         min_new_tokens=n_output,
                         do_sample=False, pad_token_id=0, eos_token_id=None)

    rows = []
    for b in batches:
        prompts = [torch.randint(1, cfg["vocab_size"],
                                 (int(torch.randint(n_input // 2, n_input + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(b)]
        t_ours = timed(lambda: generate(ours, prompts, n_output, []), repeats)
        t_hf = timed(lambda: hf_generate(prompts), repeats)
        rows.append(dict(batch=b, ours=b * n_output / t_ours, transformers=b * n_output / t_hf))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--input", type=int, default=256, help="longest prompt")
    p.add_argument("--output", type=int, default=64, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: evaluate.py's rule")
    args = p.parse_args()
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    print(f"shape {args.shape}, {device} {dtype}, prompts {args.input // 2}-{args.input} tokens, "
          f"{args.output} new, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>5}{'ours tok/s':>12}{'hf tok/s':>10}{'ratio':>7}")
    for r in measure(args.shape, list(map(int, args.batch.split(","))), args.input, args.output,
                     args.repeats, device, dtype):
        print(f"{r['batch']:>5}{r['ours']:>12.1f}{r['transformers']:>10.1f}{r['ours'] / r['transformers']:>7.2f}")


if __name__ == "__main__":
    main()
