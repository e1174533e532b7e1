"""Batched greedy generation tokens/s: model.generate against transformers' generate on the same
weights and prompts (input/2 to input tokens, left-padded; no EOS: every row makes `output`).

    python bench/generation.py --shape smollm2-135m --batch 1,4,16 --input 256 --output 64
"""
import torch

import common
from model import generate

OPTIONS = dict(batch=[1, 4, 16], input=256, output=64)
HEADER = ["batch", "ours tok/s", "transformers tok/s", "ratio (min–max)", "load"]


def hf_generate(ref, prompts: list[list[int]], n: int) -> None:
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(q)) + q for q in prompts], device=common.DEVICE)
    with torch.no_grad():
        ref.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=n,
                     min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)


def rows(args) -> list[list]:
    ours, ref = common.models(args.shape, args.dtype)
    ref.eval()
    out = []
    for b in args.batch:
        lengths = torch.randint(args.input // 2, args.input + 1, (b,)).tolist()
        prompts = [torch.randint(1, ours.config.vocab_size, (n,)).tolist() for n in lengths]
        times, load = common.alternate(
            {"ours": lambda i: generate(ours, prompts, args.output, []),
             "transformers": lambda i: hf_generate(ref, prompts, args.output)}, args.rounds)
        out.append([b, *common.speeds(times, b * args.output), load])
    return out


if __name__ == "__main__":
    print(common.report(common.parse(__doc__, OPTIONS), HEADER, rows))
