"""Score SEE experts (or the base model alone) on a task's eval split with ROUGE-L as
Super-NaturalInstructions computes it: rouge-score's rougeL F-measure with stemming, the
best over the references, x100; and whole continual runs with the paper's metrics: AR (Eq.
6), BWT (Eq. 7), routing F1, RB-Acc.

    python evaluate.py --expert runs/qa-smollm2-135m/expert --task qa --max-eval 100
    python evaluate.py --task qa --max-eval 100          # the base model alone, for comparison
    python evaluate.py --run runs/see-tau0.1-qa-qg-sa-sum-trans-smollm2-135m \
                       --run runs/non-rehearsal-qa-qg-sa-sum-trans-smollm2-135m
    python evaluate.py --report runs/see-tau0.1-... runs/non-rehearsal-... --out docs/report.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm import tqdm

import lora
from artifacts import check_writable, read_json
from checkpoint import atomic_write, device_name, model_tag, resolve_dtype
from data import OOD_EVAL, TASKS, XLINGUAL, Example, load_ood, load_task
from errors import UserError, user_errors
from experts import (NEITHER, TEMPLATES, Expert, Indicators, SubExpert,
                     base_model, load_system, prompt_ids, resolve_template)
from model import Llama
from report import write_report
from router import BASE, generate_batched, key_route, sequential_route
from tokenizer import Tokenizer
from runs import LOG_FILE, METHODS, Method, read_log, read_system

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
# --routing none: no routing, one expert answers every query with its o_pos
# forced (paper Fig. 4, SEE-AE)
ROUTINGS = ("sequential", "none")
XLINGUAL_ENV = "SEE_XLINGUAL_TOKENIZER"  # a tokenizer.json to use instead of GPT-2's from the hub
# GPT-2's pre-tokenizer (words, numbers, other symbols, each with its
# leading space), for Unicode text
_GPT2_SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


class XlingualTokens:
    """Super-NaturalInstructions' tokens for its cross-lingual tasks (their "xlingual" track):
    GPT-2's byte-level BPE tokens with the leading-space mark "Ġ" stripped, case kept, no stemming.
    rouge-score's default tokenizer keeps only [a-z0-9], so "más" and "mas" would share no token.

    GPT-2's tokenizer comes from $SEE_XLINGUAL_TOKENIZER or the hub (cached); where neither can be
    had, its pre-tokenizer's words are used without the BPE merges, and `name` says so."""

    def __init__(self) -> None:
        self.name, self._bpe = None, None

    def _load(self) -> None:
        path = os.environ.get(XLINGUAL_ENV)
        try:
            from tokenizers import Tokenizer as BPE
            if not path:
                from huggingface_hub import hf_hub_download
                path = hf_hub_download("openai-community/gpt2", "tokenizer.json")
            self._bpe, self.name = BPE.from_file(str(path)), str(path)
        except Exception as e:  # no `tokenizers`, offline, or a bad file
            if os.environ.get(XLINGUAL_ENV):
                raise UserError(f"${XLINGUAL_ENV}={path}: not a tokenizer.json "
                                f"({type(e).__name__})") from None
            self.name = "gpt2-pretokenizer (GPT-2's tokenizer unreachable: words, no BPE merges)"
            print(f"note: xlingual ROUGE-L uses {self.name}")

    def tokenize(self, text: str) -> list[str]:
        if self.name is None:
            self._load()
        tokens = self._bpe.encode(text).tokens if self._bpe else _GPT2_SPLIT.findall(text)
        return [t for t in (t.lstrip("Ġ ") for t in tokens) if t]


XLINGUAL_TOKENS = XlingualTokens()
_XLINGUAL_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=XLINGUAL_TOKENS)


def rouge_l(prediction: str, references: list[str], xlingual: bool = False) -> float:
    """SuperNI's ROUGE-L of one prediction: the best rougeL F-measure over its references, x100;
    `xlingual` for non-English references, as SuperNI's compute_metrics scores them."""
    scorer = _XLINGUAL_SCORER if xlingual else _SCORER
    return 100 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def average_rouge(scores: list[list[float]]) -> float:
    """AR (Eq. 6): the mean ROUGE-L over all T tasks after the last stage; scores[j][i] = a_i
    after stage j."""
    return sum(scores[-1]) / len(scores[-1])


