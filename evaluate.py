"""Score SEE experts (or the base model alone) on a task's eval split with SuperNI's ROUGE-L, and
whole continual runs with the paper's metrics: AR (Eq. 6), BWT (Eq. 7), routing F1, RB-Acc.

    python evaluate.py --expert runs/qa-smollm2-135m/expert --task qa --max-eval 100
    python evaluate.py --task qa --max-eval 100          # the base model alone, for comparison
    python evaluate.py --run runs/see-tau0.1-qa-qg-sa-sum-trans-smollm2-135m \
                       --run runs/non-rehearsal-qa-qg-sa-sum-trans-smollm2-135m
    python evaluate.py --report runs/see-tau0.1-... runs/non-rehearsal-... --out docs/report.md"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import gate
from artifacts import check_writable, digest, read_json, seal
from checkpoint import atomic_write, device_name, exclusive, model_tag, resolve_dtype
from data import OOD_EVAL, TASKS, XLINGUAL, Example, data_dir, load_ood, load_task
from errors import UserError, user_errors
from experts import (TEMPLATES, Expert, Indicators, SubExpert, base_model, load_system, prompt_ids,
                     resolve_template)
from metrics import (XLINGUAL_TOKENS, average_rouge, backward_transfer, response_perplexity,
                     rouge_l, routing_cost, routing_scores)
from model import Llama
from report import print_table, write_report
from router import BASE, base_answers, generate_batched, key_route, sequential_route
from runs import LOG_FILE, METHODS, Method, read_log, read_system
from tokenizer import Tokenizer


@dataclass
class Scoring:
    """A loaded system and how its answers are scored: what the evaluation's parts share."""
    model: Llama
    tok: Tokenizer
    experts: list[Expert]
    ind: Indicators | None
    evals: dict[str, list[Example]]  # each task's eval examples, in the sequence's order
    max_source: int
    template: str
    max_new_tokens: int
    batch_size: int
    routing: str = "sequential"
    progress: bool = False

    def prompts(self, queries: list[str]) -> list[list[int]]:
        return [prompt_ids(self.tok, q, self.max_source, self.template) for q in queries]


def evaluate_task(s: Scoring, experts: list[Expert], examples: list[Example],
                  task: str | None = None, xlingual: bool = False) -> tuple[dict, list[dict]]:
    """Answer and score every example: a summary (ROUGE-L, speed, routing cost), a record each."""
    model, tok, ind = s.model, s.tok, s.ind
    prompts = s.prompts([ex.query for ex in examples])
    t0 = time.perf_counter()
    routed = None
    if experts and isinstance(experts[-1], SubExpert):  # the newest stage holds every task
        experts[-1].use(model)
        answers, routes = key_route(model, experts[-1].keys, prompts, s.max_new_tokens,
                                    tok.eos_ids, s.batch_size, task, s.progress)
    elif experts and (ind is None or s.routing == "none"):  # one adapter answers every query
        if len(experts) > 1:
            raise UserError("without routing one adapter answers every query; give one of them")
        experts[0].use(model)
        forced = ind.pos if ind else []  # SEE without routing: o_pos forced
        answers = generate_batched(model, [q + forced for q in prompts], s.max_new_tokens,
                                   tok.eos_ids, s.batch_size, ban=ind.added if ind else None,
                                   desc=experts[0].name if s.progress else None)
        routes = [experts[0].name] * len(prompts)
    elif experts:
        routed = sequential_route(model, experts, ind, prompts, s.max_new_tokens, tok.eos_ids,
                                  s.batch_size, s.progress)
        answers, routes = routed.answers, routed.routes
    else:
        answers, routes = [[] for _ in prompts], [BASE] * len(prompts)
        base_answers(model, prompts, list(range(len(prompts))), answers, s.max_new_tokens,
                     tok.eos_ids, s.batch_size, s.progress)
    seconds = time.perf_counter() - t0
    records = []
    for n, (ex, ids, route) in enumerate(zip(examples, answers, routes)):
        pred = tok.decode(ids).strip()
        records.append(dict(id=ex.id, prediction=pred, references=ex.outputs,
                            rougeL=rouge_l(pred, ex.outputs, xlingual),
                            route=route if route is not BASE else "base"))
        if routed is not None:
            records[-1]["visits"] = [[name, ind.read(t)] for name, t in routed.visits[n]]
    n = len(records)
    summary = dict(n=n, rougeL=sum(r["rougeL"] for r in records) / n,
                   answered_by_experts=sum(r["route"] != "base" for r in records) / n,
                   seconds=seconds, generated_tokens_per_s=sum(map(len, answers)) / seconds)
    if routed is not None:
        outcomes = [[ind.read(t) for _, t in v] for v in routed.visits]
        summary.update(routing_cost(outcomes, [r is BASE for r in routed.routes]))
    return summary, records


