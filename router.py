"""Sequential routing (paper Sec. 3, Inference): a query visits the experts newest to oldest;
an expert that emits o_pos answers it, one that emits o_neg passes it to the next older expert,
and "if an expert fails to produce an indicator, we route the query to the base model M_0", as
is a query every expert refuses. Beside it, MoSEs' prompt-key routing: the query's feature
picks a task, whose masks answer.

    python router.py --run runs/see-tau0.1-qa-qg-sa-sum-trans-smollm2-135m --prompt "Translate ..."
    python router.py --run runs/see-... --task qa --index 3     # an eval query, routed step by step
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora
from checkpoint import resolve_dtype
from errors import UserError, user_errors
from experts import NEG, NEITHER, POS, Expert, Indicators, base_model
from model import Llama, generate, trim
from tokenizer import Tokenizer

BASE = None  # the route of a query answered by the base model
# what happens to a query whose expert emits neither indicator: the paper's rule sends it to the
# base model at once; "next" treats it as o_neg (this implementation's rule before, for comparison)
EXCEPTIONS = ("base", "next")


@dataclass
class Routed:
    """What routing did with each query: its answer (token ids, indicator removed), the expert that
    answered (BASE: the base model), and the experts it visited, newest first, with what each
    emitted first (its indicator tokens, or up to the first token that spells neither)."""
    answers: list[list[int]]
    routes: list[str | None]
    visits: list[list[tuple[str, list[int]]]]


def generate_batched(model: Llama, prompts: list[list[int]], max_new_tokens: int,
                     eos_ids: list[int], batch_size: int = 16,
                     prefixes: list[list[int]] | None = None, desc: str | None = None,
                     ban: list[int] | None = None) -> list[list[int]]:
    """Greedy `generate` over many prompts, batch by batch; similar lengths share a batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            batch = [prompts[i] for i in chunk]
            for i, ids in zip(chunk, generate(model, batch, max_new_tokens, eos_ids,
                                              prefixes=prefixes, ban=ban)):
                out[i] = ids
            bar.update(len(chunk))
    return out


def moves_on(outcome: str, exceptions: str) -> bool:
    """Whether a query goes on to the next older expert after this outcome (o_pos
    stops it anyway)."""
    if exceptions not in EXCEPTIONS:
        raise UserError(f"unknown exception rule {exceptions!r}; known: {', '.join(EXCEPTIONS)}")
    return outcome == NEG or (outcome == NEITHER and exceptions == "next")


def routing_length(ind: Indicators, max_new_tokens: int) -> int:
    """Tokens an expert generates: o_pos and the answer, and at least all of o_neg."""
    return max(len(ind.pos) + max_new_tokens, len(ind.neg))


@torch.no_grad()
def sequential_route(model: Llama, experts: list[Expert], ind: Indicators, prompts: list[list[int]],
                     max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
                     progress: bool = False, exceptions: str = "base") -> Routed:
    """Route each query through `experts` (in training order, attached to the model), newest first.

    At each step only the queries still pending are run, and an expert that does not emit o_pos
    stops once its first tokens spell o_neg or neither indicator.
    """
    k = len(ind.pos)
    routed = Routed([[] for _ in prompts], [BASE] * len(prompts), [[] for _ in prompts])
    pending = list(range(len(prompts)))
    for expert in reversed(experts):  # newest first
        if not pending:
            break
        expert.use(model)
        desc = f"expert {expert.name}" if progress else None
        outs = generate_batched(model, [prompts[i] for i in pending],
                                routing_length(ind, max_new_tokens), eos_ids, batch_size,
                                [ind.pos, ind.neg], desc, ban=ind.added)
        still = []
        for i, out in zip(pending, outs):
            outcome = ind.read(out)
            routed.visits[i].append((expert.name, out[:k] if outcome == POS else out))
            if outcome == POS:
                routed.answers[i], routed.routes[i] = out[k:k + max_new_tokens], expert.name
            elif moves_on(outcome, exceptions):
                still.append(i)
        pending = still
    unclaimed = [i for i, r in enumerate(routed.routes) if r is BASE]
    base_answers(model, prompts, unclaimed, routed.answers, max_new_tokens, eos_ids, batch_size,
                 progress)
    return routed


def base_answers(model: Llama, prompts: list[list[int]], pending: list[int],
                 answers: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                 batch_size: int, progress: bool) -> None:
    """The base model answers the queries no expert claimed (answers[i] for i in pending)."""
    if pending:
        with base_model(model):
            outs = generate_batched(model, [prompts[i] for i in pending], max_new_tokens, eos_ids,
                                    batch_size, desc="base model" if progress else None)
        for i, out in zip(pending, outs):
            answers[i] = out


