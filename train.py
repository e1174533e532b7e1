"""Train one SEE expert (paper Sec. 3, Expert Training): a new LoRA adapter on the frozen base
model, fitted to the reconstructed task D^_i (Eq. 4) with the loss of Eq. 5.

    python train.py --task qa                # E_1 of order 1: no earlier tasks, positives only
    python train.py --task qg --previous qa  # E_2: tau of qa's queries rehearsed as <<neg>>
    python train.py --order 1 --tau 0.1      # a whole sequence, one expert per stage (resumable)
    python train.py --order 1 --method non-rehearsal  # a baseline: one LoRA, each task in turn
    python train.py --order 1 --method seta  # SETA: masked task experts, shared experts, a gate
    torchrun --nproc_per_node 2 train.py --task qa  # data parallel: same result, same global batch

Eq. 5 is eq5_loss (collate masks the query); MoSEs' and SETA's own terms join at sparse_terms."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import gate
import lora
import rehearsal
from artifacts import seal
from checkpoint import atomic_write, exclusive, load, remove_leftovers
from data import ORDERS, Example, rehearsal_sets
from errors import UserError, user_errors
from experts import (UNROUTED, Expert, LoraExpert, SubExpert, TrainSample, prompt_ids, reconstruct,
                     resolve_template, setup_indicators)
from model import Llama
from runs import (CONFIG_FILE, EXPERT_DIR, LOG_FILE, METHODS, STATE_FILE, SYSTEM_FILE, Method,
                  TrainConfig, add_arguments, check_config, check_finished, check_finite,
                  check_init, dtype_name, names, plan_sequence, read_log, restore, resume_state,
                  save_state, task_name, write_json)


def collate(batch: list[TrainSample], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token labels: -100 (ignored) on query and padding (Eq. 5)."""
    T = max(len(s.ids) for s in batch) - 1
    x = torch.zeros(len(batch), T, dtype=torch.long)
    y = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, s in enumerate(batch):
        ids = torch.tensor(s.ids)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, s.start - 1:len(ids) - 1] = ids[s.start:]  # position j predicts token j+1
    return x.to(device), y.to(device)


def eq5_loss(model: Llama, hidden, batch: list[TrainSample], n_targets: int, device,
             amp) -> tuple[torch.Tensor, float]:
    """Eq. 5 on a micro-batch: its target tokens' summed NLL over n_targets, the global batch's (its
    mean, as SFT code does). Returns the loss to backpropagate and the summed NLL (logged)."""
    x, y = collate(batch, device)
    with amp:
        logits = model.head(hidden(x)[y != -100])  # only target positions reach the output head
    nll = F.cross_entropy(logits.float(), y[y != -100], reduction="sum")
    return nll / n_targets, nll.item()


def trainable_parameters(model: Llama, adapter: str | None,
                         indicator_rows: bool) -> dict[str, torch.nn.Parameter]:
    """Freeze all but the adapter (None: MoSE layers) and added indicator rows, made fp32."""
    model.requires_grad_(False)
    learned = lora.lora_parameters(model, adapter) if adapter else lora.subexpert_parameters(model)
    learn = {id(p) for p in learned}
    trainable = {n: p for n, p in model.named_parameters()
                 if id(p) in learn or (indicator_rows and n in ("extra_embed", "extra_head"))}
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


def optimizer(cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter],
              cuda: bool) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW and its groups' peak rates: what starts from nothing (indicator rows, a prompt key)
    learns at --indicator-lr, SETA's imprinted gate at --lr. No weight decay: held weights stay."""
    fresh = [p for n, p in trainable.items() if n.startswith("extra_") or n == "key"]
    fresh_lr = cfg.lr if cfg.indicator_lr == "adapter" else cfg.indicator_lr
    rest = [p for p in trainable.values() if all(p is not q for q in fresh)]
    groups = [dict(params=rest, lr=cfg.lr), dict(params=fresh, lr=fresh_lr)]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=cuda)
    return opt, [g["lr"] for g in opt.param_groups]


