"""Sequential routing (paper Sec. 3, Inference): a query visits the experts newest to oldest; the first
expert whose greedy output starts with o_pos answers it; a query no expert claims goes to the base model."""
from __future__ import annotations

import torch
from tqdm import tqdm

from experts import Expert, Indicators, base_model
from model import Llama, generate

BASE = None  # the route of a query answered by the base model


def generate_batched(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                     batch_size: int = 16, prefix: list[int] | None = None, desc: str | None = None) -> list[list[int]]:
    """Greedy `generate` over many prompts, batch by batch; similar lengths share a batch to save padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            for i, ids in zip(chunk, generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_ids, prefix=prefix)):
                out[i] = ids
            bar.update(len(chunk))
    return out


@torch.no_grad()
def sequential_route(model: Llama, experts: list[Expert], ind: Indicators | None, prompts: list[list[int]],
                     max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
                     progress: bool = False) -> tuple[list[list[int]], list[str | None]]:
    """Answers (token ids, indicator removed) and, per query, the name of the expert that answered (BASE if none).

    `experts` are in training order and must be attached to the model. At each step only the queries
    still unrouted are run, and an expert that does not start with o_pos stops after that token.
    """
    answers: list[list[int]] = [[] for _ in prompts]
    routes: list[str | None] = [BASE] * len(prompts)
    pending = list(range(len(prompts)))
    for expert in reversed(experts):  # newest first
        if not pending:
            break
        expert.use(model)
        k = len(ind.pos)
        outs = generate_batched(model, [prompts[i] for i in pending], k + max_new_tokens, eos_ids, batch_size,
                                prefix=ind.pos, desc=f"expert {expert.name}" if progress else None)
        unclaimed = []
        for i, out in zip(pending, outs):
            if out[:k] == ind.pos:
                answers[i], routes[i] = out[k:], expert.name
            else:
                unclaimed.append(i)
        pending = unclaimed
    if pending:
        with base_model(model):
            outs = generate_batched(model, [prompts[i] for i in pending], max_new_tokens, eos_ids, batch_size,
                                    desc="base model" if progress else None)
        for i, out in zip(pending, outs):
            answers[i] = out
    return answers, routes
