"""Score SEE experts (or the base model alone) on a task's eval split with ROUGE-L as Super-NaturalInstructions
computes it: rouge-score's rougeL F-measure with stemming, the best over the references, x100; and
whole continual runs with the paper's metrics: AR (Eq. 6), BWT (Eq. 7), routing F1, RB-Acc.

    python evaluate.py --expert runs/qa-smollm2-135m/expert --task qa --max-eval 100
    python evaluate.py --task qa --max-eval 100          # the base model alone, for comparison
    python evaluate.py --run runs/see-tau0.1-qa-qg-sa-sum-trans-smollm2-135m --run runs/non-rehearsal-...
    python evaluate.py --report runs/see-tau0.1-... runs/non-rehearsal-... --out docs/report.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm import tqdm

import lora
from checkpoint import atomic_write, load, model_tag, resolve_dtype
from data import OOD_EVAL, TASKS, Example, load_ood, load_task
from errors import UserError, user_errors
from experts import TEMPLATES, UNROUTED, Expert, Indicators, base_model, prompt_ids, resolve_template, setup_indicators
from model import Llama
from report import write_report
from router import BASE, generate_batched, key_route, parallel_route, sequential_route
from tokenizer import Tokenizer
from train import CONTINUED, SYSTEM_FILE

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
ROUTERS = {"sequential": sequential_route, "parallel": parallel_route}  # same decisions and answers


def rouge_l(prediction: str, references: list[str]) -> float:
    """SuperNI's ROUGE-L of one prediction: the best rougeL F-measure over its references, x100."""
    return 100 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def average_rouge(scores: list[list[float]]) -> float:
    """AR (Eq. 6): the mean ROUGE-L over all T tasks after the last stage; scores[j][i] = a_i after stage j."""
    return sum(scores[-1]) / len(scores[-1])