def lr_scale(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0, no warm-up


@dataclass
class Run:
    """A run as the training loop sees it: set up once (setup), then advanced step by step."""
    cfg: TrainConfig
    method: Method
    model: Llama
    template: str
    samples: list[TrainSample]
    trainable: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    peak: list[float]  # each parameter group's peak learning rate
    total: int
    device: str
    amp: contextlib.AbstractContextManager
    hidden: object  # the transformer body, compiled with --compile
    rank: int
    world: int
    rehearsed: int  # earlier tasks' samples or queries among `samples` (or SETA's gate's)
    sources: list[str]  # where they came from
    step: int = 0
    features: torch.Tensor | None = None  # MoSEs/SETA: f(x) of each sample's query
    seta: SetaState | None = None
    frozen: int = 0  # MoSEs/SETA: sub-expert weights earlier tasks' masks hold
    counts: dict = field(default_factory=dict)  # what expert.json records of the stage

    @property
    def trained(self) -> int:  # the parameters this stage can change
        return sum(p.numel() for p in self.trainable.values()) - self.frozen

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig, on_start: Callable[[], None] = lambda: None) -> Path:
    """Train the expert and write it to <run dir>/expert; returns the run directory. Under torchrun
    each process takes every world-th micro-batch and the gradients are summed before the step: the
    same step as one process's. Only rank 0 writes, from `on_start` once every check passed."""
    lcfg, sub = check_config(cfg)
    current, rehearsed, sources = rehearsal.training_data(cfg)
    init = check_init(cfg, lcfg, sub)
    cfg = replace(cfg, dtype=dtype_name(cfg.dtype))  # config.json records the dtype used
    with one_writer(cfg.run_dir() / CONFIG_FILE):  # one training of a run at a time
        state = resume_state(cfg)
        run = setup(cfg, init, lcfg, sub, current, rehearsed, sources)
        if state is not None:  # an unfinished run: its checkpoint's weights, optimizer, RNG
            run.step = restore(state, run.trainable, run.opt, cfg.run_dir() / STATE_FILE, run.total)
        if run.world > 1:  # every process starts from rank 0's weights, as DDP does
            for p in run.trainable.values():
                dist.broadcast(p.data, 0)
        if run.main:
            on_start()
            start_run_dir(run, state is not None)
        elapsed, n_tokens = fit(run)
        keys, imprints = sparse_finish(run, init) if run.method.sparse else (None, None)
        if run.main:
            speed = n_tokens / max(elapsed, 1e-9)
            print(f"trained {run.step} steps in {elapsed:.0f} s, {speed:.0f} tokens/s")
            trained_expert(run, lcfg, sub, keys, imprints).save(cfg.run_dir() / EXPERT_DIR)
            (cfg.run_dir() / STATE_FILE).unlink(missing_ok=True)
        if run.world > 1:
            dist.barrier()  # the next stage (on any process) may read this expert
        return cfg.run_dir()


def one_writer(path: Path):
    """The lock on path's directory (checkpoint.exclusive) for rank 0, which alone writes."""
    return exclusive(path) if distributed()[0] == 0 else contextlib.nullcontext()


