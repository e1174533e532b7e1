"""Sequential routing (paper Sec. 3, Inference): a query visits the experts newest to oldest;
an expert that emits o_pos answers it, one that emits o_neg passes it to the next older expert,
and "if an expert fails to produce an indicator, we route the query to the base model M_0", as
is a query every expert refuses. Beside it, MoSEs' prompt-key routing (key_route).

    python router.py --run runs/see-tau0.1-qa-qg-sa-sum-trans-smollm2-135m --prompt "Translate ..."
    python router.py --run runs/see-... --task qa --index 3     # an eval query, routed step by step
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import gate
import lora
from checkpoint import resolve_dtype
from errors import UserError, user_errors
from data import load_task
from experts import NEG, NEITHER, POS, Expert, Indicators, base_model, load_system, prompt_ids
from model import Llama, generate
from runs import read_system
from tokenizer import Tokenizer

BASE = None  # the route of a query answered by the base model


@dataclass
class Routed:
    """Per query: its answer (indicator removed), the expert that answered (BASE: the base model),
    and each expert visited, newest first, with the first tokens it emitted (see reads_on)."""
    answers: list[list[int]]
    routes: list[str | None]
    visits: list[list[tuple[str, list[int]]]]


def generate_batched(model: Llama, prompts: list[list[int]], max_new_tokens: int,
                     eos_ids: list[int], batch_size: int = 16,
                     prefixes: list[list[int]] | None = None, desc: str | None = None,
                     ban: list[int] | None = None) -> list[list[int]]:
    """Greedy `generate` over many prompts, batch by batch; similar lengths share a batch."""
    longest = max(map(len, prompts), default=0)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise UserError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the "
                        f"model's context of {model.config.max_seq_len}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            for i, ids in zip(chunk, generate(model, [prompts[i] for i in chunk], max_new_tokens,
                                              eos_ids, prefixes=prefixes, ban=ban)):
                out[i] = ids
            bar.update(len(chunk))
    return out


@torch.no_grad()
def sequential_route(model: Llama, experts: list[Expert], ind: Indicators, prompts: list[list[int]],
                     max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
                     progress: bool = False) -> Routed:
    """Route each query through `experts` (in training order, attached to the model), newest first;
    an expert that does not emit o_pos stops once its first tokens spell o_neg or neither."""
    k = len(ind.pos)
    routed = Routed([[] for _ in prompts], [BASE] * len(prompts), [[] for _ in prompts])
    pending = list(range(len(prompts)))
    for expert in reversed(experts):  # newest first
        if not pending:
            break
        expert.use(model)
        desc = f"expert {expert.name}" if progress else None
        # o_pos and the answer, and at least all of o_neg
        outs = generate_batched(model, [prompts[i] for i in pending],
                                max(k + max_new_tokens, len(ind.neg)), eos_ids, batch_size,
                                [ind.pos, ind.neg], desc, ban=ind.added)
        moves_on = []
        for i, out in zip(pending, outs):
            outcome = ind.read(out)
            routed.visits[i].append((expert.name, out[:k] if outcome == POS else out))
            if outcome == POS:
                routed.answers[i], routed.routes[i] = out[k:k + max_new_tokens], expert.name
            elif outcome == NEG:  # o_neg: the next older expert is asked
                moves_on.append(i)
            # neither indicator: the base model answers at once (Sec. 3), older experts unasked
        pending = moves_on
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


# --- MoSEs' prompt-key routing: the key closest (cosine) to the query's feature picks the task

@torch.no_grad()
def key_route(model: Llama, keys: dict[str, torch.Tensor], prompts: list[list[int]],
              max_new_tokens: int, eos_ids: list[int], batch_size: int = 16,
              task: str | None = None, progress: bool = False) -> tuple[list[list[int]], list[str]]:
    """Answers and each query's task: by key or SETA's gate (TaIL), or `task` for all (TIL)."""
    routes = ([task] * len(prompts) if task
              else gate.match_keys(gate.query_features(model, prompts, batch_size), keys))
    answers: list[list[int]] = [[] for _ in prompts]
    for t in dict.fromkeys(routes):
        idx = [i for i, r in enumerate(routes) if r == t]
        lora.set_task(model, t)
        outs = generate_batched(model, [prompts[i] for i in idx], max_new_tokens, eos_ids,
                                batch_size, desc=f"task {t}" if progress else None)
        for i, out in zip(idx, outs):
            answers[i] = out
    return answers, routes


def show_route(tok: Tokenizer, ind: Indicators, names: list[str], routed: Routed) -> None:
    """Print, expert by expert from the newest, what each emitted first, then who answered what."""
    then = {POS: "it answers", NEG: "the next older expert is asked",
            NEITHER: "the base model answers at once (the exception path)"}
    for name, tokens in routed.visits[0]:
        outcome = ind.read(tokens)
        where = f"expert {names.index(name) + 1}/{len(names)} {name}"
        print(f"  {where:<24} emitted {tok.decode(tokens)!r:<14} {outcome:<8} -> {then[outcome]}")
    if routed.routes[0] is BASE and ind.read(routed.visits[0][-1][1]) == NEG:
        print(f"  {'past the oldest expert':<24} -> the base model answers")
    print(f"\nanswered by: {routed.routes[0] or 'the base model'}")
    print(f"answer: {tok.decode(routed.answers[0]).strip()}")


def main() -> None:
    p = argparse.ArgumentParser(description="Watch SEE's sequential routing: one query put to a "
                                "run's (or the given) experts, newest first, with what each "
                                "emitted and which model answered.")
    p.add_argument("--run", help="a SEE system written by train.py --sequence/--order")
    p.add_argument("--expert", action="append", default=[],
                   help="an expert directory instead of --run; repeat, oldest first")
    p.add_argument("--prompt", help="the query (the run's prompt template is applied)")
    p.add_argument("--task", help="take the query from this task's eval split instead")
    p.add_argument("--index", type=int, default=0, help="which eval query of --task (from 0)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="new tokens of the answer (default: 128)")
    p.add_argument("--data-dir",
                   help="SuperNI directory (default $SEE_DATA_DIR, else ../shared/superni)")
    args = p.parse_args()
    if (args.prompt is None) == (args.task is None) or bool(args.run) == bool(args.expert):
        p.error("give --run or --expert, and --prompt or --task (with --index)")
    with user_errors():
        dirs = args.expert
        if args.run:
            system = read_system(Path(args.run))
            if system["method"] != "see":
                raise UserError(f"{args.run} holds {system['method']}, not SEE: only SEE routes "
                                f"by indicators")
            dirs = [str(Path(args.run) / e) for e in system["experts"]]
        if args.task is None:
            query, reference = args.prompt, None
        else:
            examples = load_task(args.task, "eval", args.data_dir)
            if not 0 <= args.index < len(examples):
                raise UserError(f"--index {args.index} out of range: {args.task} has "
                                f"{len(examples)} eval queries")
            query, reference = examples[args.index].query, examples[args.index].outputs[0]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok, experts, ind, _ = load_system(None, dirs, device, resolve_dtype(None, device))
        if ind is None:
            raise UserError("these experts emit no indicators (a baseline's adapters): nothing "
                            "to route")
        prompt = prompt_ids(tok, query, experts[0].max_source, experts[0].template)
        routed = sequential_route(model, experts, ind, [prompt], args.max_new_tokens, tok.eos_ids)
        shown = query if len(query) <= 300 else query[:300] + " ..."
        print(f"query: {shown}\n")
        show_route(tok, ind, [e.name for e in experts], routed)
        if reference is not None:
            print(f"reference: {reference}")


if __name__ == "__main__":
    main()