def backward_transfer(scores: list[list[float]]) -> float:
    """BWT (Eq. 7): the mean change on tasks 1..T-1 from just after learning them to the end; < 0 is forgetting."""
    T = len(scores)
    return sum(scores[-1][i] - scores[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else 0.0


@torch.no_grad()
def response_perplexity(model: Llama, tok: Tokenizer, prompt: list[int], prefix: list[int], response: str,
                        max_target: int = 512) -> float:
    """exp of the mean NLL of a response and EOS given the prompt and a prefix (SEE: o_pos, paper Fig. 5),
    the target cut as training cuts it: prefix and response to max_target - 1 tokens, then EOS."""
    target = (prefix + tok.encode(response, bos=False))[:max_target - 1] + [tok.eos_id]
    scored = len(target) - len(prefix)
    ids = torch.tensor([prompt + target], device=model.lm_head.weight.device)
    logits = model(ids[:, :-1])[0, -scored:]  # position j predicts token j + 1
    return math.exp(F.cross_entropy(logits.float(), ids[0, -scored:]).item())


def routing_scores(routes: list[str | None], gold: list[str | None]) -> dict:
    """Per-task routing precision, recall and F1 (a query's label: the expert that answered, None for the
    base model), their macro average over tasks, and RB-Acc: the share of queries of no task (gold None)
    that reached the base model."""
    tasks = sorted({g for g in gold if g is not None})
    per_task = {}
    for t in tasks:
        tp = sum(r == t and g == t for r, g in zip(routes, gold))
        claimed, relevant = sum(r == t for r in routes), sum(g == t for g in gold)
        p, r = tp / claimed if claimed else 0.0, tp / relevant
        per_task[t] = dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)
    ood = [r for r, g in zip(routes, gold) if g is None]
    return dict(per_task=per_task, f1=sum(v["f1"] for v in per_task.values()) / len(tasks) if tasks else None,
                rb_acc=sum(r is None for r in ood) / len(ood) if ood else None)


def routing_steps(routes: list[str | None], experts: list[str]) -> float:
    """Mean number of experts a query visits: 1 for the newest, len(experts) for the oldest or the base model."""
    steps = {name: len(experts) - i for i, name in enumerate(experts)}
    return sum(steps.get(r, len(experts)) for r in routes) / len(routes)


def evaluate_task(model: Llama, tok: Tokenizer, experts: list[Expert], ind: Indicators | None,
                  examples: list[Example], max_source: int = 1024, max_new_tokens: int = 512,
                  batch_size: int = 16, template: str = "plain", progress: bool = False,
                  task: str | None = None, routing: str = "sequential") -> tuple[dict, list[dict]]:
    """Answer every example (SEE: routed through the experts, base model last; a baseline: its one
    adapter), greedy-decode, and score.

    Returns the summary (ROUGE-L, counts, speed) and one record per example.
    """
    prompts = [prompt_ids(tok, ex.query, max_source, template) for ex in examples]
    t0 = time.perf_counter()
    if experts and experts[-1].sub is not None:  # MoSEs/SETA: the newest stage holds every task; keys (SETA: the
        experts[-1].use(model)                    # gate) pick one (TaIL), unless `task` is given (TIL)
        answers, routes = key_route(model, experts[-1].keys, prompts, max_new_tokens, tok.eos_ids, batch_size, task,
                                    progress, gate=experts[-1].sub.shared > 0)
    elif experts and ind is None:  # a baseline's adapter answers every query itself (it has no indicator to route by)
        if len(experts) > 1:
            raise UserError("adapters without indicators cannot be routed; give one of them")
        experts[0].use(model)
        answers = generate_batched(model, prompts, max_new_tokens, tok.eos_ids, batch_size, desc=experts[0].name if progress else None)
        routes = [experts[0].name] * len(prompts)
    else:
        answers, routes = ROUTERS[routing if experts else "sequential"](model, experts, ind, prompts, max_new_tokens,
                                                                        tok.eos_ids, batch_size, progress)
    seconds = time.perf_counter() - t0
    records = []
    for ex, ids, route in zip(examples, answers, routes):
        pred = tok.decode(ids).strip()
        records.append(dict(id=ex.id, prediction=pred, references=ex.outputs, rougeL=rouge_l(pred, ex.outputs),
                            route=route if route is not BASE else "base"))
    n = len(records)
    summary = dict(n=n, rougeL=sum(r["rougeL"] for r in records) / n,
                   answered_by_experts=sum(r["route"] != "base" for r in records) / n,
                   seconds=seconds, generated_tokens_per_s=sum(map(len, answers)) / seconds)
    return summary, records


def load_system(model_name: str | None, expert_dirs: list[str], device, dtype) -> tuple[Llama, Tokenizer, list[Expert], Indicators | None, str]:
    """The base model with the given experts attached (in training order)."""
    experts = [Expert.load(d) for d in expert_dirs]
    bases = {e.base_model for e in experts}
    kinds = {e.indicator for e in experts}
    if len(bases) > 1 or len(kinds) > 1 or len({(e.template, e.max_source, e.sub) for e in experts}) > 1:
        raise UserError(f"experts disagree on base model, indicator type or prompt: {sorted(bases)}, {sorted(kinds)}")
    model_name = model_name or (bases.pop() if bases else "smollm2-135m")
    model, tok = load(model_name, dtype=dtype, device=device)
    kind = kinds.pop() if experts else UNROUTED
    ind = setup_indicators(model, tok, kind) if kind != UNROUTED else None
    for e in experts:
        e.attach(model)
    return model, tok, experts, ind, model_name


def method_label(system: dict) -> str:
    """A run's name as the paper's tables print it, e.g. SEE(10%), RandSel(10%), MTL."""
    method, settings = system["method"], system["settings"]
    tau = f"{100 * settings['tau']:g}%"
    label = {"see": f"SEE({tau})", "replay": f"RandSel({tau})", "non-rehearsal": "Non-rehearsal",
             "mtl": "MTL", "stl": "AvgSTL", "moses": f"MoSEs(c={settings.get('sparsity')})",
             "seta": f"SETA(c={settings.get('sparsity')})"}[method]
    if method == "see" and settings.get("negatives") == "lima":
        label += " w/pseudo"
    if method == "see" and settings.get("indicator", "added") != "added":
        label += f" {settings['indicator']}"
    return label


def evaluate_run(run_dir: str | Path, max_eval: int | None = None, max_new_tokens: int = 512, batch_size: int = 16,
                 max_ood: int = OOD_EVAL, data_dir: str | None = None, device="cpu", dtype=torch.float32,
                 progress: bool = False, routing: str = "sequential") -> tuple[dict, list[dict]]:
    """Score a system written by train.py --sequence, and return the results and the final stage's predictions.

    Continual methods (SEE, non-rehearsal, replay, MoSEs, SETA) give the matrix scores[j][i] = a_i after
    stage j (i <= j), hence AR and BWT; MTL and STL give one row (AvgSTL: each task by its own adapter).
    The predictions carry each reference's perplexity (not for MoSEs and SETA).
    For SEE also: routing P/R/F1 over the sequence's queries, RB-Acc (the share of queries of no task
    in the sequence that reach the base model: LIMA and the held-out SuperNI tasks) and the mean
    number of experts a query visits.
    """
    run_dir = Path(run_dir)
    if not (run_dir / SYSTEM_FILE).is_file():
        raise UserError(f"{run_dir} holds no system (no {SYSTEM_FILE}); train one with train.py --sequence")
    try:
        system = json.loads((run_dir / SYSTEM_FILE).read_text())
        method, tasks, expert_dirs = system["method"], system["tasks"], system["experts"]
        label = method_label(system)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{run_dir / SYSTEM_FILE}: malformed ({type(e).__name__}: {e})") from None
    model, tok, experts, ind, _ = load_system(None, [str(run_dir / e) for e in expert_dirs], device, dtype)
    template, max_source = experts[0].template, experts[0].max_source
    evals = {t: load_task(t, "eval", data_dir)[:max_eval] for t in tasks}
    if method == "see":  # queries of no task in the sequence, for RB-Acc (read now: a missing file fails early)
        in_sequence = set(tasks) | {Path(t).stem for t in tasks}
        heldout = {"lima": load_ood(directory=data_dir)[:max_ood],
                   "superni": [ex for t, name in TASKS.items() if not {t, name} & in_sequence
                               for ex in load_task(t, "eval", data_dir)[:max_eval]]}
    T = len(tasks)
    # which adapters answer task i after stage j: SEE routes over all experts so far; the others use one adapter
    if method == "see":
        cells = {(j, i): experts[:j + 1] for j in range(T) for i in range(j + 1)}
    elif method in CONTINUED:
        cells = {(j, i): [experts[j]] for j in range(T) for i in range(j + 1)}
    else:
        cells = {(0, i): [experts[0 if method == "mtl" else i]] for i in range(T)}
    last = max(j for j, _ in cells)

    def score_matrix(til: bool) -> tuple[list[list[float]], list[dict]]:
        scores, predictions = [[] for _ in range(last + 1)], []
        for (j, i), answering in tqdm(cells.items(), desc="a_i after stage j" + " (TIL)" * til, disable=not progress):
            summary, records = evaluate_task(model, tok, answering, ind, evals[tasks[i]], max_source, max_new_tokens,
                                             batch_size, template, task=experts[i].name if til else None, routing=routing)
            scores[j].append(summary["rougeL"])
            if j == last:
                predictions += [dict(task=tasks[i], **r) for r in records]
        return scores, predictions
    scores, predictions = score_matrix(til=False)
    # Fig. 5: the reference's perplexity under what answered its query after the last stage: SEE's
    # routed expert on (q, o_pos, r), or the base model on (q, r) if none claimed it; a baseline's adapter on (q, r)
    if method not in ("moses", "seta"):
        queries = {(t, ex.id): ex.query for t in tasks for ex in evals[t]}
        for p in predictions:
            expert = next((e for e in cells[(last, tasks.index(p["task"]))] if e.name == p["route"]), None)
            with contextlib.nullcontext() if expert else base_model(model):
                if expert:
                    expert.use(model)
                prompt = prompt_ids(tok, queries[p["task"], p["id"]], max_source, template)
                p["perplexity"] = response_perplexity(model, tok, prompt, ind.pos if expert and ind else [], p["references"][0],
                                                      system["settings"].get("max_target", 512))
    result = dict(run=str(run_dir), method=method, label=label, tasks=tasks, scores=scores,
                  ar=average_rouge(scores), bwt=backward_transfer(scores) if method in ("see", *CONTINUED) else None,
                  routing_f1=None, per_task_routing=None, rb_acc=None, n_ood=None, routing_steps=None,
                  parameters=stage_parameters(model, experts))
    if method in ("see", "moses", "seta"):  # one expert (or task) per task: each query's own
        gold = [experts[tasks.index(p["task"])].name for p in predictions]
    if method in ("moses", "seta"):
        # task-agnostic (TaIL: keys or the gate pick the task) above; task-incremental (TIL: the task given) here
        til, _ = score_matrix(til=True)
        scored = routing_scores([p["route"] for p in predictions], gold)
        result.update(til_scores=til, til_ar=average_rouge(til), til_bwt=backward_transfer(til),
                      routing_f1=scored["f1"], per_task_routing=scored["per_task"],
                      task_id_accuracy=sum(p["route"] == g for p, g in zip(predictions, gold)) / len(predictions))
    if method == "see":
        # R-F1 over the sequence's own queries (as the paper scores it); RB-Acc over queries of no task.
        # Only the routing decision matters for the latter, so one token of answer is enough.
        routes = [None if p["route"] == "base" else p["route"] for p in predictions]
        rb_acc, ood_routes = {}, []
        for name, examples in heldout.items():
            prompts = [prompt_ids(tok, ex.query, max_source, template) for ex in examples]
            _, r = ROUTERS[routing](model, experts, ind, prompts, 1, tok.eos_ids, batch_size, progress)
            rb_acc[name] = routing_scores(r, [None] * len(r))["rb_acc"]
            ood_routes += r
        scored = routing_scores(routes, gold)
        result.update(routing_f1=scored["f1"], per_task_routing=scored["per_task"], rb_acc=rb_acc,
                      n_ood={k: len(v) for k, v in heldout.items()},
                      routing_steps=routing_steps(routes + ood_routes, [e.name for e in experts]))
    return result, predictions


def stage_parameters(model: Llama, experts: list[Expert]) -> list[dict]:
    """Trainable parameters of each stage; MoSEs: everything its optimizer may change (free sub-expert
    weights, as many mask scores, the key), the mask scores alone, the weights its task's mask keeps,
    those no earlier task held (new), and those held by some task so far (stored). SETA also trains its
    shared experts and every row of its gate."""
    out, held = [], 0
    for e in experts:
        if e.sub is None:
            out.append(dict(trainable=sum(v.numel() for v in (*e.adapter.values(), *e.rows.values()))))
            continue
        e.use(model)
        counts = lora.subexpert_counts(model)
        # weights and their scores, less what earlier tasks froze, the shared experts, and the key (the gate's rows)
        rows = len(e.keys) if e.sub.shared else 1
        out.append(dict(trainable=2 * counts["weights"] - held + counts["shared"] + rows * model.config.dim,
                        scores=counts["weights"], mask=counts[f"mask_{e.name}"], new=counts["used"] - held,
                        stored=counts["used"], shared=counts["shared"]))
        held = counts["used"]
    return out


def print_table(results: list[dict]) -> None:
    """The paper's Table 1 layout (a row per method: AR, BWT), with the final ROUGE-L per task and,
    for SEE, routing F1, RB-Acc on LIMA and on held-out SuperNI tasks, and mean routing steps (for
    MoSEs, R-F1 is task identification by key); then trainable parameters per stage, and MoSEs' TIL scores."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    def cell(v, fmt, scale=1):
        return "-" if v is None else format(scale * v, fmt)
    head = f"{'method':<22}" + "".join(f"{Path(t).stem[:7]:>8}" for t in tasks)
    print(f"\n{head}{'AR':>8}{'BWT':>8}{'R-F1':>8}{'RB-LIMA':>8}{'RB-SNI':>8}{'steps':>7}")
    for r in results:
        final = dict(zip(r["tasks"], r["scores"][-1]))
        rb = r["rb_acc"] or {}
        print(f"{r['label']:<22}" + "".join(f"{cell(final.get(t), '.2f'):>8}" for t in tasks)
              + f"{r['ar']:>8.2f}{cell(r['bwt'], '.2f'):>8}{cell(r['routing_f1'], '.2f', 100):>8}"
              + f"{cell(rb.get('lima'), '.1f', 100):>8}{cell(rb.get('superni'), '.1f', 100):>8}"
              + f"{cell(r['routing_steps'], '.2f'):>7}")
    for r in results:
        print(f"{r['label']}: trainable parameters per stage " + ", ".join(f"{p['trainable']:,}" for p in r["parameters"])
              + ("; weights held after each stage " + ", ".join(f"{p['stored']:,}" for p in r["parameters"])
                 if "stored" in r["parameters"][0] else "")
              + (f"; shared-expert weights {r['parameters'][0]['shared']:,} (stored with as many importances)"
                 if r["parameters"][0].get("shared") else ""))
        if "til_ar" in r:
            print(f"{r['label']}: TIL AR {r['til_ar']:.2f} BWT {r['til_bwt']:.2f}; TaIL AR {r['ar']:.2f} BWT {r['bwt']:.2f}; "
                  f"TIL-TaIL gap {r['til_ar'] - r['ar']:.2f}; task identification "
                  f"({'gate' if r['method'] == 'seta' else 'keys'}) {100 * r['task_id_accuracy']:.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description="ROUGE-L of SEE experts (or the base model) on a task's eval split, "
                                            "or the paper's metrics of whole runs (--run: the runs' own prompt, source length and model).")
    p.add_argument("--run", action="append", default=[],
                   help="a system written by train.py --sequence/--order; repeat to compare runs in one table")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN",
                   help="render the paper's tables and plots (markdown, to --out, default runs/report.md) "
                        "from runs already evaluated with --run")
    p.add_argument("--expert", action="append", default=[],
                   help="expert directory; repeat in training order for a sequence (none: the base model alone)")
    p.add_argument("--task", default=None, help="task abbreviation or SuperNI task .json file (not with --run)")
    p.add_argument("--model", default=None, help="base model (default: the experts' own, else smollm2-135m)")
    p.add_argument("--data-dir", default=None, help="SuperNI directory (default $SEE_DATA_DIR, else ../shared/superni)")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-eval", type=int, default=None, help="score only the first N examples of each task")
    p.add_argument("--max-ood", type=int, default=OOD_EVAL, help=f"LIMA queries for RB-Acc (--run; at most {OOD_EVAL}, "
                                                                 f"the rest may have been pseudo-negatives)")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="prompt (default: as the experts were trained, else auto: chat if the checkpoint has a template)")
    p.add_argument("--max-source", type=int, default=None, help="query tokens kept (default: as the experts were trained, else 1024)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the paper's target length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--routing", default="sequential", choices=list(ROUTERS),
                   help="SEE: experts one after another (the readable reference), or all in one batched pass")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and compute; default as train.py: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--out", default=None, help="result JSON (default: beside the first expert, or runs/base-<model>/; "
                                               "with --run: <run>/eval.json)")
    args = p.parse_args()
    if args.report:
        if args.run or args.task or args.expert:
            p.error("--report reads evaluated runs; give it alone")
        with user_errors():
            print(write_report(args.report, args.out or "runs/report.md"))
        return
    if bool(args.run) == bool(args.task) or (args.run and args.expert):
        p.error("give --task (with --expert or alone, for the base model) or --run, not both")
    with user_errors():
        if args.batch_size < 1 or (args.max_eval is not None and args.max_eval < 1) or args.max_ood < 0:
            raise UserError("--batch-size and --max-eval must be positive, --max-ood not negative")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(args.dtype, device)
        if args.run:
            evaluate_runs(args, device, dtype)
        else:
            evaluate_experts(args, device, dtype)


def evaluate_runs(args: argparse.Namespace, device, dtype) -> None:
    results = []
    for run in args.run:
        result, predictions = evaluate_run(run, args.max_eval, args.max_new_tokens, args.batch_size, args.max_ood,
                                           args.data_dir, device, dtype, progress=True, routing=args.routing)
        result.update(max_eval=args.max_eval, max_new_tokens=args.max_new_tokens, dtype=str(dtype).removeprefix("torch."))
        out = Path(args.out if args.out and len(args.run) == 1 else Path(run) / "eval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        preds = out.with_suffix(".predictions.jsonl")
        atomic_write(preds, lambda f: f.write_text("".join(json.dumps(r) + "\n" for r in predictions)))
        atomic_write(out, lambda f: f.write_text(json.dumps(dict(result, predictions=str(preds)), indent=2) + "\n"))
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
    summary, records = evaluate_task(model, tok, experts, ind, examples, max_source, args.max_new_tokens,
                                     args.batch_size, template, progress=True, routing=args.routing)
    task = Path(args.task).stem
    out = Path(args.out or (Path(args.expert[0]).parent if args.expert else
                            Path("runs") / f"base-{model_tag(model_name)}") / f"eval-{task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    preds = out.with_suffix(".predictions.jsonl")
    atomic_write(preds, lambda f: f.write_text("".join(json.dumps(r) + "\n" for r in records)))
    result = dict(task=args.task, split=args.split, model=model_name, experts=args.expert, template=template, **summary,
                  max_new_tokens=args.max_new_tokens, dtype=str(dtype).removeprefix("torch."), predictions=str(preds))
    atomic_write(out, lambda f: f.write_text(json.dumps(result, indent=2) + "\n"))
    who = ", ".join(e.name for e in experts) or "base model"
    print(f"\n{'system':<24} {'task':<8} {'n':>5} {'ROUGE-L':>8} {'by experts':>10}")
    print(f"{who:<24} {task:<8} {summary['n']:>5} {summary['rougeL']:>8.2f} {summary['answered_by_experts']:>10.0%}")
    print(f"results: {out}\npredictions: {preds}")


if __name__ == "__main__":
    main()
