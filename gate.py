"""What picks a task in MoSEs and SETA: the query's feature from the frozen base model, matched to
MoSEs' prompt keys or to SETA's unified gate (a cosine classifier, one row per task); and SETA's
training terms: the gate's loss, the routing regulariser, elastic anchoring and its importance.
("Router" is the per-token mixer inside a MoSE layer, lora.SubExpertLinear; "gate" is SETA's.)
Trained in train.sparse_terms; at inference router.key_route picks the task with match_keys."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from errors import UserError


@torch.no_grad()
def query_features(model: nn.Module, prompts: list[list[int]],
                   batch_size: int = 16) -> torch.Tensor:
    """f(x), (n, dim): the base model's final hidden states averaged over the query (no [CLS]); no
    sub-expert is active: later learning never moves a query's task (as L2P's frozen encoder)."""
    lora.set_task(model, None)  # callers set the task they want afterwards
    device = model.lm_head.weight.device
    feats = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(map(len, chunk))
        # right padding: causal attention keeps pads out of real positions
        x = torch.tensor([p + [0] * (width - len(p)) for p in chunk], device=device)
        real = torch.tensor([[j < len(p) for j in range(width)] for p in chunk], device=device)
        h = model.hidden(x).float()
        feats.append((h * real[..., None]).sum(1) / real.sum(1, keepdim=True))
    return torch.cat(feats)


# SETA's gate is a cosine classifier with a fixed scale (as LUCIR's): raw cosines in [-1, 1] give a
# nearly flat softmax, and with unnormalised rows the routing regulariser on SmolLM2 grew the oldest
# row until the gate sent 100% of queries to the first task (docs/RESULTS.md).
GATE_SCALE = 16.0


def gate_logits(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """SETA's unified gate: GATE_SCALE times the cosine of the query feature and each task's row."""
    return GATE_SCALE * F.normalize(features, dim=-1) @ F.normalize(rows, dim=-1).T


def match_keys(features: torch.Tensor, keys: dict[str, torch.Tensor]) -> list[str]:
    """The task picked at inference: whose prompt key (MoSEs) or gate row (SETA's gate's argmax) is
    most cosine-similar to each feature."""
    if not keys:
        raise UserError("no task keys to match")
    names = list(keys)
    scores = gate_logits(features, torch.stack([keys[n] for n in names]).to(features))
    return [names[i] for i in scores.argmax(-1).tolist()]


# --- SETA's training terms on the gate and the shared experts

def elastic_anchor(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                   anchors: list[torch.Tensor]) -> torch.Tensor:
    """SETA's elastic anchoring (EWC's penalty): 1/2 sum_i F_i (theta_i - theta*_i)^2 over
    the shared-expert weights theta, with theta* their values after the earlier tasks and F
    their importance to those tasks."""
    return sum((imp * (p - a) ** 2).sum() for (p, imp), a in zip(pairs, anchors)) / 2


def routing_regulariser(rows: torch.Tensor, memory: torch.Tensor,
                        old: torch.Tensor) -> torch.Tensor:
    """SETA's routing-aware regulariser: KL(old || new) of the gate's outputs on earlier
    tasks' queries, the mean over queries. The new task's output is not in `old`, so mass it
    takes from them is penalised."""
    new = F.log_softmax(gate_logits(memory, rows), dim=-1)[:, :old.shape[1]]
    return (old * (old.clamp_min(1e-12).log() - new)).sum(-1).mean()


def gate_loss(rows: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SETA's gate objective: each query's cross-entropy against its task's row, averaged
    per task and then over the tasks present, so that a task's few remembered queries
    weigh as much as the batch."""
    per_query = F.cross_entropy(gate_logits(features, rows), labels, reduction="none")
    count = torch.bincount(labels, minlength=len(rows))
    per_task = torch.zeros(len(rows), device=rows.device).index_add(0, labels, per_query)
    return (per_task[count > 0] / count[count > 0]).mean()


def importance(model: nn.Module, losses: list) -> list[torch.Tensor]:
    """Shared-expert weights' importance to the task just learned: the diagonal empirical Fisher of
    `losses` (per-sample callables), scaled to mean 1: --anchor-weight means the same anywhere."""
    pairs = lora.shared_weights(model)
    fisher = [torch.zeros_like(p) for p, _ in pairs]
    for loss in losses:
        for p, _ in pairs:
            p.grad = None
        loss()[0].backward()
        for f, (p, _) in zip(fisher, pairs):
            f += p.grad ** 2
    mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
    return [f / mean.clamp_min(1e-30) for f in fisher]
