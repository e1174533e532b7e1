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
from checkpoint import build  # noqa: E402
from forward_backward import SHAPES, timed  # noqa: E402
from model import ModelConfig, generate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--input", type=int, default=256, help="longest prompt")
    p.add_argument("--output", type=int, default=64, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    args = p.parse_args()
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = SHAPES[args.shape]
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), attn_implementation="sdpa")
    ours = build(ModelConfig.from_hf(cfg), {k: v.detach().clone() for k, v in ref.state_dict().items()}, dtype, device)
    ref = ref.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)

    def hf_generate(prompts):
        P = max(map(len, prompts))
        ids = torch.tensor([[0] * (P - len(q)) + q for q in prompts], device=device)
        mask = torch.tensor([[0] * (P - len(q)) + [1] * len(q) for q in prompts], device=device)
        with torch.no_grad():
            ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.output, min_new_tokens=args.output,
                         do_sample=False, pad_token_id=0, eos_token_id=None)

    print(f"shape {args.shape}, {device} {dtype}, prompts {args.input // 2}-{args.input} tokens, {args.output} new, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5}{'ours tok/s':>12}{'hf tok/s':>10}{'ratio':>7}")
    for b in map(int, args.batch.split(",")):
        prompts = [torch.randint(1, cfg["vocab_size"], (int(torch.randint(args.input // 2, args.input + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(b)]
        t_ours = timed(lambda: generate(ours, prompts, args.output, []), args.repeats)
        t_hf = timed(lambda: hf_generate(prompts), args.repeats)
        n = b * args.output
        print(f"{b:>5}{n / t_ours:>12.1f}{n / t_hf:>10.1f}{t_hf / t_ours:>7.2f}")


if __name__ == "__main__":
    main()