def setup(cfg: TrainConfig, init: Expert | None, lcfg: lora.LoraConfig,
          sub: lora.SubExpertConfig | None, current: list[Example],
          rehearsed: list[Example], sources: list[str]) -> Run:
    """The run's model and adapter, indicators, samples (Eq. 4), trainable parameters, optimizer."""
    method = METHODS[cfg.method]
    rank, world = distributed()
    cuda = torch.cuda.is_available()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"  # one GPU per process
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    # bf16 base weights under bf16 autocast; the trained parameters stay fp32
    model, tok = load(cfg.model, dtype=dtype, device=device)
    if cfg.max_source + cfg.max_target > model.config.max_seq_len:
        raise UserError(f"--max-source {cfg.max_source} + --max-target {cfg.max_target} exceed the "
                        f"model's context of {model.config.max_seq_len}")
    ind = setup_indicators(model, tok, cfg.indicator) if method.routes else None
    template = resolve_template(tok, cfg.template)
    if cfg.max_target < len(ind.pos if ind else []) + 2:
        raise UserError(f"--max-target {cfg.max_target} leaves no room for a response")
    if method.kmeans:  # KMeansSel picks in place of RandSel's draw, as many
        rehearsed, sources = rehearsal.kmeans_rehearsal(model, tok, cfg)
    # Eq. 4; SETA's experts see only the task's own samples (its rehearsed queries go to the gate)
    learned = [] if method.gate else rehearsed
    samples = reconstruct(current, learned, tok, ind, cfg.max_source, cfg.max_target, template)
    features = seta = None
    if method.sparse:  # MoSEs/SETA: their layers, masks, keys or gate
        trainable, features, seta = sparse_setup(model, tok, cfg, init, lcfg, sub, samples,
                                                 template, device)
    else:
        lora.add_adapter(model, cfg.name, lcfg)
        if init is not None:
            lora.load_adapter_state(model, cfg.name, init.adapter)
        lora.set_adapter(model, cfg.name)
        if method.synthetic:  # SSR: written now, answered by this adapter as it starts
            rehearsed, sources = rehearsal.ssr_rehearsal(model, tok, cfg, template)
            samples = reconstruct(current, rehearsed, tok, ind, cfg.max_source, cfg.max_target,
                                  template)
        added_rows = method.routes and cfg.indicator == "added"
        trainable = trainable_parameters(model, cfg.name, added_rows)
    if cfg.grad_checkpoint:
        model.checkpoint_blocks()
    model.train()
    opt, peak = optimizer(cfg, trainable, cuda)
    amp = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype,
                         enabled=dtype != torch.float32)
    hidden = torch.compile(model.hidden) if cfg.compile else model.hidden
    frozen = lora.subexpert_counts(model)["used"] if method.sparse else 0  # earlier tasks' masks'
    total = cfg.epochs * math.ceil(len(samples) / cfg.batch_size)
    return Run(cfg, method, model, template, samples, trainable, opt, peak, total, device, amp,
               hidden, rank, world, len(rehearsed), sources, features=features, seta=seta,
               frozen=frozen)


def start_run_dir(run: Run, resumed: bool) -> None:
    """Say what is trained, then start (or restart) the run directory: every check has passed. The
    log keeps the steps before the checkpoint, since later ones are about to be redone."""
    cfg, model, method = run.cfg, run.model, run.method
    n_neg = run.rehearsed if method.routes else 0
    n_pos = len(run.samples) - n_neg
    said = f"{cfg.method} {cfg.name}: {n_pos} positive + {n_neg} negative samples, "
    if method.gate:
        said += f"{run.rehearsed} earlier queries for the gate, "
    said += f"{run.trained:,} trainable parameters, {run.template} prompts, "
    said += f"{run.total} steps on {run.device} in {cfg.dtype}"
    if run.world > 1:
        said += f" and {run.world - 1} more processes"
    if method.sparse:
        said += f"; {lora.free_share(model):.0%} of the new mask is trainable at its first step"
    print(said)
    if run.sources:
        print("rehearsed: " + "; ".join(run.sources))
    out = cfg.run_dir()
    if resumed:
        print(f"resuming {out} at step {run.step}/{run.total}")
    elif (out / CONFIG_FILE).exists():
        print(f"{out}: no checkpoint yet, starting over")
    logged = read_log(out / LOG_FILE, run.step) if resumed else []
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out, STATE_FILE, CONFIG_FILE, LOG_FILE, EXPERT_DIR)  # of a killed process
    write_json(out / CONFIG_FILE, dataclasses.asdict(cfg))
    atomic_write(out / LOG_FILE, lambda p: p.write_text("".join(line + "\n" for line in logged)))


def fit(run: Run) -> tuple[float, int]:
    """The training loop; returns the seconds it took and the tokens it saw."""
    cfg, out = run.cfg, run.cfg.run_dir()
    bar = tqdm(total=run.total, initial=run.step, desc=f"train {cfg.name}", unit="step",
               disable=not run.main)
    t_start, n_tokens = time.perf_counter(), 0
    with (out / LOG_FILE).open("a") if run.main else contextlib.nullcontext() as log:
        while run.step < run.total:
            epoch, chosen = global_batch(run)
            batch = [run.samples[i] for i in chosen]
            for group, peak in zip(run.opt.param_groups, run.peak):
                group["lr"] = peak * lr_scale(run.step, run.total)
            n_targets = sum(len(s.ids) - s.start for s in batch)
            t0 = time.perf_counter()
            loss_sum = backward(run, chosen, n_targets)
            if run.world > 1:
                loss_sum = all_reduce(run, loss_sum)
            # MoSEs/SETA's own terms: the one hook where a method's terms join the step
            extra = sparse_terms(run, chosen) if run.method.sparse else {}
            # max_grad_norm 1.0, the HF Trainer default; a diverged run stops here
            norm = torch.nn.utils.clip_grad_norm_(run.trainable.values(), 1.0)
            check_finite(run.step + 1, loss_sum / n_targets, norm)
            run.opt.step()
            run.step += 1
            tokens = sum(len(s.ids) - 1 for s in batch)
            n_tokens += tokens
            seconds = time.perf_counter() - t0
            rec = dict(step=run.step, steps=run.total, epoch=epoch, loss=loss_sum / n_targets,
                       lr=run.opt.param_groups[0]["lr"], tokens_per_s=tokens / seconds,
                       seconds=seconds, **extra)
            if run.main:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}",
                            tok_s=f"{n_tokens / (time.perf_counter() - t_start):.0f}")
            bar.update(1)
            if run.main and run.step % cfg.save_every == 0 and run.step < run.total:
                save_state(out / STATE_FILE, run.step, run.trainable, run.opt)
    bar.close()
    return time.perf_counter() - t_start, n_tokens


