"""The paper's metrics: SuperNI's ROUGE-L, AR (Eq. 6), BWT (Eq. 7), routing precision/recall/F1,
RB-Acc, the routing cost of Appendix E, and the perplexity of the references (Fig. 5)."""
from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from errors import UserError
from experts import NEITHER
from model import Llama
from tokenizer import Tokenizer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
XLINGUAL_ENV = "SEE_XLINGUAL_TOKENIZER"  # a tokenizer.json to use instead of GPT-2's from the hub
# GPT-2's pre-tokenizer (words, numbers, other symbols, each with its leading space)
_GPT2_SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


class XlingualTokens:
    """SuperNI's tokens for its cross-lingual tasks: GPT-2's byte-level BPE tokens, "Ġ" stripped,
    case kept, no stemming (rouge-score's default keeps only [a-z0-9]: "más" would share nothing).
    Without $SEE_XLINGUAL_TOKENIZER or the hub, the pre-tokenizer's words, unmerged (see `name`)."""

    def __init__(self) -> None:
        self.name, self._bpe = None, None

    def tokenize(self, text: str) -> list[str]:
        path = os.environ.get(XLINGUAL_ENV)
        try:
            if self.name is None:  # loaded at first use
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
    """AR (Eq. 6): the mean ROUGE-L over all tasks after the last stage (scores[j][i]: after j)."""
    return sum(scores[-1]) / len(scores[-1])


def backward_transfer(scores: list[list[float]]) -> float:
    """BWT (Eq. 7): the mean change on tasks 1..T-1 from just after learning them to the end."""
    T = len(scores)
    return sum(scores[-1][i] - scores[i][i] for i in range(T - 1)) / (T - 1) if T > 1 else 0.0


def routing_scores(routes: list[str | None], gold: list[str | None]) -> dict:
    """Per-task routing P/R/F1 (None: the base model answered), their macro F1, and RB-Acc: the
    share of queries of no task (gold None) that reached the base model."""
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
    """Experts visited and prefills per query (Appendix E; a base-model answer is one more), and
    the queries that met an expert emitting neither indicator (the exception path)."""
    n = max(len(outcomes), 1)
    visited = sum(map(len, outcomes))
    return dict(visited=visited / n, prefills=(visited + sum(to_base)) / n,
                exceptions=sum(NEITHER in o for o in outcomes))


@torch.no_grad()
def response_perplexity(model: Llama, tok: Tokenizer, prompt: list[int], prefix: list[int],
                        response: str, max_target: int = 512) -> float:
    """exp of the mean NLL of a response and EOS after the prompt and a prefix (SEE: o_pos; Fig. 5),
    cut as training cuts it: prefix and response to max_target - 1 tokens, then EOS."""
    target = (prefix + tok.encode(response, bos=False))[:max_target - 1] + [tok.eos_id]
    scored = len(target) - len(prefix)
    ids = torch.tensor([prompt + target], device=model.lm_head.weight.device)
    logits = model(ids[:, :-1])[0, -scored:]  # position j predicts token j + 1
    return math.exp(F.cross_entropy(logits.float(), ids[0, -scored:]).item())