def backward_transfer(scores: list[list[float]]) -> float:
    """BWT (Eq. 7): the mean change on tasks 1..T-1 from just after learning them to the end; < 0
    is forgetting."""
    T = len(scores)
    return sum(scores[-1][i] - scores[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else 0.0


@torch.no_grad()
def response_perplexity(model: Llama, tok: Tokenizer, prompt: list[int], prefix: list[int],
                        response: str, max_target: int = 512) -> float:
    """exp of the mean NLL of a response and EOS given the prompt and a prefix (SEE:
    o_pos, paper Fig. 5), the target cut as training cuts it: prefix and response to
    max_target - 1 tokens, then EOS."""
    target = (prefix + tok.encode(response, bos=False))[:max_target - 1] + [tok.eos_id]
    scored = len(target) - len(prefix)
    ids = torch.tensor([prompt + target], device=model.lm_head.weight.device)
    logits = model(ids[:, :-1])[0, -scored:]  # position j predicts token j + 1
    return math.exp(F.cross_entropy(logits.float(), ids[0, -scored:]).item())


def routing_scores(routes: list[str | None], gold: list[str | None]) -> dict:
    """Per-task routing precision, recall and F1 (a query's label: the expert that answered, None
    for the base model), their macro average over tasks, and RB-Acc: the share of queries of no task
    (gold None) that reached the base model."""
    tasks = sorted({g for g in gold if g is not None})
    per_task = {}
    for t in tasks:
        tp = sum(r == t and g == t for r, g in zip(routes, gold))
        claimed, relevant = sum(r == t for r in routes), sum(g == t for g in gold)
        p, r = tp / claimed if claimed else 0.0, tp / relevant
        per_task[t] = dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)
    ood = [r for r, g in zip(routes, gold) if g is None]
    return dict(per_task=per_task,
                f1=sum(v["f1"] for v in per_task.values()) / len(tasks) if tasks else None,
                rb_acc=sum(r is None for r in ood) / len(ood) if ood else None)


def routing_cost(outcomes: list[list[str]], to_base: list[bool]) -> dict:
    """Given what each visited expert emitted per query (newest first) and whether the
    base model answered it: experts visited and prefills per query (Appendix E; a
    base-model answer is one more), and how many queries met an expert that emitted
    neither indicator (the exception path)."""
    n = max(len(outcomes), 1)
    visited = sum(map(len, outcomes))
    return dict(visited=visited / n, prefills=(visited + sum(to_base)) / n,
                exceptions=sum(NEITHER in o for o in outcomes))


def answer_all(model: Llama, expert: Expert | None, ind: Indicators | None,
               prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], batch_size: int,
               progress: bool) -> list[list[int]]:
    """One adapter answers every query: a baseline's, or a SEE expert's after its o_pos, forced
    (no routing: paper Fig. 4, "SEE-AE"); with no expert, the base model."""
    if expert is None:
        with base_model(model):
            return generate_batched(model, prompts, max_new_tokens, eos_ids, batch_size,
                                    desc="base model" if progress else None)
    expert.use(model)
    forced = ind.pos if ind else []
    desc = expert.name if progress else None
    return generate_batched(model, [q + forced for q in prompts], max_new_tokens, eos_ids,
                            batch_size, desc=desc, ban=ind.added if ind else None)


