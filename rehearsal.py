"""What a stage rehearses of the earlier tasks (Eq. 4's sampled part): RandSel's random draw, SEE's
pseudo-negatives and general negatives (LIMA queries), KMeansSel's choice by k-means, and SSR's
synthetic instances. The random draw itself (SEE's and RandSel's) is data.rehearsal_sets."""
from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

import gate
import lora
from artifacts import read_json
from data import Example, load_ood, load_task, paper_size, rehearsal_sets, subsample
from errors import UserError
from experts import base_model, prompt_ids
from model import Llama
from router import generate_batched
from runs import SYSTEM_FILE, TrainConfig, task_name, write_json


def training_data(cfg: TrainConfig) -> tuple[list[Example], list[Example], list[str]]:
    """The current task's examples, tau of each earlier task's to rehearse (RandSel) and where they
    came from; LIMA queries replace them as pseudo-negatives (Table 3), or join as general ones."""
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
    x = F.normalize(features.float().cpu(), dim=-1)  # on the CPU, as its seeded generator
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
    by nearest_inputs on their inputs (what follows the definition all the task's queries share)."""
    chosen, sources = [], []
    for task in cfg.previous:
        pool = subsample(load_task(task, "train", cfg.data_dir), cfg.max_train, cfg.seed)
        n = len(rehearsal_sets([task], cfg.tau, cfg.seed, cfg.max_train, cfg.data_dir)[0])
        definition, inputs = split_queries(pool)
        chosen += [pool[i] for i in nearest_inputs(model, tok, inputs, n, cfg)]
        sources.append(f"{task}: {n} of {len(pool)} nearest k-means centroids")
    return chosen, sources


def split_queries(examples: list[Example]) -> tuple[str, list[str]]:
    """The definition every query of a task starts with, and each query's input after it."""
    shared = len(os.path.commonprefix([ex.query for ex in examples])) if len(examples) > 1 else 0
    return examples[0].query[:shared], [ex.query[shared:] or ex.query for ex in examples]


def nearest_inputs(model: Llama, tok, inputs: list[str], n: int, cfg: TrainConfig) -> list[int]:
    """kmeans_nearest on the base model's features of the inputs (the SSR authors use SimCSE's)."""
    ids = [tok.encode(x, bos=True)[:cfg.max_source] for x in inputs]
    return kmeans_nearest(gate.query_features(model, ids, cfg.micro_batch), n, cfg.seed)


def demonstration(x: str, y: str) -> str:
    return f"Input: {x}\nOutput: {y}\n\n"


def parse_synthetic(text: str) -> tuple[str, str] | None:
    """The instance the base model wrote after "Input:": its input and output, or None."""
    x, found, rest = text.partition("\nOutput:")
    y = rest.split("\nInput:")[0].strip()
    return (x.strip(), y) if found and x.strip() and y else None


def ssr_written(model: Llama, tok, cfg: TrainConfig, task: str) -> tuple[str, list[str], str]:
    """SSR's base-model half for one earlier task: its definition, the written inputs k-means keeps
    (as many as RandSel draws) and a note. Each stage of a sequence would write the same (a frozen
    model, greedy), so the first writes <sequence>/ssr-<task>.json and the later ones read it."""
    root = cfg.run_dir().parent
    cache = root / f"ssr-{task_name(task)}.json" if (root / SYSTEM_FILE).exists() else None
    if cache and cache.exists():
        return tuple(read_json(cache, list))
    full = load_task(task, "train", cfg.data_dir)
    pool = subsample(full, cfg.max_train, cfg.seed)
    n = len(rehearsal_sets([task], cfg.tau, cfg.seed, cfg.max_train, cfg.data_dir)[0])
    # SSR's 1% sample: 20 of 2,000 (qg and sum ship only their 200-example samples)
    demos = subsample(pool, max(2, paper_size(task, len(full), cfg.data_dir) // 100), cfg.seed)
    definition, inputs = split_queries(demos)
    texts = [definition + demonstration(a, x.outputs[0]) + demonstration(b, y.outputs[0])
             for (a, x), (b, y) in itertools.permutations(zip(inputs, demos), 2)]
    prompts = [ids for ids in (tok.encode(t + "Input:", bos=True) for t in texts)
               if len(ids) <= cfg.max_source]
    if not prompts:
        raise UserError(f"SSR: no two demonstrations of {task} fit --max-source {cfg.max_source}")
    with base_model(model):
        written = generate_batched(model, prompts, cfg.max_source // 2, tok.eos_ids,
                                   cfg.micro_batch, desc=f"SSR: {task} synthesised")
        parsed = (parse_synthetic(tok.decode(ids)) for ids in written)
        new = [x for x in dict.fromkeys(p[0] for p in parsed if p) if x not in inputs]
        picked = [new[i] for i in nearest_inputs(model, tok, new, n, cfg)] if new else []
    note = f"{len(picked)} of {len(new)} instances synthesised from {len(demos)} demonstrations"
    if cache:
        write_json(cache, [definition, picked, note])
    return definition, picked, note


def ssr_rehearsal(model: Llama, tok, cfg: TrainConfig, template: str) -> tuple[list[Example],
                                                                               list[str]]:
    """SSR (Huang et al., 2024), per earlier task: the base model writes instances in context (the
    definition, two demonstrations of its 1% real sample, "Input:"), k-means keeps as many as
    RandSel draws, and the latest model (this adapter as it starts) answers; greedy, not top-p."""
    chosen, sources = [], []
    for task in cfg.previous:
        definition, picked, note = ssr_written(model, tok, cfg, task)
        lora.set_adapter(model, cfg.name)
        queries = [definition + x for x in picked]
        answers = generate_batched(model, [prompt_ids(tok, q, cfg.max_source, template)
                                           for q in queries], cfg.max_target, tok.eos_ids,
                                   cfg.micro_batch, desc=f"SSR: {task} refined")
        chosen += [Example(f"ssr-{task}-{i}", q, [tok.decode(a).strip()])
                   for i, (q, a) in enumerate(zip(queries, answers)) if tok.decode(a).strip()]
        sources.append(f"{task}: {note}")
    return chosen, sources