def first_claim(first: list[list[int]], names: list[str], ind: Indicators,
                exceptions: str) -> tuple[int | None, list[tuple[str, list[int]]]]:
    """Sequential routing's decision from every expert's first tokens at once (parallel routing):
    the index of the expert that answers (None: the base model) and the visits that lead there."""
    visits = []
    for e in reversed(range(len(names))):
        outcome = ind.read(first[e])
        visits.append((names[e], ind.pos if outcome == POS else first[e]))
        if outcome == POS:
            return e, visits
        if not moves_on(outcome, exceptions):
            break
    return None, visits


@torch.no_grad()
def parallel_route(model: Llama, experts: list[Expert], ind: Indicators, prompts: list[list[int]],
                   max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
                   progress: bool = False, exceptions: str = "base") -> Routed:
    """The decisions and answers of sequential_route, with one prefill per query instead of up to M.

    Each query is put to all M experts at once, one batch row per expert, each row with its own
    adapter (a stacked bank, lora.stack_adapters) and its own indicator rows. Once the indicators
    are out, the newest expert that emitted o_pos keeps decoding from its own cache (if the experts
    before it emitted o_neg); the other rows are dropped. The base model answers the rest.
    """
    M, k = len(experts), len(ind.pos)
    names = [e.name for e in experts]
    routed = Routed([[] for _ in prompts], [BASE] * len(prompts), [[] for _ in prompts])
    rows = {key: torch.stack([e.rows[key] for e in experts]) for key in experts[0].rows}
    extra = model.extra_embed, model.extra_head
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def use_rows(adapters: torch.Tensor) -> None:  # batch row i runs expert adapters[i]
        lora.set_rows(model, adapters)
        if "embed" in rows:  # added indicators: each row its expert's trained rows
            embed = rows["embed"][adapters].to(extra[0])
            model.extra_embed = torch.nn.Parameter(embed, requires_grad=False)
            model.extra_head = model.extra_embed
            if "head" in rows:
                head = rows["head"][adapters].to(extra[1])
                model.extra_head = torch.nn.Parameter(head, requires_grad=False)

    lora.stack_adapters(model, names)
    try:
        # batch_size queries per pass: M rows each while the indicators are read, then one each
        for s in tqdm(range(0, len(order), batch_size), desc="parallel routing",
                      disable=not progress, leave=False):
            chunk = order[s:s + batch_size]
            adapters = torch.arange(M).repeat(len(chunk))  # row q * M + e: query q, expert e
            claimed: list[tuple[int, int]] = []  # (query, expert), in the order of the kept rows

            def choose(first: torch.Tensor) -> torch.Tensor:
                claimed.clear()
                tokens = [trim(row, eos_ids, [ind.pos, ind.neg]) for row in first.tolist()]
                for q in range(len(chunk)):
                    e, visits = first_claim(tokens[q * M:(q + 1) * M], names, ind, exceptions)
                    routed.visits[chunk[q]] = visits
                    if e is not None:
                        claimed.append((q, e))
                keep = torch.tensor([q * M + e for q, e in claimed], dtype=torch.long)
                use_rows(adapters[keep])
                return keep
            use_rows(adapters)
            batch = [prompts[i] for i in chunk for _ in range(M)]
            outs = generate(model, batch, routing_length(ind, max_new_tokens), eos_ids,
                            prefixes=[ind.pos, ind.neg], choose=choose, ban=ind.added)
            for (q, e), out in zip(claimed, outs):
                routed.answers[chunk[q]] = out[k:k + max_new_tokens]
                routed.routes[chunk[q]] = names[e]
    finally:
        lora.unstack_adapters(model)
        model.extra_embed, model.extra_head = extra
    unclaimed = [i for i, r in enumerate(routed.routes) if r is BASE]
    base_answers(model, prompts, unclaimed, routed.answers, max_new_tokens, eos_ids, batch_size,
                 progress)
    return routed


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
        # right padding: causal attention keeps pads out of real positions
        h = model.hidden(x.to(device)).float()
        real = real.to(device).unsqueeze(-1)
        feats.append((h * real).sum(1) / real.sum(1))
    return torch.cat(feats)


# SETA's gate is a cosine classifier with a fixed scale (as LUCIR's, for class-incremental
# learning). Raw cosines lie in [-1, 1]: their softmax is nearly flat, and a row could claim every
# query by growing its norm. On SmolLM2 (docs/RESULTS.md) the routing regulariser did just that with
# unnormalised rows: it grew the oldest row until the gate sent 100% of queries to the first task.
GATE_SCALE = 16.0