def evaluate_task(model: Llama, tok: Tokenizer, experts: list[Expert], ind: Indicators | None,
                  examples: list[Example], max_source: int = 1024, max_new_tokens: int = 512,
                  batch_size: int = 16, template: str = "plain", progress: bool = False,
                  task: str | None = None, routing: str = "sequential",
                  xlingual: bool = False) -> tuple[dict, list[dict]]:
    """Answer every example (SEE: routed through the experts, base model last; a
    baseline, or routing "none": one adapter), greedy-decode, and score (xlingual:
    as SuperNI scores non-English).

    Returns the summary (ROUGE-L, counts, speed, routing cost) and one record per example.
    """
    prompts = [prompt_ids(tok, ex.query, max_source, template) for ex in examples]
    t0 = time.perf_counter()
    routed = None
    # MoSEs/SETA: the newest stage holds every task; keys
    if experts and isinstance(experts[-1], SubExpert):
        experts[-1].use(model)  # (SETA: the gate) pick one (TaIL), unless `task` is given (TIL)
        answers, routes = key_route(model, experts[-1].keys, prompts, max_new_tokens, tok.eos_ids,
                                    batch_size, task, progress)
    elif experts and (ind is None or routing == "none"):  # one adapter answers every query
        if len(experts) > 1:
            raise UserError("without routing one adapter answers every query; give one of them")
        answers = answer_all(model, experts[0], ind, prompts, max_new_tokens, tok.eos_ids,
                             batch_size, progress)
        routes = [experts[0].name] * len(prompts)
    elif experts:
        routed = sequential_route(model, experts, ind, prompts, max_new_tokens, tok.eos_ids,
                                  batch_size, progress)
        answers, routes = routed.answers, routed.routes
    else:
        answers = answer_all(model, None, ind, prompts, max_new_tokens, tok.eos_ids, batch_size,
                             progress)
        routes = [BASE] * len(prompts)
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
    label = method.label.format(tau=f"{100 * settings['tau']:g}%",
                                sparsity=settings.get("sparsity"))
    if method.routes and settings.get("negatives") == "lima":
        label += " w/pseudo"
    if method.routes and settings.get("indicator", "added") != "added":
        label += f" {settings['indicator']}"
    return label


@dataclass
class Scoring:
    """A loaded system and how its answers are scored: what evaluate_run's parts share."""
    model: Llama
    tok: Tokenizer
    experts: list[Expert]
    ind: Indicators | None
    tasks: list[str]
    evals: dict[str, list[Example]]  # each task's eval examples
    max_new_tokens: int
    batch_size: int
    routing: str
    progress: bool

    @property
    def template(self) -> str:
        return self.experts[0].template

    @property
    def max_source(self) -> int:
        return self.experts[0].max_source


def evaluate_run(run_dir: str | Path, max_eval: int | None = None, max_new_tokens: int = 512,
                 batch_size: int = 16, max_ood: int = OOD_EVAL, data_dir: str | None = None,
                 device="cpu", dtype=torch.float32, progress: bool = False,
                 routing: str = "sequential") -> tuple[dict, list[dict]]:
    """Score a system written by train.py --sequence, and return the results and
    the final stage's predictions.

    Continual methods (SEE, non-rehearsal, replay, MoSEs, SETA) give the matrix scores[j][i] = a_i
    after stage j (i <= j), hence AR and BWT; MTL and STL give one row (AvgSTL: each task by its
    own adapter), as does SEE with routing "none" (each task by its own expert, o_pos forced: paper
    Fig. 4's SEE-AE). The predictions carry each reference's perplexity (not for MoSEs and SETA).
    For routed SEE also: routing P/R/F1 over the sequence's queries, RB-Acc (the share of queries
    of no task in the sequence that reach the base model: LIMA and the held-out SuperNI tasks) and
    the routing cost (see_routing).
    """
    run_dir = Path(run_dir)
    system = read_system(run_dir)
    method, tasks = METHODS[system["method"]], system["tasks"]
    dirs = [run_dir / e for e in system["experts"]]
    if routing == "none" and not method.routes:
        raise UserError(f"--routing none is for SEE runs; {run_dir} holds {system['method']}")
    model, tok, experts, ind, _ = load_system(None, [str(d) for d in dirs], device, dtype)
    evals = {t: load_task(t, "eval", data_dir)[:max_eval] for t in tasks}
    s = Scoring(model, tok, experts, ind, tasks, evals, max_new_tokens, batch_size, routing,
                progress)
    routed = method.routes and routing != "none"
    # queries of no task in the sequence, for RB-Acc (read now: a missing file fails early)
    if routed:
        heldout = heldout_queries(tasks, max_eval, max_ood, data_dir)
    cells = answering(method, experts, len(tasks), routed)
    scores, predictions = score_matrix(s, cells, til=False)
    if not method.sparse:
        add_perplexities(model, tok, ind, predictions, experts, evals, s.max_source, s.template,
                         system["settings"].get("max_target", 512))
    label = method_label(system)
    if routing == "none":
        label = label.replace("SEE", "SEE-AE", 1)
    result = dict(run=str(run_dir), method=system["method"], label=label, tasks=tasks,
                  scores=scores, ar=average_rouge(scores),
                  bwt=backward_transfer(scores) if routed or method.continues else None,
                  routing_f1=None, per_task_routing=None, rb_acc=None, ood_routes=None, n_ood=None,
                  routing_steps=None, routing=routing,
                  parameters=stage_parameters(experts))
    if any(Path(t).stem in XLINGUAL for t in tasks):
        result["xlingual_tokenizer"] = XLINGUAL_TOKENS.name
    if method.sparse:
        result.update(til_metrics(s, cells, predictions))
    if routed:
        result.update(routing_metrics(s, heldout, predictions))
    return result, predictions


