"""Parallel routing, beside its benchmark (routing.py): router.sequential_route's decisions and
answers from one prefill for all M experts (a batch row each, with its adapter and indicator rows)
instead of up to M; the claiming expert answers after its o_pos (`evaluate.py --routing none`).
"""
import contextlib

import torch

import lora
from experts import NEG, POS, Expert, Indicators
from model import Llama, generate
from router import BASE, Routed, base_answers, generate_batched


@contextlib.contextmanager
def per_row_experts(model: Llama, experts: list[Expert], rows: torch.Tensor):
    """Batch row i runs expert rows[i]: its LoRA update (a hook per LoRA layer), indicator rows."""
    banks = {}
    for m in lora.lora_layers(model).values():
        r = max((len(m.lora_A[e.name].weight) for e in experts if e.name in m.lora_A), default=1)
        A = m.base.weight.new_zeros(len(experts), r, m.base.in_features)
        B = m.base.weight.new_zeros(len(experts), m.base.out_features, r)
        for j, e in enumerate(experts):
            if e.name in m.lora_A:
                a = m.lora_A[e.name].weight
                A[j, :len(a)], B[j, :, :len(a)] = a, m.lora_B[e.name].weight
        # fp32, as the one-adapter path's float
        scale = torch.tensor([m.scaling.get(e.name, 0.0) for e in experts], device=A.device)
        banks[m] = A[rows], B[rows], scale[rows, None, None]

    def add_update(m, inputs, y):
        A, B, scale = banks[m]
        h = torch.einsum("bti,bri->btr", inputs[0].to(A.dtype), A)
        return y + (torch.einsum("btr,bor->bto", h, B) * scale).to(y.dtype)
    lora.set_adapter(model, None)
    hooks = [m.register_forward_hook(add_update) for m in banks]
    if experts[0].rows:  # added indicators: each row its expert's trained rows
        per_row_indicator_rows(model, experts, rows)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for shadowed in ("embed", "head"):
            vars(model).pop(shadowed, None)


def per_row_indicator_rows(model: Llama, experts: list[Expert], rows: torch.Tensor) -> None:
    """Shadow embed and head (instance attributes): batch row i reads expert rows[i]'s rows."""
    embed = torch.stack([e.rows["embed"] for e in experts])[rows].to(model.extra_embed)
    head = torch.stack([e.rows.get("head", e.rows["embed"]) for e in experts])[rows]
    V = model.config.vocab_size

    def embed_rows(idx: torch.Tensor) -> torch.Tensor:
        x = model.model.embed_tokens(idx.clamp(max=V - 1))
        extra = embed[torch.arange(len(idx), device=idx.device)[:, None], (idx - V).clamp(min=0)]
        return torch.where((idx >= V).unsqueeze(-1), extra.to(x.dtype), x)

    def head_rows(x: torch.Tensor) -> torch.Tensor:
        extra = torch.einsum("btd,bkd->btk", x, head.to(x))
        return torch.cat([model.lm_head(x), extra], dim=-1)
    model.embed, model.head = embed_rows, head_rows


@torch.no_grad()
def parallel_route(model: Llama, experts: list[Expert], ind: Indicators, prompts: list[list[int]],
                   max_new_tokens: int, eos_ids: list[int], batch_size: int = 16) -> Routed:
    """sequential_route's result, from one batched pass of batch_size queries x M experts."""
    M, names = len(experts), [e.name for e in experts]
    routed = Routed([[] for _ in prompts], [BASE] * len(prompts), [[] for _ in prompts])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    longest = max(len(ind.pos), len(ind.neg))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        with per_row_experts(model, experts, torch.arange(M).repeat(len(chunk))):
            first = generate(model, [prompts[i] for i in chunk for _ in range(M)], longest,
                             eos_ids, prefixes=[ind.pos, ind.neg], ban=ind.added)
        for q, i in enumerate(chunk):  # sequential routing's decisions, newest expert first
            for e in reversed(range(M)):
                out = first[q * M + e]
                outcome = ind.read(out)
                routed.visits[i].append((names[e], ind.pos if outcome == POS else out))
                if outcome == POS:
                    routed.routes[i] = names[e]
                if outcome != NEG:  # o_pos, or neither indicator: no older expert is asked
                    break
    for e in experts:
        claimed = [i for i, r in enumerate(routed.routes) if r == e.name]
        if claimed:
            e.use(model)
            answers = generate_batched(model, [prompts[i] + ind.pos for i in claimed],
                                       max_new_tokens, eos_ids, batch_size, ban=ind.added)
            for i, answer in zip(claimed, answers):
                routed.answers[i] = answer
    unclaimed = [i for i, r in enumerate(routed.routes) if r is BASE]
    base_answers(model, prompts, unclaimed, routed.answers, max_new_tokens, eos_ids, batch_size,
                 False)
    return routed