def global_batch(run: Run) -> tuple[int, list[int]]:
    """The epoch and the samples (indices) of the step's global batch, shuffled anew each epoch."""
    size = run.cfg.batch_size
    epoch, k = divmod(run.step, run.total // run.cfg.epochs)
    order = list(range(len(run.samples)))
    random.Random(f"{run.cfg.seed}/epoch{epoch}").shuffle(order)
    # by length, so that micro-batches pad little; the loss sums over tokens, so order is moot
    return epoch, sorted(order[k * size:(k + 1) * size], key=lambda i: len(run.samples[i].ids))


def backward(run: Run, chosen: list[int], n_targets: int) -> float:
    """This process's micro-batches of the batch, backward (Eq. 5); returns their summed NLL."""
    cfg, batch = run.cfg, [run.samples[i] for i in chosen]
    run.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for m in range(run.rank * cfg.micro_batch, len(batch), run.world * cfg.micro_batch):
        loss, nll = eq5_loss(run.model, run.hidden, batch[m:m + cfg.micro_batch], n_targets,
                             run.device, run.amp)
        loss.backward()
        loss_sum += nll
    return loss_sum


def all_reduce(run: Run, loss_sum: float) -> float:
    """Sum the gradients and the logged NLL over the processes, in one collective."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.trainable.values()]
    flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([loss_sum], device=run.device)])
    dist.all_reduce(flat)
    for p, g in zip(run.trainable.values(), flat[:-1].split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
    return flat[-1].item()


def trained_expert(run: Run, lcfg: lora.LoraConfig, sub: lora.SubExpertConfig | None,
                   keys: dict | None, imprints: dict | None) -> Expert:
    """The trained expert, of the kind the method trains, with what expert.json records of it."""
    cfg, counts = run.cfg, dict(trainable=run.trained, **run.counts)
    indicator = cfg.indicator if run.method.routes else UNROUTED
    info = (run.model, cfg.name, cfg.task, cfg.model, indicator, cfg.max_source, run.template, lcfg)
    if not run.method.sparse:
        return LoraExpert.from_model(*info, counts)
    # beside the bytes of as many per-task LoRA adapters (the stage adds its files' own)
    counts["lora_bytes"] = len(keys) * lora.lora_bytes(run.model, lcfg, cfg.model)
    return SubExpert.from_model(*info, sub, keys, imprints, counts)


def distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) the process group starts once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def train_sequence(cfg: TrainConfig, tasks: list[str]) -> Path:
    """Continual fine-tuning over `tasks`, a stage each (what each learns from: runs.plan_sequence),
    in a directory of system.json and a run directory per stage; re-running resumes."""
    root, stages, system = plan_sequence(cfg, tasks)
    for stage in stages:  # every stage's settings and data, before anything is written
        check_config(stage)
        rehearsal.training_data(stage)
    with one_writer(root / SYSTEM_FILE):  # one training of a sequence at a time
        finished = [s for s in stages if (s.run_dir() / EXPERT_DIR).exists()]
        for stage in finished:
            check_finished(stage)
        todo = [s for s in stages if s not in finished]

        def write_system() -> None:  # once the model has been seen to hold the lengths asked for
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(root, SYSTEM_FILE)
            write_json(root / SYSTEM_FILE, seal(system))
        if not todo and distributed()[0] == 0:
            write_system()
        for stage in todo:
            if distributed()[0] == 0:
                print(f"stage {stages.index(stage) + 1}/{len(stages)}: {stage.task}"
                      + (f" (+ {','.join(stage.previous)})" if stage.previous else ""))
            train(stage, write_system)
    return root


@dataclass
class SetaState:
    """SETA's memory (tau of earlier tasks' query features, their gate rows, the gate's outputs on
    them before this task), shared experts with importance and anchors, the new row's imprint."""
    memory: torch.Tensor | None
    memory_rows: torch.Tensor
    old: torch.Tensor | None
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    anchors: list[torch.Tensor]
    imprint: torch.Tensor