def heldout_queries(tasks: list[str], max_eval: int | None, max_ood: int,
                    data_dir: str | None) -> dict:
    """Queries of no task in the sequence, for RB-Acc: LIMA's and the other SuperNI tasks'."""
    in_sequence = set(tasks) | {Path(t).stem for t in tasks}
    return {"lima": load_ood(directory=data_dir)[:max_ood],
            "superni": [ex for t, name in TASKS.items() if not {t, name} & in_sequence
                        for ex in load_task(t, "eval", data_dir)[:max_eval]]}


def answering(method: Method, experts: list[Expert], T: int,
              routed: bool) -> dict[tuple[int, int], list[Expert]]:
    """Which adapters answer task i after stage j: routed SEE routes over all experts so
    far; a continued adapter is the stage's; otherwise one row, one adapter for all
    tasks (MTL) or each task's own."""
    if routed:
        return {(j, i): experts[:j + 1] for j in range(T) for i in range(j + 1)}
    if method.continues:
        return {(j, i): [experts[j]] for j in range(T) for i in range(j + 1)}
    return {(0, i): [experts[0 if method.joint else i]] for i in range(T)}


def score_matrix(s: Scoring, cells: dict[tuple[int, int], list[Expert]],
                 til: bool) -> tuple[list[list[float]], list[dict]]:
    """ROUGE-L a_i after stage j for each cell, scores[j][i], and the final stage's
    predictions; `til`: the task given (MoSEs/SETA's task-incremental setting), not
    picked by keys or the gate."""
    last = max(j for j, _ in cells)
    scores, predictions = [[] for _ in range(last + 1)], []
    desc = "a_i after stage j" + " (TIL)" * til
    for (j, i), experts in tqdm(cells.items(), desc=desc, disable=not s.progress):
        task = s.tasks[i]
        summary, records = evaluate_task(s.model, s.tok, experts, s.ind, s.evals[task],
                                         s.max_source, s.max_new_tokens, s.batch_size, s.template,
                                         task=s.experts[i].name if til else None, routing=s.routing,
                                         xlingual=Path(task).stem in XLINGUAL)
        scores[j].append(summary["rougeL"])
        if j == last:
            predictions += [dict(task=task, **r) for r in records]
    return scores, predictions


def gold_routes(s: Scoring, predictions: list[dict]) -> list[str]:
    """Each prediction's own expert (MoSEs/SETA: its own task), as routing should pick it."""
    return [s.experts[s.tasks.index(p["task"])].name for p in predictions]


