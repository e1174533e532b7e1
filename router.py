"""Sequential routing (paper Sec. 3, Inference): a query visits the experts newest to oldest; the first
expert whose greedy output starts with o_pos answers it; a query no expert claims goes to the base model.
Beside it, MoSEs' prompt-key routing: the query's feature picks a task, whose sub-expert masks answer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora
from errors import UserError
from experts import Expert, Indicators, base_model
from model import Llama, generate

BASE = None  # the route of a query answered by the base model


def generate_batched(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                     batch_size: int = 16, prefix: list[int] | None = None, desc: str | None = None,
                     ban: list[int] | None = None) -> list[list[int]]:
    """Greedy `generate` over many prompts, batch by batch; similar lengths share a batch to save padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            for i, ids in zip(chunk, generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_ids, prefix=prefix, ban=ban)):
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
                                prefix=ind.pos, desc=f"expert {expert.name}" if progress else None, ban=ind.added)
        unclaimed = []
        for i, out in zip(pending, outs):
            if out[:k] == ind.pos:
                answers[i], routes[i] = out[k:], expert.name
            else:
                unclaimed.append(i)
        pending = unclaimed
    base_answers(model, prompts, pending, answers, max_new_tokens, eos_ids, batch_size, progress)
    return answers, routes


def base_answers(model: Llama, prompts: list[list[int]], pending: list[int], answers: list[list[int]],
                 max_new_tokens: int, eos_ids: list[int], batch_size: int, progress: bool) -> None:
    """The base model answers the queries no expert claimed (answers[i] for i in pending)."""
    if pending:
        with base_model(model):
            outs = generate_batched(model, [prompts[i] for i in pending], max_new_tokens, eos_ids, batch_size,
                                    desc="base model" if progress else None)
        for i, out in zip(pending, outs):
            answers[i] = out


@torch.no_grad()
def parallel_route(model: Llama, experts: list[Expert], ind: Indicators, prompts: list[list[int]],
                   max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
                   progress: bool = False) -> tuple[list[list[int]], list[str | None]]:
    """The decisions and answers of sequential_route, with one prefill per query instead of up to M.

    Each query is put to all M experts at once, one batch row per expert, each row with its own
    adapter (a stacked bank, lora.stack_adapters) and its own indicator rows. After len(o_pos)
    tokens the newest expert that emitted o_pos keeps decoding from its own cache; the other rows
    are dropped. Queries no expert claims go to the base model, as in sequential routing.
    """
    M, k = len(experts), len(ind.pos)
    answers: list[list[int]] = [[] for _ in prompts]
    routes: list[str | None] = [BASE] * len(prompts)
    rows = {key: torch.stack([e.rows[key] for e in experts]) for key in experts[0].rows}
    extra = model.extra_embed, model.extra_head
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # batch_size queries per pass: M rows each for the first len(o_pos) tokens, then one each

    def use_rows(adapters: torch.Tensor) -> None:  # batch row i runs expert adapters[i]
        lora.set_rows(model, adapters)
        if "embed" in rows:  # added indicators: each row its expert's trained rows
            model.extra_embed = torch.nn.Parameter(rows["embed"][adapters].to(extra[0]), requires_grad=False)
            model.extra_head = (torch.nn.Parameter(rows["head"][adapters].to(extra[1]), requires_grad=False)
                                if "head" in rows else model.extra_embed)

    lora.stack_adapters(model, [e.name for e in experts])
    try:
        for s in tqdm(range(0, len(order), batch_size), desc="parallel routing", disable=not progress, leave=False):
            chunk = order[s:s + batch_size]
            adapters = torch.arange(M).repeat(len(chunk))  # row q * M + e: query q, expert e
            claimed: list[tuple[int, int]] = []  # (query, expert), in the order of the kept rows

            def choose(first: torch.Tensor) -> torch.Tensor:
                claimed.clear()
                for q in range(len(chunk)):
                    newest = next((e for e in reversed(range(M)) if first[q * M + e].tolist() == ind.pos), None)
                    if newest is not None:
                        claimed.append((q, newest))
                keep = torch.tensor([q * M + e for q, e in claimed], dtype=torch.long)
                use_rows(adapters[keep])
                return keep
            use_rows(adapters)
            outs = generate(model, [prompts[i] for i in chunk for _ in range(M)], k + max_new_tokens, eos_ids,
                            prefix=ind.pos, choose=choose, ban=ind.added)
            for (q, e), out in zip(claimed, outs):
                answers[chunk[q]], routes[chunk[q]] = out[k:], experts[e].name
    finally:
        lora.unstack_adapters(model)
        model.extra_embed, model.extra_head = extra
    base_answers(model, prompts, [i for i in range(len(prompts)) if routes[i] is BASE], answers, max_new_tokens,
                 eos_ids, batch_size, progress)
    return answers, routes


# --- MoSEs' prompt-key routing (task-agnostic): the query's feature picks the task whose key it is
# closest to (cosine), and that task's sub-expert masks answer.

@torch.no_grad()
def query_features(model: Llama, prompts: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """f(x): the frozen base model's final hidden states averaged over the query's tokens, (n, dim).

    From the base model, with no sub-expert active, so that a query's feature, and hence its task,
    never depends on what was learned after its key (as L2P uses the frozen pretrained encoder);
    averaged, because a decoder has no [CLS] token that sees the whole query.
    """
    lora.set_task(model, None)  # callers set the task they want afterwards
    device = model.lm_head.weight.device
    feats = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        real = torch.zeros(x.shape, dtype=torch.bool)
        for i, p in enumerate(chunk):
            x[i, :len(p)], real[i, :len(p)] = torch.tensor(p), True
        h = model.hidden(x.to(device)).float()  # right padding: causal attention keeps pads out of real positions
        real = real.to(device).unsqueeze(-1)
        feats.append((h * real).sum(1) / real.sum(1))
    return torch.cat(feats)


def gate_logits(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """SETA's unified gate: a linear layer over the normalised query feature, one output row per task."""
    return F.normalize(features, dim=-1) @ rows.T


def match_keys(features: torch.Tensor, keys: dict[str, torch.Tensor], gate: bool = False) -> list[str]:
    """The task whose key is most cosine-similar to each feature (MoSEs), or, with `gate`, the task whose
    row of SETA's unified gate scores it highest."""
    if not keys:
        raise UserError("no task keys to match")
    names = list(keys)
    rows = torch.stack([keys[n] for n in names]).to(features)
    scores = gate_logits(features, rows if gate else F.normalize(rows, dim=-1))  # both normalised: cosine
    return [names[i] for i in scores.argmax(-1).tolist()]


@torch.no_grad()
def key_route(model: Llama, keys: dict[str, torch.Tensor], prompts: list[list[int]], max_new_tokens: int,
              eos_ids: list[int], batch_size: int = 16, task: str | None = None, progress: bool = False,
              gate: bool = False) -> tuple[list[list[int]], list[str]]:
    """Answers and, per query, the task whose masks answered: matched by key (TaIL; SETA: the unified gate's
    choice, answered by that task's experts and the shared ones), or `task` for all (TIL)."""
    routes = [task] * len(prompts) if task else match_keys(query_features(model, prompts, batch_size), keys, gate)
    answers: list[list[int]] = [[] for _ in prompts]
    for t in dict.fromkeys(routes):
        idx = [i for i, r in enumerate(routes) if r == t]
        lora.set_task(model, t)
        for i, out in zip(idx, generate_batched(model, [prompts[i] for i in idx], max_new_tokens, eos_ids, batch_size,
                                                desc=f"task {t}" if progress else None)):
            answers[i] = out
    return answers, routes
