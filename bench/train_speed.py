"""LoRA training tokens/s, peak memory and MFU, ours (model.py + lora.py) against transformers +
peft (see bench/README.md). --steps: steps per side per round; --mfu N: MFU against the measured
rate of an N^3 matmul.

    python bench/train_speed.py --shape smollm2-135m --micro-batch 4 --steps 2 --grad-checkpoint
"""
import multiprocessing
import statistics

import torch
import torch.nn.functional as F

import common
import lora
from model import Llama, ModelConfig
from train import trainable_parameters

OPTIONS = dict(micro_batch=4, steps=2, grad_checkpoint=False, mfu=1024)
HEADER = ["shape", "micro-batch", "checkpointing", "ours tokens/s", "t+p tokens/s",
          "ratio (min–max)", "ours peak MiB", "t+p peak MiB", "ours MFU %", "t+p MFU %", "load"]


def batch(vocab: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A right-padded micro-batch (ids, labels, real tokens), lengths as in the SuperNI data."""
    prompt = torch.randint(100, 400, (micro, 1))
    end = prompt + torch.randint(5, 60, (micro, 1))
    pos = torch.arange(int(end.max()))
    ids = torch.randint(0, vocab, (micro, len(pos))) * (pos < end)
    labels = torch.where((pos >= prompt) & (pos < end), ids, -100)
    return ids.to(common.DEVICE), labels.to(common.DEVICE), int(end.sum())


def trainer(model, params, loss_of, data, dtype):
    """step(i): one AdamW step of `model` on micro-batch i."""
    model.train()
    opt = torch.optim.AdamW(list(params), lr=1e-4, fused=common.DEVICE == "cuda")
    amp = torch.autocast(common.DEVICE, dtype=dtype, enabled=dtype != torch.float32)

    def step(i):
        with amp:
            loss = loss_of(*data[i][:2])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def trainers(args) -> tuple[dict, list]:
    """A step function per side, rank-8 LoRA on q_proj/v_proj of the same frozen weights, and the
    micro-batches. No attention mask: the padding is on the right."""
    import peft
    ours, ref = common.models(args.shape, args.dtype)
    data = [batch(ours.config.vocab_size, args.micro_batch) for _ in range(args.steps)]
    lora.add_adapter(ours, "bench", lora.LoraConfig(r=8, alpha=16, dropout=0.1))
    lora.set_adapter(ours, "bench")
    if args.grad_checkpoint:
        ours.checkpoint_blocks()
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    theirs = peft.get_peft_model(ref, peft.LoraConfig(  # adapters in fp32, as ours
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM"))

    def ours_loss(x, y):  # shifted as train.collate does
        y = y[:, 1:]
        return F.cross_entropy(ours.head(ours.hidden(x[:, :-1])[y != -100]).float(), y[y != -100])
    return {"ours": trainer(ours, trainable_parameters(ours, "bench", False).values(), ours_loss,
                            data, args.dtype),
            "t+p": trainer(theirs, [p for p in theirs.parameters() if p.requires_grad],
                           lambda x, y: theirs(input_ids=x, labels=y).loss, data, args.dtype)}, data


def memory_pass(args, side: str) -> float:
    """Peak MiB of this process over a warm-up step and a round of `side` (the other idle)."""
    common.alternate({side: trainers(args)[0][side]}, 1, args.steps)
    if common.DEVICE == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's resident set (Linux)
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM")) / 2**10


def rows(args) -> list[list]:
    peaks = []
    for side in ("ours", "t+p"):  # each in a fresh process, so that its peak is its own
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            peaks.append(f"{pool.apply(memory_pass, (args, side)):.0f}")
    fns, data = trainers(args)
    times, load = common.alternate(fns, args.rounds, args.steps)
    tokens = sum(n for *_, n in data)
    with torch.device("meta"):  # MFU: 4 N FLOPs a token, N the blocks' weights
        body = Llama(ModelConfig.from_hf(common.SHAPES[args.shape])).model.layers
    a = torch.randn(args.mfu, args.mfu, device=common.DEVICE, dtype=args.dtype)
    matmul = common.alternate({"": lambda i: a @ a}, 5)[0][""]  # the attainable peak
    flops = 4 * sum(p.numel() for p in body.parameters()) * tokens / (2 * args.mfu ** 3)
    mfu = [f"{100 * flops * statistics.median(matmul) / statistics.median(t):.1f}"
           for t in times.values()]
    return [[args.shape, args.micro_batch, "yes" if args.grad_checkpoint else "no",
             *common.speeds(times, tokens), *peaks, *mfu, load]]


if __name__ == "__main__":
    print(common.report(common.parse(__doc__, OPTIONS), HEADER, rows))