def til_metrics(s: Scoring, cells: dict, predictions: list[dict]) -> dict:
    """MoSEs/SETA: the task-incremental (TIL: the task given) scores beside the task-agnostic ones
    (TaIL: keys or the gate pick the task), and how well the task was picked."""
    til, _ = score_matrix(s, cells, til=True)
    gold = gold_routes(s, predictions)
    scored = routing_scores([p["route"] for p in predictions], gold)
    imprinted = imprinted_accuracy(s.model, s.tok, s.experts[-1], predictions, s.evals, gold,
                                   s.max_source, s.template, s.batch_size)
    picked = sum(p["route"] == g for p, g in zip(predictions, gold)) / len(predictions)
    return dict(til_scores=til, til_ar=average_rouge(til), til_bwt=backward_transfer(til),
                routing_f1=scored["f1"], per_task_routing=scored["per_task"],
                task_id_accuracy=picked, imprinted_accuracy=imprinted)


def routing_metrics(s: Scoring, heldout: dict[str, list[Example]], predictions: list[dict]) -> dict:
    """Routed SEE: routing P/R/F1 over the sequence's queries, RB-Acc and the routing cost."""
    routes = [None if p["route"] == "base" else p["route"] for p in predictions]
    scored = routing_scores(routes, gold_routes(s, predictions))
    return dict(routing_f1=scored["f1"], per_task_routing=scored["per_task"],
                **see_routing(s.model, s.tok, s.experts, s.ind, heldout, predictions, s.max_source,
                              s.template, s.batch_size, s.progress))


def add_perplexities(model: Llama, tok: Tokenizer, ind: Indicators | None, predictions: list[dict],
                     answering: list[Expert], evals: dict[str, list[Example]], max_source: int,
                     template: str, max_target: int) -> None:
    """Fig. 5: each reference's perplexity under what answered its query after the last stage (the
    one of `answering` its route names): SEE's expert on (q, o_pos, r), the base model on (q, r) if
    none claimed it, a baseline's adapter on (q, r)."""
    queries = {(t, ex.id): ex.query for t, examples in evals.items() for ex in examples}
    for p in predictions:
        expert = next((e for e in answering if e.name == p["route"]), None)
        with contextlib.nullcontext() if expert else base_model(model):
            if expert:
                expert.use(model)
            prompt = prompt_ids(tok, queries[p["task"], p["id"]], max_source, template)
            prefix = ind.pos if expert and ind else []
            p["perplexity"] = response_perplexity(model, tok, prompt, prefix, p["references"][0],
                                                  max_target)


def see_routing(model: Llama, tok: Tokenizer, experts: list[Expert], ind: Indicators,
                heldout: dict[str, list[Example]], predictions: list[dict], max_source: int,
                template: str, batch_size: int, progress: bool) -> dict:
    """RB-Acc on each out-of-distribution set (only the routing decision matters, so one token of
    answer is enough) with who answered its queries, and the routing cost (routing_cost) on the
    sequence's own queries ("tasks"), on each such set, and on all of them together."""
    outcomes = {"tasks": [[o for _, o in p["visits"]] for p in predictions]}
    to_base = {"tasks": [p["route"] == "base" for p in predictions]}
    rb_acc, ood_routes = {}, {}
    for name, examples in heldout.items():
        prompts = [prompt_ids(tok, ex.query, max_source, template) for ex in examples]
        r = sequential_route(model, experts, ind, prompts, 1, tok.eos_ids, batch_size, progress)
        rb_acc[name] = routing_scores(r.routes, [None] * len(r.routes))["rb_acc"]
        ood_routes[name] = dict(Counter("base" if route is BASE else route for route in r.routes))
        outcomes[name] = [[ind.read(t) for _, t in v] for v in r.visits]
        to_base[name] = [route is BASE for route in r.routes]
    cost = {name: routing_cost(outcomes[name], to_base[name]) for name in outcomes}
    everything = routing_cost(sum(outcomes.values(), []), sum(to_base.values(), []))
    return dict(rb_acc=rb_acc, ood_routes=ood_routes, n_ood={k: len(v) for k, v in heldout.items()},
                exceptions={name: c["exceptions"] for name, c in cost.items()},
                routing_steps=everything["visited"], prefills=everything["prefills"])