def sparse_setup(model: Llama, tok, cfg: TrainConfig, init: Expert | None, lcfg: lora.LoraConfig,
                 sub: lora.SubExpertConfig, samples: list[TrainSample], template: str,
                 device) -> tuple[dict[str, torch.nn.Parameter], torch.Tensor, SetaState | None]:
    """MoSEs/SETA's setup: the MoSE layers carrying every task, a mask for this one, and what picks
    the task (MoSEs: a prompt key; SETA: gate rows); returns what trains, f(x), SETA's state."""
    lora.add_subexperts(model, lcfg, sub)
    if init is not None:
        init.use(model)
    earlier = init.keys if init else {}
    # each task draws its own mask scores: carried over, the last task's winners, all held and
    # frozen, would fill the new task's mask and leave it almost nothing to train (see README)
    lora.redraw_scores(model, torch.Generator().manual_seed(cfg.seed * 1000 + len(earlier)))
    features = gate.query_features(model, [s.ids[:s.start] for s in samples], cfg.micro_batch)
    seta_gate = METHODS[cfg.method].gate
    # SETA: tau of each earlier task's queries, remembered with their task's gate row: the gate's
    # cross-entropy sees every task through them, and the routing regulariser keeps its outputs
    remembered = [(list(earlier).index(task_name(t)), ex) for t in cfg.previous if seta_gate
                  for ex in rehearsal_sets([t], cfg.tau, cfg.seed, cfg.max_train, cfg.data_dir)[0]]
    prompts = [prompt_ids(tok, ex.query, cfg.max_source, template) for _, ex in remembered]
    memory = gate.query_features(model, prompts, cfg.micro_batch) if prompts else None
    lora.set_task(model, cfg.name, learning=True)
    trainable = trainable_parameters(model, None, False)
    if not seta_gate:  # MoSEs: this task's prompt key, drawn apart from the earlier tasks' keys
        g = torch.Generator().manual_seed(cfg.seed * 1000 + len(earlier))
        key = torch.randn(model.config.dim, generator=g) * 0.02
        trainable["key"] = torch.nn.Parameter(key.to(device))
        return trainable, features, None
    memory_rows = torch.tensor([i for i, _ in remembered], dtype=torch.long, device=device)
    old = (F.softmax(gate.gate_logits(memory, torch.stack([*earlier.values()]).to(device)), -1)
           if prompts else None)  # the gate's outputs on them before this task
    # the unified gate, a row per task, all trained; the new row starts at the mean of its task's
    # normalised features (a nearest-mean router): random rows learn too slowly, queries being alike
    rows = [*earlier.values(), F.normalize(features, dim=-1).mean(0).cpu()]
    trainable["gate"] = torch.nn.Parameter(torch.stack(rows).float().to(device))
    pairs = lora.shared_weights(model)  # elastically anchored to their values now
    return trainable, features, SetaState(memory, memory_rows, old, pairs,
                                          [p.detach().clone() for p, _ in pairs], rows[-1])


def sparse_terms(run: Run, chosen: list[int]) -> dict[str, float]:
    """MoSEs/SETA's own terms of the step, backward once the batch's gradients are in (each process
    adds them itself: they penalise weights all hold alike); returns what the log shows of them."""
    cfg, trainable, seta, features = run.cfg, run.trainable, run.seta, run.features[chosen]
    if run.method.pull:  # MoSEs: this task's key toward its queries' features, 1 - cos, their mean
        pull = (1 - F.cosine_similarity(trainable["key"][None], features, dim=-1)).mean()
        (cfg.pull_weight * pull).backward()
        return dict(pull=pull.item(), mask_trainable=lora.free_share(run.model))
    # SETA's gate: this batch's queries to the newest row, the remembered ones to their own rows
    newest = torch.full((len(chosen),), len(trainable["gate"]) - 1, device=run.device)
    gate_ce = gate.gate_loss(trainable["gate"],
                          torch.cat([f for f in (seta.memory, features) if f is not None]),
                          torch.cat([seta.memory_rows, newest]))
    anchor = gate.elastic_anchor(seta.pairs, seta.anchors)
    reg = (gate.routing_regulariser(trainable["gate"], seta.memory, seta.old)
           if seta.memory is not None else torch.zeros(()))
    (gate_ce + cfg.anchor_weight * anchor + cfg.route_reg_weight * reg).backward()
    return dict(gate=gate_ce.item(), anchor=anchor.item(), route_reg=reg.item(),
                mask_trainable=lora.free_share(run.model))


