"""Latency of one query through M SEE experts, sequential and parallel routing, each the mean over
Appendix E's M + 1 outcomes, against plain generation with one adapter and the overheads that
Eq. 8 and Appendix E predict from the measured TTFT and TPOT (see bench/README.md).

    python bench/routing.py --shape smollm2-135m --experts 1,2,5,10 --input 512 --output 64
"""
import statistics

import torch

import common
import lora
from experts import Indicators, LoraExpert
from model import Llama, ModelConfig, generate
from parallel import parallel_route
from router import sequential_route

OPTIONS = dict(experts=[1, 2, 5, 10], input=512, output=64)
HEADER = ["M", "plain ms", "TTFT ms", "TPOT ms", "Eq. 8 +%", "App. E +%", "sequential ms",
          "seq. +% (min–max)", "parallel ms", "par. +% (min–max)", "load"]


def rows(args) -> list[list]:
    return [measure(args, m) for m in args.experts]


def measure(args, m: int) -> list:
    hf = {**common.SHAPES[args.shape], "tie_word_embeddings": True}  # one indicator matrix
    torch.manual_seed(0)  # the same base model for every M, with m fresh random experts
    model = Llama(ModelConfig.from_hf(hf)).to(device=common.DEVICE, dtype=args.dtype).eval()
    ind = Indicators("added", *([i] for i in model.extend_vocab(2)))
    prompt = torch.randint(0, hf["vocab_size"], (args.input,)).tolist()
    cfg = lora.LoraConfig(r=8, alpha=16, dropout=0.0)
    experts, hidden = [], []  # and each expert's last hidden state on the prompt
    for e in range(m):
        lora.add_adapter(model, f"e{e}", cfg)
        lora.set_adapter(model, f"e{e}")
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_B[f"e{e}"].weight.normal_(0, 0.01)
            hidden.append(model.hidden(torch.tensor([prompt], device=common.DEVICE))[0, -1].float())
        experts.append(LoraExpert.from_model(model, f"e{e}", f"task{e}", "random", "added", 10**6,
                                             "plain", cfg))
    N = args.output

    def plain(n):
        return lambda i: (experts[-1].use(model), generate(model, [prompt], n, []))

    def routed(route, claimer):  # claimer: the expert that emits o_pos first (None: no one)
        def run(i):
            for e, (expert, h) in enumerate(zip(experts, hidden)):  # 1e4: far above any logit
                row, zero = 1e4 * h / h.square().sum(), torch.zeros_like(h)
                expert.rows["embed"] = torch.stack([row, zero] if e == claimer else [zero, row])
            routes = route(model, experts, ind, [prompt], N, []).routes
            assert routes == [None if claimer is None else experts[claimer].name], claimer
        return run
    outcomes = [*range(m), None]  # Appendix E: each expert, or none, equally likely
    routes = (sequential_route, parallel_route)
    times, load = common.alternate({"plain": plain(N), "ttft": plain(1)}
                                   | {(r, k): routed(r, k) for r in routes for k in outcomes},
                                   args.rounds)
    t, ttft = statistics.median(times["plain"]), statistics.median(times["ttft"])
    tpot = (t - ttft) / max(N - 1, 1)
    eq8 = 0.5 / (1 + N / (m - 1) * tpot / ttft) if m > 1 else 0.0
    cells = [m, f"{1e3 * t:.1f}", f"{1e3 * ttft:.1f}", f"{1e3 * tpot:.2f}", f"{100 * eq8:.1f}",
             f"{100 * (m - 1) / 2 / (1 + N * tpot / ttft):.1f}"]
    for r in routes:
        per_round = [statistics.mean(ts) for ts in zip(*(times[r, k] for k in outcomes))]
        cells += [f"{1e3 * statistics.median(per_round):.1f}", common.spread(
            (100 * (s / p - 1) for s, p in zip(per_round, times["plain"])), ".1f")]
    return cells + [load]


if __name__ == "__main__":
    print(common.report(common.parse(__doc__, OPTIONS), HEADER, rows))