def imprinted_accuracy(model: Llama, tok: Tokenizer, last: Expert, predictions: list[dict],
                       evals: dict, gold: list[str], max_source: int, template: str,
                       batch_size: int) -> float | None:
    """SETA: the task-identification accuracy on the final stage's queries of the gate as imprinted
    (each row at the mean of its task's query features, before any training), beside the trained
    gate's; None for MoSEs, or if the training state that keeps the imprinted rows was dropped."""
    if not last.imprints:
        return None
    queries = {(t, ex.id): ex.query for t, examples in evals.items() for ex in examples}
    prompts = [prompt_ids(tok, queries[p["task"], p["id"]], max_source, template)
               for p in predictions]
    routes = lora.match_keys(lora.query_features(model, prompts, batch_size), last.imprints)
    return sum(r == g for r, g in zip(routes, gold)) / len(gold)


def stage_parameters(experts: list[Expert]) -> list[dict]:
    """What each stage trained, as train.py recorded it in expert.json: its trainable parameters;
    MoSEs/SETA: everything its optimizer may change (free sub-expert weights, all mask scores, the
    key; SETA: its shared experts and every row of its gate), the mask scores alone, the weights its
    task's mask keeps, those no earlier task held (new), their share of the mask (trainable_share:
    what the task could change), the weights held by some task so far (held), the bytes on disk of
    what inference needs (bytes) and of the training state a next stage needs (training_bytes),
    beside as many per-task LoRA adapters' (lora_bytes)."""
    return [e.counts for e in experts]


