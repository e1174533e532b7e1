"""Latency of answering a query through M SEE experts, against plain generation with one adapter.

    python bench/routing.py --shape smollm2-135m --experts 1,2,5,10 --input 512 --output 64

For each M: plain generation (one adapter, no routing); sequential routing (experts newest first)
and parallel routing (all experts' first step in one batch), both averaged over the M + 1 outcomes
of the paper's Appendix E (expert i claims the query, or none does and the base model answers),
beside predictions from the measured TTFT and TPOT: the paper's Eq. 8 as printed, and Appendix E
before its last simplification, (M-1)/2 / (1 + N TPOT/TTFT), which Eq. 8 does not equal. Here a
query no expert claims costs M prefills and the base model's, not the (M+1)/2 Appendix E assumes,
and parallel routing's time includes stacking the adapters (bench/parallel.py). Weights are random; each
outcome is forced by setting the experts' indicator rows from their own hidden state at the end
of the prompt. Batch of one query, greedy, no EOS. A benchmark, not a test.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora  # noqa: E402
from checkpoint import resolve_dtype  # noqa: E402
from experts import Indicators, LoraExpert  # noqa: E402
from forward_backward import SHAPES, timed  # noqa: E402
from model import Llama, ModelConfig, generate  # noqa: E402
from parallel import parallel_route  # noqa: E402
from router import sequential_route  # noqa: E402


def make_experts(model: Llama, m: int, device) -> list[LoraExpert]:
    cfg = lora.LoraConfig(r=8, alpha=16, dropout=0.0)
    experts = []
    for e in range(m):
        lora.add_adapter(model, f"e{e}", cfg)
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_B[f"e{e}"].weight.normal_(0, 0.01)
        experts.append(LoraExpert.from_model(model, f"e{e}", f"task{e}", "random", "added", 10**6,
                                             "plain", cfg))
    for e in experts:  # move to the device: the router copies rows into the model's rows
        e.rows = {k: v.to(device) for k, v in e.rows.items()}
    return experts


def force(experts: list[LoraExpert], hidden: list[torch.Tensor], claimer: int | None) -> None:
    """Expert `claimer` (an index, or None for no one) emits o_pos first, every other one o_neg."""
    for e, (expert, h) in enumerate(zip(experts, hidden)):
        # logit 1e4 for whichever indicator gets it: far above any other
        row = 1e4 * h / h.square().sum()
        zero = torch.zeros_like(row)
        expert.rows["embed"] = torch.stack([row, zero] if e == claimer else [zero, row])


def measure(shape: str, m: int, n_input: int, N: int, repeats: int, device: str,
            dtype: torch.dtype) -> dict:
    """Seconds of plain generation, TTFT, TPOT, sequential and parallel routing over M =
    m experts, and the overheads (fractions of plain) predicted by Eq. 8 and by Appendix
    E before its simplification."""
    # one matrix of indicator rows, as in SmolLM2
    hf = {**SHAPES[shape], "tie_word_embeddings": True}
    prompt = torch.randint(0, hf["vocab_size"], (n_input,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    torch.manual_seed(0)  # the same base model for every M, with M fresh experts
    model = Llama(ModelConfig.from_hf(hf)).to(device=device, dtype=dtype).eval()
    ind = Indicators("added", *([i] for i in model.extend_vocab(2)))
    experts = make_experts(model, m, device)
    hidden = []
    with torch.no_grad():
        for e in experts:
            e.use(model)
            hidden.append(model.hidden(torch.tensor([prompt], device=device))[0, -1].float())
    experts[-1].use(model)
    plain = timed(lambda: generate(model, [prompt], N, []), repeats)
    ttft = timed(lambda: generate(model, [prompt], 1, []), repeats)
    tpot = (plain - ttft) / max(N - 1, 1)
    seq, par = [], []
    for claimer in [*range(m), None]:  # Appendix E: each expert, or none, equally likely
        force(experts, hidden, claimer)
        expected = [experts[claimer].name if claimer is not None else None]
        for route in (sequential_route, parallel_route):  # the outcome is the forced one
            assert route(model, experts, ind, [prompt], 1, [],
                         m).routes == expected, (route.__name__, claimer)
        seq.append(timed(lambda: sequential_route(model, experts, ind, [prompt], N, [], 1), repeats))
        par.append(timed(lambda: parallel_route(model, experts, ind, [prompt], N, [], m), repeats))
    return dict(plain=plain, ttft=ttft, tpot=tpot, sequential=statistics.mean(seq),
                parallel=statistics.mean(par),
                eq8=0.5 / (1 + N / (m - 1) * tpot / ttft) if m > 1 else 0.0,
                appendix=(m - 1) / 2 / (1 + N * tpot / ttft))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--experts", default="1,2,5,10", help="comma-separated numbers of experts M")
    p.add_argument("--input", type=int, default=512, help="prompt tokens")
    p.add_argument("--output", type=int, default=64, help="generated tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: train.py's rule")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    print(f"shape {args.shape}, {device} {dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; input {args.input}, output {args.output} tokens, "
          f"batch 1, median of {args.repeats}")
    print(f"{'M':>3}{'plain ms':>10}{'TTFT ms':>9}{'TPOT ms':>9}{'seq ms':>9}{'seq +%':>8}{'Eq.8 +%':>9}"
          f"{'App.E +%':>10}{'par ms':>9}{'par +%':>8}")
    for m in map(int, args.experts.split(",")):
        r = measure(args.shape, m, args.input, args.output, args.repeats, device, dtype)
        print(f"{m:>3}{1e3 * r['plain']:>10.1f}{1e3 * r['ttft']:>9.1f}{1e3 * r['tpot']:>9.2f}{1e3 * r['sequential']:>9.1f}"
              f"{100 * (r['sequential'] / r['plain'] - 1):>8.1f}{100 * r['eq8']:>9.1f}{100 * r['appendix']:>10.1f}"
              f"{1e3 * r['parallel']:>9.1f}{100 * (r['parallel'] / r['plain'] - 1):>8.1f}")


if __name__ == "__main__":
    main()