def method_label(system: dict) -> str:
    """A run's name as the paper's tables print it, e.g. SEE(10%), RandSel(10%), MTL."""
    method, settings = METHODS[system["method"]], system["settings"]
    label = method.label.format(tau=f"{100 * settings['tau']:g}%", sparsity=settings["sparsity"])
    if method.routes and settings["negatives"] == "lima":
        label += " w/pseudo"
    if method.routes and settings["general_negatives"]:
        label += f" +{settings['general_negatives']} general neg."
    if method.routes and settings["indicator"] != "added":
        label += f" {settings['indicator']}"
    elif method.routes and settings["indicator_lr"] == "adapter":  # issue 28 item 1a
        label += " ind. lr = adapter's"
    return label


def evaluate_run(run_dir: str | Path, max_eval: int | None = None, max_new_tokens: int = 512,
                 batch_size: int = 16, max_ood: int = OOD_EVAL, data_dir: str | None = None,
                 device="cpu", dtype=torch.float32, progress: bool = False,
                 routing: str = "sequential") -> tuple[dict, list[dict]]:
    """Score a system of train.py --sequence: results and final-stage predictions. Continual methods
    give scores[j][i] = a_i after stage j (AR, BWT); MTL, STL, SEE with routing "none" one row."""
    run_dir = Path(run_dir)
    system = read_system(run_dir)
    method, tasks = METHODS[system["method"]], system["tasks"]
    if routing == "none" and not method.routes:
        raise UserError(f"--routing none is for SEE runs; {run_dir} holds {system['method']}")
    dirs = [str(run_dir / e) for e in system["experts"]]
    model, tok, experts, ind, _ = load_system(None, dirs, device, dtype)
    evals = {t: load_task(t, "eval", data_dir)[:max_eval] for t in tasks}
    s = Scoring(model, tok, experts, ind, evals, experts[0].max_source, experts[0].template,
                max_new_tokens, batch_size, routing, progress)
    routed = method.routes and routing != "none"
    if routed:  # queries of no task in the sequence, for RB-Acc (read now: a missing file fails)
        in_sequence = set(tasks) | {Path(t).stem for t in tasks}
        heldout = {"lima": load_ood(directory=data_dir)[:max_ood],
                   "superni": [ex for t, name in TASKS.items() if not {t, name} & in_sequence
                               for ex in load_task(t, "eval", data_dir)[:max_eval]]}
    cells = answering(method, experts, len(tasks), routed)
    scores, predictions = score_matrix(s, cells, til=False)
    if not method.sparse:
        add_perplexities(s, predictions, system["settings"]["max_target"])
    label = method_label(system)
    if routing == "none":
        label += " own-expert"  # not Fig. 4's SEE-AE (general.py): each task to its own expert
    result = dict(run=str(run_dir), method=system["method"], label=label, tasks=tasks,
                  scores=scores, ar=average_rouge(scores),
                  bwt=backward_transfer(scores) if routed or method.continues else None,
                  routing_f1=None, per_task_routing=None, rb_acc=None, ood_routes=None, n_ood=None,
                  routing_steps=None, routing=routing, parameters=[e.counts for e in experts])
    if any(Path(t).stem in XLINGUAL for t in tasks):
        result["xlingual_tokenizer"] = XLINGUAL_TOKENS.name
    if method.sparse:
        result.update(til_metrics(s, cells, predictions))
    if routed:
        result.update(routing_metrics(s, heldout, predictions))
    return result, predictions


def answering(method: Method, experts: list[Expert], T: int,
              routed: bool) -> dict[tuple[int, int], list[Expert]]:
    """Which adapters answer task i after stage j; one row if not continual (MTL, AvgSTL)."""
    if routed:
        return {(j, i): experts[:j + 1] for j in range(T) for i in range(j + 1)}
    if method.continues:
        return {(j, i): [experts[j]] for j in range(T) for i in range(j + 1)}
    return {(0, i): [experts[0 if method.joint else i]] for i in range(T)}