def print_table(results: list[dict]) -> None:
    """The paper's Table 1 layout (a row per method: AR, BWT), with the final ROUGE-L per task and,
    for SEE, routing F1, RB-Acc on LIMA and on held-out SuperNI tasks, experts visited and prefills
    per query, and queries that took the exception path (for MoSEs, R-F1 is task identification by
    key); then trainable parameters per stage, and MoSEs' TIL scores."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))

    def cell(v, fmt, scale=1):
        return "-" if v is None else format(scale * v, fmt)
    head = f"{'method':<22}" + "".join(f"{Path(t).stem[:7]:>8}" for t in tasks)
    print(f"\n{head}{'AR':>8}{'BWT':>8}{'R-F1':>8}{'RB-LIMA':>8}{'RB-SNI':>8}"
          f"{'steps':>7}{'prefill':>8}{'except':>7}")
    for r in results:
        final = dict(zip(r["tasks"], r["scores"][-1]))
        rb = r["rb_acc"] or {}
        exceptions = sum(r["exceptions"].values()) if r.get("exceptions") else None
        row = f"{r['label']:<22}" + "".join(f"{cell(final.get(t), '.2f'):>8}" for t in tasks)
        row += f"{r['ar']:>8.2f}{cell(r['bwt'], '.2f'):>8}{cell(r['routing_f1'], '.2f', 100):>8}"
        row += f"{cell(rb.get('lima'), '.1f', 100):>8}{cell(rb.get('superni'), '.1f', 100):>8}"
        row += f"{cell(r['routing_steps'], '.2f'):>7}{cell(r.get('prefills'), '.2f'):>8}"
        print(row + f"{cell(exceptions, 'd'):>7}")
    for r in results:
        print_parameters(r)


def print_parameters(r: dict) -> None:
    """A run's trainable parameters per stage; MoSEs/SETA: what each stage holds and stores, and
    the TIL scores beside the TaIL ones."""
    params, label = r["parameters"], r["label"]

    def listed(key: str, fmt: str = ",") -> str:
        return ", ".join(format(p[key], fmt) for p in params)
    line = f"{label}: trainable parameters per stage {listed('trainable')}"
    if "held" in params[0]:
        line += f"; weights held after each stage {listed('held')}"
        line += f"; trainable share of each task's mask {listed('trainable_share', '.0%')}"
    if params[0].get("shared"):
        line += f"; shared-expert weights {params[0]['shared']:,}"
    print(line)
    if "bytes" in params[0]:
        print(f"{label}: bytes on disk per stage {listed('bytes')} (+ training state "
              f"{listed('training_bytes')}); a LoRA per task {listed('lora_bytes')}")
    if "til_ar" in r:
        picker = "gate" if METHODS[r["method"]].gate else "keys"
        line = f"{label}: TIL AR {r['til_ar']:.2f} BWT {r['til_bwt']:.2f}; "
        line += f"TaIL AR {r['ar']:.2f} BWT {r['bwt']:.2f}; "
        line += f"TIL-TaIL gap {r['til_ar'] - r['ar']:.2f}; "
        line += f"task identification ({picker}) {100 * r['task_id_accuracy']:.1f}%"
        imprinted = r.get("imprinted_accuracy")
        if imprinted is not None:
            line += f" (gate as imprinted: {100 * imprinted:.1f}%)"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description="ROUGE-L of SEE experts (or the base model) on a "
                                            "task's eval split, or the paper's metrics of whole "
                                            "runs (--run: the runs' own prompt, source length and "
                                            "model).")
    p.add_argument("--run", action="append", default=[],
                   help="a system written by train.py --sequence/--order; repeat to compare runs "
                        "in one table")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN",
                   help="render the paper's tables and plots (markdown, to --out, default "
                        "runs/report.md) from runs already evaluated with --run")
    p.add_argument("--expert", action="append", default=[],
                   help="expert directory; repeat in training order for a sequence (none: the base "
                        "model alone)")
    p.add_argument("--task", default=None,
                   help="task abbreviation or SuperNI task .json file (not with --run)")
    p.add_argument("--model", default=None,
                   help="base model (default: the experts' own, else smollm2-135m)")
    p.add_argument("--data-dir", default=None,
                   help="SuperNI directory (default $SEE_DATA_DIR, else ../shared/superni)")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-eval", type=int, default=None,
                   help="score only the first N examples of each task")
    p.add_argument("--max-ood", type=int, default=OOD_EVAL,
                   help=f"LIMA queries for RB-Acc (--run; at most {OOD_EVAL}, the rest may have "
                        f"been pseudo-negatives)")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="prompt (default: as the experts were trained, else auto: chat if the "
                        "checkpoint has a template)")
    p.add_argument("--max-source", type=int, default=None,
                   help="query tokens kept (default: as the experts were trained, else 1024)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the paper's target length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--routing", default="sequential", choices=ROUTINGS,
                   help="SEE: experts newest first (the paper's sequential routing), or none: one "
                        "expert answers every query with its o_pos forced (--run: each task by its "
                        "own expert)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and compute; default as train.py: bfloat16 on CUDA and on CPUs "
                        "with native bf16, else float32")
    p.add_argument("--out", default=None,
                   help="result JSON (default: beside the first expert, or runs/base-<model>/; "
                        "with --run: <run>/eval.json, eval-expert-only.json for --routing none)")
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
        check_args(args)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(args.dtype, device)
        if args.run:
            evaluate_runs(args, device, dtype)
        else:
            evaluate_experts(args, device, dtype)


def variant(args: argparse.Namespace) -> str:
    """The result file's suffix for settings that change what is measured, so no result is
    overwritten by one measured otherwise."""
    return "-expert-only" if args.routing == "none" else ""


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible evaluation settings before any model loads."""
    counts = {"--batch-size": args.batch_size, "--max-new-tokens": args.max_new_tokens,
              "--max-eval": args.max_eval, "--max-source": args.max_source}
    bad = [f"{flag} {v}" for flag, v in counts.items() if v is not None and v < 1]
    if bad or args.max_ood < 0:
        raise UserError(f"need positive counts and --max-ood >= 0, got "
                        f"{', '.join(bad) or f'--max-ood {args.max_ood}'}")


def check_result(out: Path, settings: dict) -> None:
    """Before any generation: `out` can be written, and holds no result of other settings
    to overwrite."""
    check_writable(out)
    if out.is_file():
        old = read_json(out)
        changed = sorted(k for k in settings if k in old and old[k] != settings[k])
        if changed:
            changes = ", ".join(f"{k}: {old[k]} -> {settings[k]}" for k in changed)
            raise UserError(f"{out} holds results of other settings ({changes}); pass another "
                            f"--out or delete it")