def sparse_finish(run: Run, init: Expert | None) -> tuple[dict, dict]:
    """After training: this task's mask kept; each task's key (MoSEs: prompt keys; SETA: gate rows,
    all retrained), imprinted rows; SETA's importance updated (online EWC: this task's added)."""
    cfg, trainable = run.cfg, run.trainable
    earlier, imprints = (init.keys, init.imprints) if init else ({}, {})
    if run.method.pull:
        keys = {**earlier, cfg.name: trainable["key"].detach().cpu().clone()}
    else:
        keys = dict(zip([*earlier, cfg.name], trainable["gate"].detach().cpu().clone()))
        imprints = {**imprints, cfg.name: run.seta.imprint}
        chosen = random.Random(f"{cfg.seed}/importance").sample(
            run.samples, min(cfg.batch_size, len(run.samples)))
        run.model.eval()  # no dropout: the gradient of the model as it will be used
        fisher = gate.importance(run.model, [
            functools.partial(eq5_loss, run.model, run.hidden, [s], len(s.ids) - s.start,
                              run.device, run.amp) for s in chosen])
        for (_, imp), f in zip(run.seta.pairs, fisher):
            imp += f
    lora.finish_task(run.model, cfg.name)
    c = lora.subexpert_counts(run.model)
    new, mask = c["used"] - run.frozen, c[f"mask_{cfg.name}"]
    # for evaluate and report; trainable_share: the share of its mask the task could change
    run.counts.update(scores=c["weights"], mask=mask, new=new, trainable_share=new / mask,
                      held=c["used"], shared=c["shared"])
    return keys, imprints


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, list[str] | None]:
    """The run's settings, and the tasks of a sequence (None: one stage)."""
    p = argparse.ArgumentParser(description="Train one SEE expert (a LoRA adapter that answers its "
                                "task after <<pos>> and refuses earlier tasks' queries with "
                                "<<neg>>), a sequence of them, or a baseline (--method).")
    p.add_argument("--sequence", type=names, default=None,
                   help="comma-separated tasks to learn in turn, one stage each")
    p.add_argument("--order", default=None, choices=list(ORDERS),
                   help="the paper's task orders (Table 5; 10 = all ten)")
    add_arguments(p)
    p.set_defaults(task=None, previous=None)  # to tell whether they were given
    a = vars(p.parse_args(argv))
    sequence, order = a.pop("sequence"), a.pop("order")
    if sequence is not None and order or sequence == []:
        raise UserError("give one of --sequence and --order, naming at least one task")
    tasks = ORDERS[order] if order else sequence
    if tasks and (a["task"] is not None or a["previous"] is not None):
        raise UserError("--task and --previous are for one stage; --sequence/--order name every "
                        "task")
    a.update(task=TrainConfig.task if a["task"] is None else a["task"],
             previous=a["previous"] or [])
    return TrainConfig(**a), tasks


def main() -> None:
    with user_errors():
        cfg, tasks = parse_args()
        try:
            out = train_sequence(cfg, tasks) if tasks is not None else train(cfg)
        except KeyboardInterrupt:
            sys.exit("\ninterrupted: run the same command again to resume from the last checkpoint")
        rank = distributed()[0]
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0 and tasks:
            print(f"{cfg.method} system written to {out}\nevaluate it: python evaluate.py --run "
                  f"{out}")
        elif rank == 0:
            print(f"expert written to {out / EXPERT_DIR}\nevaluate it: python evaluate.py "
                  f"--expert {out / EXPERT_DIR} --task {cfg.task}")


if __name__ == "__main__":
    main()
