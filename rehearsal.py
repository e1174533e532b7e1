"""What a stage rehearses of the earlier tasks (Eq. 4's sampled part): RandSel's random draw, SEE's
pseudo-negatives and general negatives (LIMA queries), and KMeansSel's choice by k-means."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import gate
from data import Example, load_ood, load_task, rehearsal_sets, subsample
from errors import UserError
from model import Llama
from runs import TrainConfig


def training_data(cfg: TrainConfig) -> tuple[list[Example], list[Example], list[str]]:
    """The current task's examples, tau of each earlier task's to rehearse (RandSel, sized as the
    paper's data gives it) and where they came from; with pseudo-negatives, as many LIMA queries
    instead of the earlier tasks' (paper Table 3), and --general-negatives' LIMA queries."""
    current = subsample(load_task(cfg.task, "train", cfg.data_dir), cfg.max_train, cfg.seed)
    if not current:
        raise UserError(f"task {cfg.task} has no training examples")
    rehearsed, sources = rehearsal_sets(cfg.previous, cfg.tau, cfg.seed, cfg.max_train,
                                        cfg.data_dir)
    lima = cfg.negatives == "lima" or cfg.general_negatives  # the queries RB-LIMA does not score
    pool = load_ood(directory=cfg.data_dir, split="train") if lima else []
    if cfg.negatives == "lima":
        if len(rehearsed) > len(pool):
            raise UserError(f"{len(rehearsed)} pseudo-negatives asked for, but LIMA has only "
                            f"{len(pool)} to spare; lower --tau")
        rehearsed = subsample(pool, len(rehearsed), cfg.seed)
        sources = [f"LIMA: {len(rehearsed)} pseudo-negatives in place of {'; '.join(sources)}"]
    if cfg.general_negatives:  # beyond the paper: the same general queries for every expert
        general = subsample(pool, cfg.general_negatives, cfg.seed)
        rehearsed = rehearsed + general
        sources = sources + [f"LIMA: {len(general)} general queries as negatives"]
    return current, rehearsed, sources


def kmeans_nearest(features: torch.Tensor, n: int, seed: int, clusters: int = 20,
                   iters: int = 30) -> list[int]:
    """KMeansSel's choice of n of the points: k-means into `clusters`, each cluster given slots in
    proportion to its size, filled by its points nearest its centroid (as the SSR authors' code)."""
    x = F.normalize(features.float(), dim=-1)
    k = min(clusters, len(x))
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    while len(centroids) < k:  # k-means++ seeding, as sklearn's KMeans that the SSR code uses
        far = torch.cdist(x, centroids).min(1).values ** 2
        centroids = torch.cat([centroids, x[torch.multinomial(far + 1e-12, 1, generator=g)]])
    for _ in range(iters):  # Lloyd's algorithm; an emptied cluster keeps its centroid
        assign = torch.cdist(x, centroids).argmin(1)
        for c in range(k):
            if (assign == c).any():
                centroids[c] = x[assign == c].mean(0)
    dist = torch.cdist(x, centroids).gather(1, assign[:, None]).squeeze(1)
    # largest remainder: the slots sum to n exactly
    share = torch.bincount(assign, minlength=k).float() * n / len(x)
    slots = share.floor().long()
    slots[(share - slots).argsort(descending=True, stable=True)[:n - int(slots.sum())]] += 1
    chosen = []
    for c in range(k):
        members = (assign == c).nonzero().squeeze(1)
        chosen += members[dist[members].argsort()[:slots[c]]].tolist()
    return sorted(chosen)


def kmeans_rehearsal(model: Llama, tok, cfg: TrainConfig) -> tuple[list[Example], list[str]]:
    """KMeansSel(tau): of each earlier task's training examples, as many as RandSel draws, chosen
    by kmeans_nearest on the base model's features of their inputs (what follows the definition
    every query of the task shares; the SSR authors embed inputs alone, with SimCSE)."""
    chosen, sources = [], []
    for task in cfg.previous:
        pool = subsample(load_task(task, "train", cfg.data_dir), cfg.max_train, cfg.seed)
        n = len(rehearsal_sets([task], cfg.tau, cfg.seed, cfg.max_train, cfg.data_dir)[0])
        shared = len(os.path.commonprefix([ex.query for ex in pool])) if len(pool) > 1 else 0
        inputs = [tok.encode(ex.query[shared:] or ex.query, bos=True)[:cfg.max_source]
                  for ex in pool]
        picked = kmeans_nearest(gate.query_features(model, inputs, cfg.micro_batch), n, cfg.seed)
        chosen += [pool[i] for i in picked]
        sources.append(f"{task}: {n} of {len(pool)} nearest k-means centroids")
    return chosen, sources
