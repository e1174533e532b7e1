"""The paper's metrics: ROUGE-L as Super-NaturalInstructions computes it (rouge-score's rougeL
F-measure with stemming, the best over the references, x100; its xlingual mode for non-English
references), AR (Eq. 6), BWT (Eq. 7), routing precision/recall/F1, RB-Acc, and the routing cost of
Appendix E; the perplexity of the references (Fig. 5) and SETA's task identification by its gate as
imprinted."""
from __future__ import annotations

import contextlib
import math
import os
import re

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

import gate
from data import Example
from errors import UserError
from experts import NEITHER, Expert, Indicators, base_model, prompt_ids
from model import Llama
from tokenizer import Tokenizer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
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
    routes = gate.match_keys(gate.query_features(model, prompts, batch_size), last.imprints)
    return sum(r == g for r, g in zip(routes, gold)) / len(gold)