def score_matrix(s: Scoring, cells: dict[tuple[int, int], list[Expert]],
                 til: bool) -> tuple[list[list[float]], list[dict]]:
    """scores[j][i] = a_i after stage j, and the last stage's predictions; `til`: the task given."""
    last = max(j for j, _ in cells)
    scores, predictions = [[] for _ in range(last + 1)], []
    desc = "a_i after stage j" + " (TIL)" * til
    quiet = replace(s, progress=False)  # one bar over the cells, none per cell
    for (j, i), experts in tqdm(cells.items(), desc=desc, disable=not s.progress):
        task = list(s.evals)[i]
        summary, records = evaluate_task(quiet, experts, s.evals[task],
                                         s.experts[i].name if til else None,
                                         Path(task).stem in XLINGUAL)
        scores[j].append(summary["rougeL"])
        if j == last:
            predictions += [dict(task=task, **r) for r in records]
    return scores, predictions


def gold_routes(s: Scoring, predictions: list[dict]) -> list[str]:
    """Each prediction's own expert (MoSEs/SETA: its own task), as routing should pick it."""
    return [s.experts[list(s.evals).index(p["task"])].name for p in predictions]


def final_prompts(s: Scoring, predictions: list[dict]) -> list[list[int]]:
    """The prompt of each of the final stage's predictions."""
    queries = {(t, ex.id): ex.query for t, examples in s.evals.items() for ex in examples}
    return s.prompts([queries[p["task"], p["id"]] for p in predictions])


def add_perplexities(s: Scoring, predictions: list[dict], max_target: int) -> None:
    """Fig. 5: each reference's perplexity under what answered its query after the last stage: SEE's
    expert on (q, o_pos, r), the base model on (q, r) if none claimed it, a baseline's on (q, r)."""
    for p, prompt in zip(predictions, final_prompts(s, predictions)):
        expert = next((e for e in s.experts if e.name == p["route"]), None)
        with contextlib.nullcontext() if expert else base_model(s.model):
            if expert:
                expert.use(s.model)
            prefix = s.ind.pos if expert and s.ind else []
            p["perplexity"] = response_perplexity(s.model, s.tok, prompt, prefix,
                                                  p["references"][0], max_target)


def til_metrics(s: Scoring, cells: dict, predictions: list[dict]) -> dict:
    """MoSEs/SETA: the task-incremental (TIL: the task given) scores beside the task-agnostic ones
    (TaIL: keys or the gate pick it), how well it was picked, and by SETA's gate as imprinted."""
    til, _ = score_matrix(s, cells, til=True)
    gold = gold_routes(s, predictions)
    scored = routing_scores([p["route"] for p in predictions], gold)
    imprinted = None
    if s.experts[-1].imprints:
        features = gate.query_features(s.model, final_prompts(s, predictions), s.batch_size)
        routes = gate.match_keys(features, s.experts[-1].imprints)
        imprinted = sum(r == g for r, g in zip(routes, gold)) / len(gold)
    picked = sum(p["route"] == g for p, g in zip(predictions, gold)) / len(predictions)
    return dict(til_scores=til, til_ar=average_rouge(til), til_bwt=backward_transfer(til),
                routing_f1=scored["f1"], per_task_routing=scored["per_task"],
                task_id_accuracy=picked, imprinted_accuracy=imprinted)


def routing_metrics(s: Scoring, heldout: dict[str, list[Example]], predictions: list[dict]) -> dict:
    """Routed SEE: routing P/R/F1 on the sequence's queries; RB-Acc and who answered on each OOD set
    (one answer token: only routing matters); the routing cost on "tasks", each such set and all."""
    routes = [None if p["route"] == "base" else p["route"] for p in predictions]
    scored = routing_scores(routes, gold_routes(s, predictions))
    outcomes = {"tasks": [[o for _, o in p["visits"]] for p in predictions]}
    to_base = {"tasks": [r is BASE for r in routes]}
    rb_acc, ood_routes = {}, {}
    for name, examples in heldout.items():
        r = sequential_route(s.model, s.experts, s.ind, s.prompts([ex.query for ex in examples]), 1,
                             s.tok.eos_ids, s.batch_size, s.progress)
        rb_acc[name] = routing_scores(r.routes, [None] * len(r.routes))["rb_acc"]
        ood_routes[name] = dict(Counter("base" if route is BASE else route for route in r.routes))
        outcomes[name] = [[s.ind.read(t) for _, t in v] for v in r.visits]
        to_base[name] = [route is BASE for route in r.routes]
    everything = routing_cost(sum(outcomes.values(), []), sum(to_base.values(), []))
    exceptions = {k: routing_cost(outcomes[k], to_base[k])["exceptions"] for k in outcomes}
    return dict(routing_f1=scored["f1"], per_task_routing=scored["per_task"], rb_acc=rb_acc,
                ood_routes=ood_routes, n_ood={k: len(v) for k, v in heldout.items()},
                exceptions=exceptions,
                routing_steps=everything["visited"], prefills=everything["prefills"])