def evaluate_runs(args: argparse.Namespace, device, dtype) -> None:
    results = []
    outs = [Path(args.out if args.out
                 and len(args.run) == 1 else Path(run) / f"eval{variant(args)}.json")
            for run in args.run]
    settings = dict(max_eval=args.max_eval, max_new_tokens=args.max_new_tokens,
                    max_ood=args.max_ood, routing=args.routing)
    for out in outs:
        check_result(out, settings)
    for run, out in zip(args.run, outs):
        t0 = time.perf_counter()
        result, predictions = evaluate_run(run, args.max_eval, args.max_new_tokens, args.batch_size,
                                           args.max_ood,
                                           args.data_dir, device, dtype, progress=True,
                                           routing=args.routing)
        result.update(settings, dtype=str(dtype).removeprefix("torch."), device=device_name(device),
                      eval_seconds=time.perf_counter() - t0, train_seconds=train_seconds(Path(run)))
        out.parent.mkdir(parents=True, exist_ok=True)
        preds = out.with_suffix(".predictions.jsonl")
        atomic_write(preds, lambda f: f.write_text("".join(json.dumps(r) + "\n"
                                                           for r in predictions)))
        atomic_write(out, lambda f: f.write_text(json.dumps(dict(result, predictions=str(preds)),
                                                            indent=2) + "\n"))
        results.append(result)
        print(f"{result['label']}: results {out}, final-stage predictions {preds}")
    print_table(results)


def train_seconds(run_dir: Path) -> float | None:
    """The wall time of a system's training: its stages' logged step times, summed (None for logs
    written before steps were timed)."""
    stages = [run_dir / Path(e).parent for e in read_system(run_dir)["experts"]]
    records = [json.loads(line) for d in stages for line in read_log(d / LOG_FILE, None)]
    if not records or any("seconds" not in r for r in records):
        return None
    return sum(r["seconds"] for r in records)


def evaluate_experts(args: argparse.Namespace, device, dtype) -> None:
    examples = load_task(args.task, args.split, args.data_dir)[:args.max_eval]
    if not examples:
        raise UserError(f"no {args.split} examples for {args.task}")
    model, tok, experts, ind, model_name = load_system(args.model, args.expert, device, dtype)
    max_source = experts[0].max_source if experts else 1024
    if args.max_source is not None:
        max_source = args.max_source
    template = resolve_template(tok, args.template or (experts[0].template if experts else "auto"))
    task = Path(args.task).stem
    beside = Path("runs") / f"base-{model_tag(model_name)}"
    if args.expert:
        beside = Path(args.expert[0]).parent
    out = Path(args.out or beside / f"eval-{task}{variant(args)}.json")
    settings = dict(task=args.task, split=args.split, model=model_name, experts=args.expert,
                    template=template, max_source=max_source, max_eval=args.max_eval,
                    max_new_tokens=args.max_new_tokens,
                    routing=args.routing)
    check_result(out, settings)
    summary, records = evaluate_task(model, tok, experts, ind, examples, max_source,
                                     args.max_new_tokens,
                                     args.batch_size, template, progress=True, routing=args.routing,
                                     xlingual=task in XLINGUAL)
    out.parent.mkdir(parents=True, exist_ok=True)
    preds = out.with_suffix(".predictions.jsonl")
    atomic_write(preds, lambda f: f.write_text("".join(json.dumps(r) + "\n" for r in records)))
    result = dict(**settings, **summary, dtype=str(dtype).removeprefix("torch."),
                  predictions=str(preds))
    if task in XLINGUAL:
        result["xlingual_tokenizer"] = XLINGUAL_TOKENS.name
    atomic_write(out, lambda f: f.write_text(json.dumps(result, indent=2) + "\n"))
    who = ", ".join(e.name for e in experts) or "base model"
    print(f"\n{'system':<24} {'task':<8} {'n':>5} {'ROUGE-L':>8} {'by experts':>10}")
    print(f"{who:<24} {task:<8} {summary['n']:>5} {summary['rougeL']:>8.2f} "
          f"{summary['answered_by_experts']:>10.0%}")
    print(f"results: {out}\npredictions: {preds}")


if __name__ == "__main__":
    main()