def gate_logits(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """SETA's unified gate: GATE_SCALE times the cosine of the query feature and each task's row."""
    return GATE_SCALE * F.normalize(features, dim=-1) @ F.normalize(rows, dim=-1).T


def match_keys(features: torch.Tensor, keys: dict[str, torch.Tensor]) -> list[str]:
    """The task whose key (MoSEs) or gate row (SETA: the gate's choice) is most cosine-similar to
    each feature."""
    if not keys:
        raise UserError("no task keys to match")
    names = list(keys)
    scores = gate_logits(features, torch.stack([keys[n] for n in names]).to(features))
    return [names[i] for i in scores.argmax(-1).tolist()]


@torch.no_grad()
def key_route(model: Llama, keys: dict[str, torch.Tensor], prompts: list[list[int]],
              max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
              task: str | None = None, progress: bool = False) -> tuple[list[list[int]], list[str]]:
    """Answers and, per query, the task whose masks answered: matched by key (TaIL;
    SETA: the unified gate's choice, answered by that task's experts and the shared
    ones), or `task` for all (TIL)."""
    if task:
        routes = [task] * len(prompts)
    else:
        routes = match_keys(query_features(model, prompts, batch_size), keys)
    answers: list[list[int]] = [[] for _ in prompts]
    for t in dict.fromkeys(routes):
        idx = [i for i, r in enumerate(routes) if r == t]
        lora.set_task(model, t)
        outs = generate_batched(model, [prompts[i] for i in idx], max_new_tokens, eos_ids,
                                batch_size, desc=f"task {t}" if progress else None)
        for i, out in zip(idx, outs):
            answers[i] = out
    return answers, routes


def show_route(tok: Tokenizer, ind: Indicators, names: list[str], routed: Routed,
               exceptions: str) -> None:
    """Print, expert by expert from the newest, what each emitted first, then who
    answered and what."""
    then = {POS: "it answers", NEG: "the next older expert is asked",
            NEITHER: "the base model answers at once (the exception path)"}
    if exceptions == "next":
        then[NEITHER] = "the next older expert is asked (--exceptions next)"
    for name, tokens in routed.visits[0]:
        outcome = ind.read(tokens)
        where = f"expert {names.index(name) + 1}/{len(names)} {name}"
        print(f"  {where:<24} emitted {tok.decode(tokens)!r:<14} {outcome:<8} -> {then[outcome]}")
    if routed.routes[0] is BASE and moves_on(ind.read(routed.visits[0][-1][1]), exceptions):
        print(f"  {'past the oldest expert':<24} -> the base model answers")
    print(f"\nanswered by: {routed.routes[0] or 'the base model'}")
    print(f"answer: {tok.decode(routed.answers[0]).strip()}")


def main() -> None:
    p = argparse.ArgumentParser(description="Watch SEE's sequential routing: one query put to a "
                                            "run's experts, newest first, with what each emitted "
                                            "and which model answered.")
    p.add_argument("--run", required=True,
                   help="a SEE system written by train.py --sequence/--order")
    p.add_argument("--prompt", default=None,
                   help="the query (the run's prompt template is applied)")
    p.add_argument("--task", default=None,
                   help="take the query from this task's eval split instead")
    p.add_argument("--index", type=int, default=0, help="which eval query of --task (from 0)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--exceptions", default="base", choices=EXCEPTIONS,
                   help="neither indicator: the base model answers (the paper), or the next older "
                        "expert is asked")
    p.add_argument("--data-dir", default=None,
                   help="SuperNI directory (default $SEE_DATA_DIR, else ../shared/superni)")
    args = p.parse_args()
    if (args.prompt is None) == (args.task is None):
        p.error("give --prompt or --task (with --index)")
    with user_errors():
        from pathlib import Path
        from data import load_task
        from evaluate import load_system  # it imports this module, so import it late
        from train import read_system
        from experts import prompt_ids
        system = read_system(Path(args.run))
        if system["method"] != "see":
            raise UserError(f"{args.run} holds {system['method']}, not SEE: only SEE routes by "
                            f"indicators")
        reference = None
        if args.task is not None:
            examples = load_task(args.task, "eval", args.data_dir)
            if not 0 <= args.index < len(examples):
                raise UserError(f"--index {args.index} out of range: {args.task} has "
                                f"{len(examples)} eval queries")
            query, reference = examples[args.index].query, examples[args.index].outputs[0]
        else:
            query = args.prompt
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dirs = [str(Path(args.run) / e) for e in system["experts"]]
        model, tok, experts, ind, _ = load_system(None, dirs, device, resolve_dtype(None, device))
        prompt = prompt_ids(tok, query, experts[0].max_source, experts[0].template)
        routed = sequential_route(model, experts, ind, [prompt], args.max_new_tokens, tok.eos_ids,
                                  exceptions=args.exceptions)
        shown = query if len(query) <= 300 else query[:300] + " ..."
        print(f"query: {shown}\n")
        show_route(tok, ind, [e.name for e in experts], routed, args.exceptions)
        if reference is not None:
            print(f"reference: {reference}")


if __name__ == "__main__":
    main()
