"""Forward+backward tokens/s of model.py against transformers' Llama, every weight learning, on the
same weights and batch, taking turns step by step.

    python bench/forward_backward.py --shape smollm2-135m --batch 4 --seq 256
"""
import torch
import torch.nn.functional as F

import common

OPTIONS = dict(batch=4, seq=256)
HEADER = ["ours tokens/s", "transformers tokens/s", "ratio (min–max)", "load"]


def rows(args) -> list[list]:
    ours, ref = common.models(args.shape, args.dtype)
    ours.train(), ref.train()
    idx = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), device=common.DEVICE)

    def step(model, logits):
        F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten()).backward()
        model.zero_grad(set_to_none=True)
    times, load = common.alternate({"ours": lambda i: step(ours, ours(idx)),
                                    "transformers": lambda i: step(ref, ref(idx).logits)},
                                   args.rounds)
    return [[*common.speeds(times, args.batch * args.seq), load]]


if __name__ == "__main__":
    print(common.report(common.parse(__doc__, OPTIONS), HEADER, rows))