def main() -> None:
    p = argparse.ArgumentParser(description="ROUGE-L of SEE experts (or the base model) on a task's"
                                " eval split, or the paper's metrics of whole runs (--run: the "
                                "runs' own prompt, source length and model).")
    p.add_argument("--run", action="append", default=[], help="a system written by train.py "
                   "--sequence/--order; repeat to compare runs in one table")
    p.add_argument("--report", nargs="+", metavar="RUN", help="render the paper's tables and plots "
                   "(markdown, to --out, default runs/report.md) from runs already evaluated with "
                   "--run")
    p.add_argument("--expert", action="append", default=[], help="expert directory; repeat in "
                   "training order for a sequence (none: the base model alone)")
    p.add_argument("--task", help="task abbreviation or SuperNI task .json file (not with --run)")
    p.add_argument("--model", help="base model (default: the experts' own, else smollm2-135m)")
    p.add_argument("--data-dir",
                   help="SuperNI directory (default $SEE_DATA_DIR, else ../shared/superni)")
    p.add_argument("--split", default="eval", help="the split to score: eval (default) or train")
    p.add_argument("--max-eval", type=int, help="score only the first N examples of each task "
                   "(default: all), and as many out-of-distribution queries per set")
    p.add_argument("--max-ood", type=int, help=f"LIMA queries for RB-Acc (--run; default: "
                   f"--max-eval's, at most {OOD_EVAL}: the rest may have been pseudo-negatives)")
    p.add_argument("--template", choices=list(TEMPLATES), help="prompt (default: as the experts "
                   "were trained, else auto: chat if the checkpoint has a template)")
    p.add_argument("--max-source", type=int,
                   help="query tokens kept (default: as the experts were trained, else 1024)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="new tokens per answer "
                   "(default: 512, the paper's target length; 64 is enough for a look)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="queries generated at once (default: 16)")
    p.add_argument("--routing", default="sequential", choices=("sequential", "none"),
                   help="SEE: sequential (default): experts newest first, as the paper, or none: "
                   "one expert answers every query with its o_pos forced (--run: each task by its "
                   "own expert)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights and compute; default "
                   "as train.py: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--out", help="result JSON (default: beside the first expert, or "
                   "runs/base-<model>/; with --run: <run>/eval.json, eval-expert-only.json for "
                   "--routing none)")
    args = p.parse_args()
    if args.max_ood is None:  # a quick look stays quick: --max-eval caps every set scored
        args.max_ood = min(args.max_eval or OOD_EVAL, OOD_EVAL)
    if args.report:
        if args.run or args.task or args.expert:
            p.error("--report reads evaluated runs; give it alone")
        with user_errors():
            print(write_report(args.report, args.out or "runs/report.md"))
        return
    if bool(args.run) == bool(args.task) or (args.run and args.expert):
        p.error("give --task (with --expert or alone, for the base model) or --run, not both")
    if args.run and (args.model or args.template or args.max_source or args.split != "eval"):
        p.error("--run scores eval splits with the run's own model, prompt and source length; "
                "drop --model, --template, --max-source and --split")
    with user_errors():
        check_args(args)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(args.dtype, device)
        (evaluate_runs if args.run else evaluate_experts)(args, device, dtype)


def variant(args: argparse.Namespace) -> str:
    """The result file's suffix for settings that change what is measured."""
    return "-expert-only" if args.routing == "none" else ""


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible evaluation settings before any model loads."""
    counts = {"--batch-size": args.batch_size, "--max-new-tokens": args.max_new_tokens,
              "--max-eval": args.max_eval, "--max-source": args.max_source}
    bad = [f"{flag} {v}" for flag, v in counts.items() if v is not None and v < 1]
    if bad or args.max_ood < 0:
        raise UserError(f"need positive counts and --max-ood >= 0, got "
                        f"{', '.join(bad) or f'--max-ood {args.max_ood}'}")


def measured(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Settings that change what an evaluation measures (check_result compares them)."""
    return dict(max_eval=args.max_eval, max_new_tokens=args.max_new_tokens, routing=args.routing,
                dtype=str(dtype).removeprefix("torch."),
                data_dir=str(data_dir(args.data_dir).resolve()))


def check_result(out: Path, settings: dict) -> None:
    """Before any generation: `out` can be written and holds no result of other settings."""
    check_writable(out)
    if out.is_file():
        old = read_json(out)
        if "max_new_tokens" not in old:  # a run's own files (system.json, expert.json) among them
            raise UserError(f"{out} is not a result of evaluate.py; pass another --out")
        changed = sorted(k for k in settings if k in old and old[k] != settings[k])
        if changed:
            changes = ", ".join(f"{k}: {old[k]} -> {settings[k]}" for k in changed)
            raise UserError(f"{out} holds results of other settings ({changes}); pass another "
                            f"--out or delete it")


def write_result(out: Path, result: dict, records: list[dict]) -> Path:
    """The result JSON, and its predictions beside it (returned), each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    preds = out.with_suffix(".predictions.jsonl")
    atomic_write(preds, lambda f: f.write_text("".join(json.dumps(r) + "\n" for r in records)))
    result = seal(dict(result, predictions=str(preds), predictions_sha256=digest(preds)))
    try:
        atomic_write(out, lambda f: f.write_text(json.dumps(result, indent=2) + "\n"))
    except BaseException:  # a full disk: no predictions without their result
        preds.unlink()
        raise
    return preds


def evaluate_runs(args: argparse.Namespace, device, dtype) -> None:
    results = []
    outs = [Path(args.out) if args.out and len(args.run) == 1
            else Path(run) / f"eval{variant(args)}.json" for run in args.run]
    settings = dict(measured(args, dtype), max_ood=args.max_ood)
    with contextlib.ExitStack() as held:
        for out in {out.parent: out for out in outs}.values():
            held.enter_context(exclusive(out))
        for out in outs:
            check_result(out, settings)
        for run, out in zip(args.run, outs):
            t0 = time.perf_counter()
            result, predictions = evaluate_run(run, args.max_eval, args.max_new_tokens,
                                               args.batch_size, args.max_ood, args.data_dir,
                                               device, dtype, progress=True, routing=args.routing)
            stages = [Path(run) / Path(e).parent for e in read_system(Path(run))["experts"]]
            logs = [json.loads(line) for d in stages for line in read_log(d / LOG_FILE, None)]
            result.update(settings, device=device_name(device),
                          eval_seconds=time.perf_counter() - t0,
                          train_seconds=sum(log["seconds"] for log in logs))
            preds = write_result(out, result, predictions)
            results.append(result)
            print(f"{result['label']}: results {out}, final-stage predictions {preds}")
    print_table(results)


def evaluate_experts(args: argparse.Namespace, device, dtype) -> None:
    examples = load_task(args.task, args.split, args.data_dir)[:args.max_eval]
    if not examples:
        raise UserError(f"no {args.split} examples for {args.task}")
    model, tok, experts, ind, model_name = load_system(args.model, args.expert, device, dtype)
    max_source = args.max_source or (experts[0].max_source if experts else 1024)
    template = resolve_template(tok, args.template or (experts[0].template if experts else "auto"))
    task = Path(args.task).stem
    base_dir = Path(f"runs/base-{model_tag(model_name)}")
    beside = Path(args.expert[0]).parent if args.expert else base_dir
    out = Path(args.out or beside / f"eval-{task}{variant(args)}.json")
    settings = dict(task=args.task, split=args.split, model=model_name, experts=args.expert,
                    template=template, max_source=max_source, **measured(args, dtype))
    with exclusive(out):
        check_result(out, settings)
        s = Scoring(model, tok, experts, ind, {args.task: examples}, max_source, template,
                    args.max_new_tokens, args.batch_size, args.routing, progress=True)
        summary, records = evaluate_task(s, experts, examples, xlingual=task in XLINGUAL)
        result = dict(**settings, **summary)
        if task in XLINGUAL:
            result["xlingual_tokenizer"] = XLINGUAL_TOKENS.name
        preds = write_result(out, result, records)
    who = ", ".join(e.name for e in experts) or "base model"
    # exceptions: queries that met an expert emitting neither indicator (the base model answered)
    print(f"\n{'system':<24} {'task':<8} {'n':>5} {'ROUGE-L':>8} {'by experts':>10} {'except':>7}")
    print(f"{who:<24} {task:<8} {summary['n']:>5} {summary['rougeL']:>8.2f} "
          f"{summary['answered_by_experts']:>10.0%} {summary.get('exceptions', '-'):>7}")
    print(f"results: {out}\npredictions: {preds}")


if __name__ == "__main__":
    main()
