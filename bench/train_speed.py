"""LoRA training throughput and peak memory: ours (model.py + lora.py) against transformers + peft.

    python bench/train_speed.py --shape smollm2-135m --micro-batch 4 --steps 6
    python bench/train_speed.py --shape smollm2-135m --dtype bfloat16 --grad-checkpoint   # forced bf16, checkpointed

Both train the same randomly initialised model (same weights), rank-8 LoRA on q_proj/v_proj, on
the same micro-batches (random ids, prompt/response lengths as in the SuperNI data, loss on the
response only) with AdamW. Each runs in its own child process, so that peak memory (CUDA:
max allocated; CPU: peak resident set) is its own; the two alternate `--rounds` times and the
median step time counts. Prints tokens/s, peak memory and the ratios. A benchmark, not a test.
The dtype follows train.py's rule (checkpoint.resolve_dtype) unless --dtype is given;
--grad-checkpoint checkpoints every block on both sides (ours: train.checkpoint_blocks).

Each side runs as its code base trains: ours sends only the response positions through the output
head (as train.py does), transformers computes logits for every position. Both get right-padded
batches without an attention mask (causal attention keeps padding out of real positions).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_backward import SHAPES  # noqa: E402


def batches(vocab: int, micro: int, n: int,
            seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """n right-padded micro-batches (ids, labels, attention mask): prompts of 100-400 tokens,
    responses of 5-60."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = [(int(torch.randint(100, 400, (1,), generator=g)),
                 int(torch.randint(5, 60, (1,), generator=g)))
                for _ in range(micro)]
        T = max(p + r for p, r in rows)
        ids = torch.zeros(micro, T, dtype=torch.long)
        labels = torch.full((micro, T), -100, dtype=torch.long)
        mask = torch.zeros(micro, T, dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, :p + r] = torch.randint(0, vocab, (p + r,), generator=g)
            labels[i, p:p + r] = ids[i, p:p + r]
            mask[i, :p + r] = 1
        out.append((ids, labels, mask))
    return out


def worker(impl: str, shape: str, micro: int, steps: int, device: str, dtype: torch.dtype,
           checkpointed: bool) -> dict:
    import peft
    import transformers

    import lora
    from checkpoint import build
    from model import ModelConfig
    from train import checkpoint_blocks, trainable_parameters
    torch.manual_seed(0)
    cfg = SHAPES[shape]
    # random weights drawn where they run: a 7B shape is slow to draw on a CPU
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg),
                                                            attn_implementation="sdpa", dtype=dtype)
    data = [tuple(t.to(device) for t in b) for b in batches(cfg["vocab_size"], micro, steps + 2)]
    amp = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    if impl == "ours":
        model = build(ModelConfig.from_hf(cfg), dict(ref.state_dict()), dtype, device)
        del ref
        lora.add_adapter(model, "bench", lora.LoraConfig(r=8, alpha=16, dropout=0.1))
        lora.set_adapter(model, "bench")
        params = list(trainable_parameters(model, "bench", False).values())
        if checkpointed:
            checkpoint_blocks(model)

        # shifted as train.collate does; right padding needs no mask under causal attention
        def loss_of(x, y, mask):
            y = y[:, 1:]
            return F.cross_entropy(model.head(model.hidden(x[:, :-1])[y != -100]).float(),
                                   y[y != -100])
    else:
        if checkpointed:
            ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        model = peft.get_peft_model(ref, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_of(x, y, mask):  # no mask, as ours: right padding under causal attention
            return model(input_ids=x, labels=y).loss
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, (x, y, mask) in enumerate(data):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with amp:
            loss = loss_of(x, y, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # after two warm-up steps
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # real (unpadded) tokens per step, the same for both implementations
    return dict(step_s=statistics.median(times),
                tokens=sum(int(m.sum()) for *_, m in data[2:]) / len(times), peak=peak)


def run(shape: str, micro: int, steps: int, rounds: int, dtype: str | None = None,
        checkpointed: bool = False) -> dict:
    """{implementation: dict(tokens_per_s, peak_mib)}, the median over `rounds` child
    processes each."""
    flags = ["--shape", shape, "--micro-batch", str(micro), "--steps",
             str(steps)] + ["--dtype", dtype] * bool(dtype)
    runs = {"ours": [], "transformers+peft": []}
    for _ in range(rounds):
        for impl, name in (("ours", "ours"), ("hf", "transformers+peft")):
            out = subprocess.run([sys.executable, __file__, "--worker", impl, *flags]
                                 + ["--grad-checkpoint"] * checkpointed,
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{name} worker failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {name: dict(tokens_per_s=statistics.median(r["tokens"] / r["step_s"] for r in rs),
                       peak_mib=max(r["peak"] for r in rs) / 2**20) for name, rs in runs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6,
                   help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each implementation, alternating")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: train.py's rule")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing on both sides")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from checkpoint import resolve_dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.micro_batch, args.steps, device,
                                dtype, args.grad_checkpoint)))
        return
    result = run(args.shape, args.micro_batch, args.steps, args.rounds, args.dtype,
                 args.grad_checkpoint)
    import peft
    import transformers
    print(f"shape {args.shape}, {device} {dtype}, micro-batch {args.micro_batch}, LoRA r=8 on "
          f"q_proj/v_proj, {'activation checkpointing, ' * args.grad_checkpoint}torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'implementation':<20}{'tokens/s':>10}{'peak MiB':>10}")
    for name, r in result.items():
        print(f"{name:<20}{r['tokens_per_s']:>10.0f}{r['peak_mib']:>10.0f}")
    ours, hf = result.values()
    print(f"ours / transformers+peft: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s, "
          f"{ours['peak_mib'] / hf['peak_mib']:.2f}x peak memory (ours: output head on response "
          f"positions only)")


if __name__ == "__main__":
    main()
