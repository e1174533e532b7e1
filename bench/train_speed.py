"""LoRA training throughput and peak memory: ours (model.py + lora.py) against transformers + peft.

    python bench/train_speed.py --shape smollm2-135m --micro-batch 4 --steps 6

Both train the same randomly initialised model (same weights), rank-8 LoRA on q_proj/v_proj, on
the same micro-batches (random ids, prompt/response lengths as in the SuperNI data, loss on the
response only) with AdamW. Each runs in its own child process, so that peak memory (CUDA:
max allocated; CPU: peak resident set) is its own; the two alternate `--rounds` times and the
median step time counts. Prints tokens/s, peak memory and the ratios. A benchmark, not a test.

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


def batches(vocab: int, micro: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """n right-padded micro-batches (ids, labels, attention mask): prompts of 100-400 tokens, responses of 5-60."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = [(int(torch.randint(100, 400, (1,), generator=g)), int(torch.randint(5, 60, (1,), generator=g)))
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


def worker(impl: str, shape: str, micro: int, steps: int, device: str) -> dict:
    import peft
    import transformers

    import lora
    from checkpoint import build
    from model import ModelConfig
    from train import trainable_parameters
    torch.manual_seed(0)
    cfg = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), attn_implementation="sdpa")
    data = [tuple(t.to(device) for t in b) for b in batches(cfg["vocab_size"], micro, steps + 2)]
    amp = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
    if impl == "ours":
        model = build(ModelConfig.from_hf(cfg), dict(ref.state_dict()), dtype, device)
        del ref
        lora.add_adapter(model, "bench", lora.LoraConfig(r=8, alpha=16, dropout=0.1))
        lora.set_adapter(model, "bench")
        params = list(trainable_parameters(model, "bench", False).values())

        def loss_of(x, y, mask):  # shifted as train.collate does; right padding needs no mask under causal attention
            y = y[:, 1:]
            return F.cross_entropy(model.head(model.hidden(x[:, :-1])[y != -100]).float(), y[y != -100])
    else:
        model = peft.get_peft_model(ref.to(device=device, dtype=dtype), peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
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
    return dict(step_s=statistics.median(times), tokens=sum(int(m.sum()) for *_, m in data[2:]) / len(times), peak=peak)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each implementation, alternating")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.micro_batch, args.steps, device)))
        return
    runs = {"ours": [], "transformers+peft": []}
    for _ in range(args.rounds):
        for impl, name in (("ours", "ours"), ("hf", "transformers+peft")):
            out = subprocess.run([sys.executable, __file__, "--worker", impl, "--shape", args.shape, "--micro-batch",
                                  str(args.micro_batch), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import peft
    import transformers
    print(f"shape {args.shape}, {device}, micro-batch {args.micro_batch}, LoRA r=8 on q_proj/v_proj, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'implementation':<20}{'tokens/s':>10}{'peak MiB':>10}")
    rate, peak = {}, {}
    for name, rs in runs.items():
        rate[name] = statistics.median(r["tokens"] / r["step_s"] for r in rs)
        peak[name] = max(r["peak"] for r in rs) / 2**20
        print(f"{name:<20}{rate[name]:>10.0f}{peak[name]:>10.0f}")
    print(f"ours / transformers+peft: {rate['ours'] / rate['transformers+peft']:.2f}x tokens/s, "
          f"{peak['ours'] / peak['transformers+peft']:.2f}x peak memory (ours: output head on response positions only)")


if __name__ == "__main__":
    main()
