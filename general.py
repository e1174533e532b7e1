"""General ability (paper Fig. 4): zero-shot MMLU accuracy, each question scored by which option
letter the model finds likeliest next, for the base model and for continual runs. SEE is scored
routed (as it serves) and as SEE-AE: each expert on every question with o_pos forced, averaged.

    python general.py --mmlu ../data/mmlu --per-subject 10 --run runs/a1-see --run runs/a1-mtl
"""
from __future__ import annotations

import argparse
import csv
import io
import os
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from artifacts import read_text
from checkpoint import model_tag, resolve_dtype
from errors import UserError, user_errors
from evaluate import method_label
from experts import SubExpert, base_model, load_system, prompt_ids, resolve_template
from model import Llama
from router import BASE, sequential_route
from runs import METHODS, read_system, write_json

LETTERS = "ABCD"
MMLU_ENV = "SEE_MMLU_DIR"


def load_mmlu(directory: str | Path, per_subject: int | None) -> list[tuple[str, int]]:
    """(query, index of the right option) for the first `per_subject` questions of each subject
    in <directory>/test/<subject>_test.csv (hendrycks/test's rows: question, A, B, C, D, answer;
    or the Hub export's: a header line, then answers 0-3), put as its evaluation script puts
    them, zero-shot."""
    files = sorted(Path(directory).glob("test/*_test.csv"))
    if not files:
        raise UserError(f"{directory}: no MMLU test/<subject>_test.csv files")
    items = []
    for path in files:
        subject = path.name.removesuffix("_test.csv").replace("_", " ")
        rows = list(csv.reader(io.StringIO(read_text(path))))
        header = rows[:1] == [["question", "choice0", "choice1", "choice2", "choice3", "answer"]]
        answers = "0123" if header else LETTERS
        for n, row in enumerate(rows[header:][:per_subject], 1 + header):
            if len(row) != 6 or len(row[5]) != 1 or row[5] not in answers:
                raise UserError(f"{path}:{n}: need question,A,B,C,D,answer (one of {answers})")
            options = "".join(f"{k}. {v}\n" for k, v in zip(LETTERS, row[1:5]))
            query = (f"The following are multiple choice questions (with answers) about "
                     f"{subject}.\n\n{row[0]}\n{options}Answer:")
            items.append((query, answers.index(row[5])))
    return items


@torch.no_grad()
def choices(model: Llama, tok, prompts: list[list[int]], batch_size: int = 16,
            desc: str | None = None) -> list[int]:
    """The option each prompt's next token favours: the larger logit of "A" or " A", and so on
    (a progress bar named `desc`, if given)."""
    ids = torch.tensor([tok.encode(v, bos=False)[-1] for k in LETTERS for v in (k, " " + k)])
    device = model.lm_head.weight.device
    picks = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        chunk = prompts[s:s + batch_size]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        for i, p in enumerate(chunk):
            x[i, :len(p)] = torch.tensor(p)  # right padding: causal attention keeps it out
        last = torch.tensor([len(p) - 1 for p in chunk])
        logits = model.head(model.hidden(x.to(device))[torch.arange(len(chunk)), last.to(device)])
        picks += logits[:, ids.to(device)].view(len(chunk), 4, 2).amax(-1).argmax(-1).tolist()
    return picks


def accuracy(picks: list[int], gold: list[int]) -> float:
    return 100 * sum(p == g for p, g in zip(picks, gold)) / len(gold)


def score_run(run: str | Path | None, items: list[tuple[str, int]], model_name: str | None,
              batch_size: int, device, dtype) -> dict:
    """Accuracy of the base model and, given a run, of its final system (SEE: routed, and SEE-AE
    with each expert's accuracy; the others: the last stage's adapter)."""
    system = read_system(Path(run)) if run else None
    method = METHODS[system["method"]] if system else None
    dirs = [str(Path(run) / e) for e in system["experts"]] if system else []
    model, tok, experts, ind, name = load_system(model_name, dirs, device, dtype)
    if experts and isinstance(experts[-1], SubExpert):
        raise UserError(f"{run}: MoSEs and SETA are not scored on MMLU yet")
    template = resolve_template(tok, experts[0].template if experts else "auto")
    max_source = experts[0].max_source if experts else 1024
    prompts = [prompt_ids(tok, q, max_source, template) for q, _ in items]
    gold = [g for _, g in items]
    with base_model(model):
        base = choices(model, tok, prompts, batch_size, "base model")
    result = dict(run=str(run) if run else None, model=name, n=len(items),
                  base=accuracy(base, gold))
    if not experts:
        return result
    if not method.routes:  # one adapter serves after the last stage
        experts[-1].use(model)
        result["final"] = accuracy(choices(model, tok, prompts, batch_size, experts[-1].name),
                                   gold)
        return result
    picks = {}
    for e in experts:  # SEE-AE: o_pos forced, so each expert answers every question
        e.use(model)
        picks[e.name] = choices(model, tok, [p + ind.pos for p in prompts], batch_size,
                                f"expert {e.name}")
    routes = sequential_route(model, experts, ind, prompts, len(ind.pos), tok.eos_ids,
                              batch_size, progress=True).routes
    routed = [base[i] if r is BASE else picks[r][i] for i, r in enumerate(routes)]
    result.update(final=accuracy(routed, gold),
                  experts={k: accuracy(v, gold) for k, v in picks.items()},
                  ae=sum(accuracy(v, gold) for v in picks.values()) / len(picks),
                  routes=dict(Counter("base" if r is BASE else r for r in routes)))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="Zero-shot MMLU accuracy (paper Fig. 4) of the base "
                                "model and of continual runs; SEE also as SEE-AE.")
    p.add_argument("--run", action="append", default=[], help="a system written by train.py "
                   "--sequence/--order; repeat for a table (none: the base model alone)")
    p.add_argument("--mmlu", default=os.environ.get(MMLU_ENV), help=f"MMLU directory, holding "
                   f"test/<subject>_test.csv (default ${MMLU_ENV})")
    p.add_argument("--per-subject", type=int, default=10,
                   help="questions scored per subject, the first N (default: 10, 570 in all)")
    p.add_argument("--model", help="base model without --run (default: smollm2-135m)")
    p.add_argument("--batch-size", type=int, default=16, help="questions at once (default: 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default as train.py")
    args = p.parse_args()
    with user_errors():
        if not args.mmlu or args.per_subject < 1:
            raise UserError("need --mmlu DIR (or $SEE_MMLU_DIR) and --per-subject >= 1")
        items = load_mmlu(args.mmlu, args.per_subject)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(args.dtype, device)
        print(f"{'system':<40} {'n':>5} {'accuracy':>8} {'SEE-AE':>7} {'base':>6}")
        for run in args.run or [None]:
            r = score_run(run, items, args.model, args.batch_size, device, dtype)
            r.update(per_subject=args.per_subject, dtype=str(dtype).removeprefix("torch."))
            out = Path(run or f"runs/base-{model_tag(r['model'])}") / "mmlu.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, r)
            ae = f"{r['ae']:.2f}" if "ae" in r else "-"
            label = method_label(read_system(Path(run))) if run else f"base {r['model']}"
            print(f"{label:<40} {r['n']:>5} {r.get('final', r['base']):>8.2f} "
                  f"{ae:>7} {r['base']:>6.2f}")


if __name__ == "__main__":
    main()
