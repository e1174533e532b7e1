"""Train one SEE expert (paper Sec. 3, Expert Training): a new LoRA adapter on the frozen base
model, fitted to the reconstructed task D^_i (Eq. 4) with the loss of Eq. 5.

    python train.py --task qa                # E_1 of order 1: no earlier tasks, positives only
    python train.py --task qg --previous qa  # E_2: tau of qa's queries rehearsed as <<neg>>
    python train.py --order 1 --tau 0.1      # a whole sequence, one expert per stage (resumable)
    python train.py --order 1 --method non-rehearsal  # a baseline: one LoRA, each task in turn
    python train.py --order 1 --method seta  # SETA: masked task experts, shared experts, a gate
    torchrun --nproc_per_node 2 train.py --task qa  # data parallel: same result, same global batch
"""
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
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

import lora
from artifacts import NUMBER, check_fields, check_writable, inside, read_json, read_text
from checkpoint import atomic_write, load, model_tag, remove_leftovers, resolve_dtype
from data import ORDERS, Example, load_ood, load_task, rehearsal_sets, subsample
from errors import UserError, user_errors
from experts import (INDICATORS, TEMPLATES, TRAINING_FILE, UNROUTED, Expert, LoraExpert, SubExpert,
                     TrainSample, load_expert, prompt_ids, reconstruct, resolve_template,
                     setup_indicators)
from model import Llama
from router import gate_logits, query_features

STATE_FILE, CONFIG_FILE, LOG_FILE = "state.pt", "config.json", "log.jsonl"
EXPERT_DIR, SYSTEM_FILE = "expert", "system.json"


@dataclass(frozen=True)
class Method:
    """What sets a method apart: train.py, evaluate.py and report.py read these facts and no method
    names. A new method is a row of METHODS, and its own loss term if it has one (see pull_term)."""
    # as the paper's tables print it: {tau} (a percentage) and {sparsity} from its settings
    label: str
    help: str
    continues: bool = False  # stage i starts from stage i-1's adapter
    rehearses: bool = False  # stage i also learns from tau of T_1..T_{i-1} (routed: their queries)
    # indicator tokens: an expert per task, the experts routed by what they emit
    routes: bool = False
    joint: bool = False  # one stage learns every task at once
    sparse: bool = False  # one set of masked sub-experts holds every task, a key per task picks it
    gate: bool = False  # with sparse: anchored shared experts, and one gate over the tasks for keys
    run_name: tuple[str, ...] = ()  # the settings its default run directory names (format strings)

    @property
    def pull(self) -> bool:
        """MoSEs' prompt keys, each pulled toward its task's queries (a gate is
        trained otherwise)."""
        return self.sparse and not self.gate


# SEE and the paper's baselines (Sec. 4.1), then MoSEs and SETA. Only SEE trains indicators and
# routes; the baselines train plain (q, r) samples. What each stage learns from: train_sequence.
METHODS = {
    "see": Method("SEE({tau})",
                  "a new expert per task, tau of earlier tasks' queries as <<neg>>, sequential "
                  "routing",
                  rehearses=True, routes=True, run_name=("tau{tau:g}",)),
    "non-rehearsal": Method("Non-rehearsal", "one LoRA fine-tuned on each task in turn",
                            continues=True),
    "replay": Method("RandSel({tau})",
                     "one LoRA fine-tuned on each task in turn plus tau of earlier tasks' full "
                     "samples (RandSel)",
                     continues=True, rehearses=True, run_name=("tau{tau:g}",)),
    "mtl": Method("MTL", "one LoRA on all tasks at once", joint=True),
    "stl": Method("AvgSTL", "one LoRA per task, each scored on its own task (AvgSTL)"),
    "moses": Method("MoSEs(c={sparsity})",
                    "sparse sub-experts, a binary mask per task over their weights, the task "
                    "picked by prompt keys (MoSEs)",
                    continues=True, sparse=True,
                    run_name=("c{sparsity:g}", "e{experts}k{top_k}", "pull{pull_weight:g}")),
    "seta": Method("SETA(c={sparsity})",
                   "MoSEs' masked sub-experts as task experts plus anchored shared experts, the "
                   "task picked by a unified gate (SETA)",
                   continues=True, rehearses=True, sparse=True, gate=True,
                   run_name=("c{sparsity:g}", "e{experts}k{top_k}s{shared}", "tau{tau:g}",
                             "anchor{anchor_weight:g}", "rr{route_reg_weight:g}")),
}
# SEE's negatives: earlier tasks' queries, or as many LIMA queries (pseudo-negatives, paper Table 3)
NEGATIVES = ("tasks", "lima")


@dataclass
class TrainConfig:
    task: str = "qa"
    # earlier tasks, rehearsed (as negatives for SEE)
    previous: list[str] = field(default_factory=list)
    method: str = "see"
    negatives: str = "tasks"
    init: str | None = None  # an expert whose LoRA this one starts from (else B = 0)
    # MoSEs: sub-experts per layer, how many the router mixes, the share c of each weight tensor a
    # task's mask keeps, and the weight of the pull constraint that aligns its key with its queries
    experts: int = 2
    top_k: int = 2
    sparsity: float = 0.3
    pull_weight: float = 0.1
    # SETA (with the MoSEs settings above): shared experts per layer, the weight of elastic
    # anchoring (their importance-weighted pull back to the earlier tasks' values) and of routing
    # regularisation (the gate's outputs on tau of earlier tasks' queries kept as they were)
    shared: int = 1
    anchor_weight: float = 1.0
    route_reg_weight: float = 1.0
    model: str = "smollm2-135m"
    data_dir: str | None = None
    out: str | None = None  # default runs/<task>-<model>
    indicator: str = "added"
    template: str = "auto"  # prompt: the checkpoint's chat template if it has one, else plain
    tau: float = 0.1  # rehearsal ratio
    # the paper's setup (Sec. 4.1): rank, dropout, lr, global batch, epochs, lengths; alpha, the
    # targets, the cosine schedule and gradient clipping are our choices (see README)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 2e-4
    # the new <<pos>>/<<neg>> rows start from nothing, so learn faster than the
    # adapter; "adapter": at --lr, as in-vocabulary indicators (whose rows are the base
    # model's) learn through it (Table 4)
    indicator_lr: float | str = 1e-2
    epochs: int = 3
    batch_size: int = 32  # global batch, reached by gradient accumulation
    micro_batch: int = 4
    max_source: int = 1024
    max_target: int = 512
    max_train: int | None = None  # subsample each task's training set to this many examples
    seed: int = 0
    # default bfloat16 autocast on CUDA and CPUs with native bf16, else float32
    dtype: str | None = None
    save_every: int = 20  # optimizer steps between resumable checkpoints
    compile: bool = False  # torch.compile the transformer body
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass

    @property
    def name(self) -> str:
        return Path(self.task).stem.replace(".", "_")

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}-{model_tag(self.model)}")


# settings that do not change what is trained, so a resumed run may differ in them
RESUMABLE_CHANGES = {"out", "save_every", "data_dir", "compile", "grad_checkpoint"}


def comparable(settings: dict) -> dict:
    """Settings as a resumed run must match them: a setting added since the run was written counts
    as its default, paths as resolved, and what does not change the result is left out."""
    settings = {**dataclasses.asdict(TrainConfig()), **settings}
    # none recorded (an older run): this machine's default
    settings["dtype"] = dtype_name(settings["dtype"])
    if settings["init"]:
        settings["init"] = str(Path(settings["init"]).resolve())
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


def dtype_name(name: str | None) -> str:
    """--dtype as this machine resolves it (checkpoint.resolve_dtype), e.g. 'float32'."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(resolve_dtype(name, device)).removeprefix("torch.")


def resume_state(cfg: TrainConfig) -> dict | None:
    """The state of an unfinished run of the same config in the run directory; refuses a finished or
    different run."""
    out = cfg.run_dir()
    if (out / EXPERT_DIR).exists():
        raise UserError(f"{out} already holds a trained expert; pass another --out")
    if not (out / CONFIG_FILE).exists():
        if (out / STATE_FILE).exists():
            raise UserError(f"{out / CONFIG_FILE} not found beside {STATE_FILE}: the checkpoint's "
                            f"settings are unknown")
        return None
    check_same_run(cfg)
    return read_state(out / STATE_FILE) if (out / STATE_FILE).exists() else None


def check_same_run(cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a run directory whose config.json is unreadable or holds other settings than cfg
    (but `ignore`)."""
    out = cfg.run_dir()
    written = read_json(out / CONFIG_FILE)
    check_settings(written, out / CONFIG_FILE)
    config, saved = comparable(dataclasses.asdict(cfg)), comparable(written)
    config, saved = [{k: v for k, v in d.items() if k not in ignore} for d in (config, saved)]
    changed = sorted(k for k in config.keys() | saved.keys() if config.get(k) != saved.get(k))
    if changed:
        changes = ", ".join(f"{k}: {saved.get(k)} -> {config.get(k)}" for k in changed)
        raise UserError(f"{out} holds a run with other settings ({changes}); pass another --out")


def check_settings(settings: dict, path: Path) -> None:
    """Refuse written settings (config.json, system.json) of a type other than
    TrainConfig's field."""
    kinds = {"float": NUMBER, "int": int, "str": str, "bool": bool, "list[str]": list}
    for f in dataclasses.fields(TrainConfig):
        kind = kinds[f.type.split(" | ")[0]]
        if f.name == "indicator_lr" and settings.get(f.name) == "adapter":
            continue  # the one rate given by name
        if f.name in settings and not (settings[f.name] is None and "None" in f.type):
            check_fields(settings, path, **{f.name: kind})


def read_state(path: Path) -> dict:
    """A resumable checkpoint, as save_state writes it (tensors only: weights_only refuses any
    pickled object)."""
    try:
        with warnings.catch_warnings():  # a hostile pickle also draws a protocol warning
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails on a torn or foreign file with many kinds of error
        reason = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"{path}: not a checkpoint of train.py "
                        f"({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint of train.py (a {type(state).__name__})")
    check_fields(state, path, step=int, params=dict, optimizer=dict, rng=torch.Tensor)
    if state["step"] < 1 or state["rng"].dtype != torch.uint8:
        raise UserError(f"{path}: not a checkpoint of train.py (step {state['step']}, rng "
                        f"{state['rng'].dtype})")
    return state


def restore(state: dict, trainable: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
            path: Path) -> None:
    """Put a checkpoint's parameters, optimizer and random state in place; one that does not
    fit is refused."""
    params = state["params"]
    wrong = sorted(k for k in params.keys() | trainable.keys() if k not in trainable
                   or not isinstance(params.get(k), torch.Tensor)
                   or params[k].shape != trainable[k].shape)
    if wrong:
        raise UserError(f"{path}: its parameters do not fit this run ({', '.join(wrong[:3])})")
    try:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: its optimizer or random state does not fit this run "
                        f"({e})") from None
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(params[k])
    if state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def read_log(path: Path, steps: int | None) -> list[str]:
    """The lines of a run's log.jsonl, one per step from 1 on. An unfinished run (`steps` its
    checkpoint's step) may have a torn last line, from a crash mid-write: it and any step after the
    checkpoint are dropped. A finished run's log (`steps` None) must be whole."""
    lines = read_text(path).split("\n")
    if lines[-1] and steps is None:
        raise UserError(f"{path}: its last line is cut short, in a finished run")
    lines = [line for line in lines[:-1] if line]  # the last is empty or torn: no newline after it
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or record.get("step") != n:
            raise UserError(f"{path}:{n}: expected the record of step {n}")
    if steps is not None and len(lines) < steps:
        raise UserError(f"{path}: ends at step {len(lines)}, before the checkpoint's step {steps}")
    return lines[:steps]


def training_data(cfg: TrainConfig) -> tuple[list[Example], list[Example], list[str]]:
    """The current task's examples, tau of each earlier task's to rehearse (RandSel, sized as the
    paper's data gives it) and where they came from; with pseudo-negatives, as many LIMA queries
    instead of the earlier tasks' (paper Table 3)."""
    current = subsample(load_task(cfg.task, "train", cfg.data_dir), cfg.max_train, cfg.seed)
    if not current:
        raise UserError(f"task {cfg.task} has no training examples")
    rehearsed, sources = rehearsal_sets(cfg.previous, cfg.tau, cfg.seed, cfg.max_train,
                                        cfg.data_dir)
    if cfg.negatives == "lima":
        pool = load_ood(directory=cfg.data_dir, split="train")
        if len(rehearsed) > len(pool):
            raise UserError(f"{len(rehearsed)} pseudo-negatives asked for, but LIMA has only "
                            f"{len(pool)} to spare; lower --tau")
        rehearsed = subsample(pool, len(rehearsed), cfg.seed)
        sources = [f"LIMA: {len(rehearsed)} pseudo-negatives in place of {'; '.join(sources)}"]
    return current, rehearsed, sources


def trainable_parameters(model: Llama, adapter: str | None,
                         indicator_rows: bool) -> dict[str, torch.nn.Parameter]:
    """Freeze the base model; only the adapter (None: the MoSE layers) and the added indicator rows
    learn, in fp32."""
    model.requires_grad_(False)
    if adapter:
        learned = lora.lora_parameters(model, adapter)
    else:
        learned = lora.subexpert_parameters(model)
    learn = {id(p) for p in learned}
    trainable = {n: p for n, p in model.named_parameters()
                 if id(p) in learn or (indicator_rows and n in ("extra_embed", "extra_head"))}
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


def collate(batch: list[TrainSample], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token labels; -100 (ignored) on the query and
    padding (Eq. 5)."""
    T = max(len(s.ids) for s in batch) - 1
    x = torch.zeros(len(batch), T, dtype=torch.long)
    y = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, s in enumerate(batch):
        ids = torch.tensor(s.ids)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, s.start - 1:len(ids) - 1] = ids[s.start:]  # position j predicts token j+1
    return x.to(device), y.to(device)


def target_nll(model: Llama, hidden, batch: list[TrainSample], device, amp) -> torch.Tensor:
    """The summed NLL of a micro-batch's target tokens (Eq. 5 before its mean)."""
    x, y = collate(batch, device)
    with amp:
        # only target positions go through the output head
        logits = model.head(hidden(x)[y != -100])
    return F.cross_entropy(logits.float(), y[y != -100], reduction="sum")


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


def importance(model: Llama, hidden, samples: list[TrainSample], cfg: "TrainConfig", device,
               amp) -> list[torch.Tensor]:
    """Each shared-expert weight's importance to the task just learned: the diagonal empirical
    Fisher, the mean over one global batch of the task's own samples of each sample's squared
    loss gradient, at the final weights; scaled to mean 1, so that --anchor-weight keeps one
    meaning across models and tasks."""
    model.eval()  # no dropout: the gradient of the model as it will be used
    pairs = lora.shared_weights(model)
    fisher = [torch.zeros_like(p) for p, _ in pairs]
    for s in random.Random(f"{cfg.seed}/importance").sample(samples,
                                                            min(cfg.batch_size, len(samples))):
        for p, _ in pairs:
            p.grad = None
        (target_nll(model, hidden, [s], device, amp) / (len(s.ids) - s.start)).backward()
        for f, (p, _) in zip(fisher, pairs):
            f += p.grad ** 2
    mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
    return [f / mean.clamp_min(1e-30) for f in fisher]


def checkpoint_blocks(model: Llama) -> None:
    """Activation checkpointing (--grad-checkpoint): each transformer block keeps only
    its inputs for the backward pass and recomputes its activations there, which costs
    about one more forward pass."""
    for block in model.model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                          use_reentrant=False)


def lr_scale(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0, no warm-up


def save_state(path: Path, step: int, params: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer) -> None:
    state = dict(step=step, params={k: p.detach().cpu() for k, p in params.items()},
                 optimizer=opt.state_dict(), rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    atomic_write(path, lambda p: torch.save(state, p))


def distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the process group is started once;
    else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def check_config(cfg: TrainConfig) -> tuple[lora.LoraConfig, lora.SubExpertConfig | None]:
    """Refuse impossible settings before any data or model is loaded; returns the adapter's settings
    (LoRA, and MoSEs/SETA's sub-experts or None)."""
    counts = {"--epochs": cfg.epochs, "--batch-size": cfg.batch_size,
              "--micro-batch": cfg.micro_batch,
              "--save-every": cfg.save_every, "--max-source": cfg.max_source,
              "--max-target": cfg.max_target}
    if cfg.max_train is not None:  # None: every example; 0 would train on nothing
        counts["--max-train"] = cfg.max_train
    bad = [f"{flag} {v}" for flag, v in counts.items() if v < 1]
    if bad:
        raise UserError(f"need positive counts, got {', '.join(bad)}")
    indicator_lr = cfg.lr if cfg.indicator_lr == "adapter" else cfg.indicator_lr
    rates = {"--lr": cfg.lr, "--indicator-lr": indicator_lr}
    weights = {"--pull-weight": cfg.pull_weight, "--anchor-weight": cfg.anchor_weight,
               "--route-reg-weight": cfg.route_reg_weight}
    bad = [f"{flag} {v}" for flag, v in rates.items() if not 0 < v < math.inf] + \
        [f"{flag} {v}" for flag, v in weights.items() if not 0 <= v < math.inf]
    if bad:
        raise UserError(f"need finite learning rates > 0 and weights >= 0, got {', '.join(bad)}")
    if not 0 <= cfg.tau <= 1:
        raise UserError(f"--tau must be in [0, 1], got {cfg.tau}")
    if cfg.task in cfg.previous:
        raise UserError(f"task {cfg.task!r} cannot also be an earlier task (--previous)")
    if cfg.method not in METHODS or cfg.negatives not in NEGATIVES:
        raise UserError(f"unknown method {cfg.method!r} or negatives {cfg.negatives!r}; "
                        f"known: {', '.join(METHODS)}; {', '.join(NEGATIVES)}")
    if cfg.indicator not in INDICATORS or cfg.template not in TEMPLATES:
        raise UserError(f"unknown indicator {cfg.indicator!r} or template {cfg.template!r}")
    method = METHODS[cfg.method]
    if cfg.negatives == "lima" and not method.routes:
        raise UserError("pseudo-negatives (--negatives lima) are for --method see only")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch "
                        f"{cfg.micro_batch}")
    lcfg = lora.LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))
    sub = None
    if method.sparse:
        shared = cfg.shared if method.gate else 0
        sub = lora.SubExpertConfig(cfg.experts, cfg.top_k, cfg.sparsity, shared)
    if method.sparse and not method.rehearses and cfg.previous:
        raise UserError("MoSEs rehearses nothing (no --previous)")
    if method.gate and cfg.shared < 1:
        raise UserError(f"SETA needs --shared-experts >= 1, got {cfg.shared}")
    check_writable(cfg.run_dir() / CONFIG_FILE)
    return lcfg, sub


def check_init(cfg: TrainConfig, lcfg: lora.LoraConfig,
               sub: lora.SubExpertConfig | None) -> Expert | None:
    """The expert this stage starts from (--init), refused if it cannot be continued by this one."""
    method = METHODS[cfg.method]
    init = load_expert(cfg.init) if cfg.init else None
    if init is None:
        if method.gate and cfg.previous:
            raise UserError("SETA with --previous needs --init: the earlier stage's expert, whose "
                            "gate is to be kept")
        return None
    init_sub = init.sub if isinstance(init, SubExpert) else None
    if (init.lora, init_sub) != (lcfg, sub):
        raise UserError(f"{cfg.init} has adapter settings {init.lora}, {init_sub}, not {lcfg}, "
                        f"{sub}")
    if method.gate and {replace(cfg, task=t).name for t in cfg.previous} != set(init.keys):
        raise UserError(f"SETA's --previous must be the tasks {cfg.init} has learned "
                        f"({', '.join(init.keys)}): the gate is kept on their queries")
    if method.sparse and cfg.name in init.keys:
        raise UserError(f"{cfg.init} has learned task {cfg.name!r} already")
    if method.sparse and init.training is None:
        raise UserError(f"{cfg.init} has no {TRAINING_FILE} (its free weights, to train on); it "
                        f"can be evaluated, not continued")
    return init


@dataclass
class SetaState:
    """What SETA's gate loss and penalties need beside the model: tau of each earlier task's queries
    (their features `memory`, their task's gate row, the gate's outputs on them before this task),
    the shared experts' weights with their importance, and their values after the earlier tasks."""
    memory: torch.Tensor | None
    memory_rows: torch.Tensor
    old: torch.Tensor | None
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    anchors: list[torch.Tensor] = field(default_factory=list)
    imprint: torch.Tensor | None = None  # this task's gate row as imprinted, before training


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
    steps_per_epoch: int
    total: int
    device: str
    amp: contextlib.AbstractContextManager
    hidden: object  # the transformer body, compiled with --compile
    rank: int
    world: int
    step: int = 0
    features: torch.Tensor | None = None  # MoSEs/SETA: f(x) of each sample's query
    seta: SetaState | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig) -> Path:
    """Train the expert and write it to <run dir>/expert; returns the run directory.

    Under torchrun every process takes every world-th micro-batch of each global batch and the
    gradients are summed across processes before the step: data parallel, with the optimizer step
    of one process at the same global batch. Only rank 0 writes files.
    """
    lcfg, sub = check_config(cfg)
    current, rehearsed, sources = training_data(cfg)
    init = check_init(cfg, lcfg, sub)
    # config.json records the dtype the run computes in
    cfg = replace(cfg, dtype=dtype_name(cfg.dtype))
    state = resume_state(cfg)
    run = setup(cfg, init, lcfg, sub, current, rehearsed)
    if state is not None:
        resume(run, state)
    if run.world > 1:  # every process starts from rank 0's weights, as DDP does
        for p in run.trainable.values():
            dist.broadcast(p.data, 0)
    if run.main:
        start_run_dir(run, len(rehearsed), sources, state is not None)
    elapsed, n_tokens = fit(run)
    keys, imprints = task_keys(run, init)
    if run.method.sparse:
        lora.finish_task(run.model, cfg.name)
    out = cfg.run_dir()
    if run.main:
        speed = n_tokens / max(elapsed, 1e-9)
        print(f"trained {run.step} steps in {elapsed:.0f} s, {speed:.0f} tokens/s")
        trained_expert(run, lcfg, sub, keys, imprints).save(out / EXPERT_DIR)
        (out / STATE_FILE).unlink(missing_ok=True)
    if run.world > 1:
        dist.barrier()  # the next stage (on any process) may read this expert
    return out


def setup(cfg: TrainConfig, init: Expert | None, lcfg: lora.LoraConfig,
          sub: lora.SubExpertConfig | None, current: list[Example],
          rehearsed: list[Example]) -> Run:
    """The run's model and adapter, indicators, samples (Eq. 4), trainable parameters and
    optimizer."""
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
    # Eq. 4; SETA's experts see only the task's own samples (its rehearsed queries go to the gate
    # alone)
    learned = [] if method.gate else rehearsed
    samples = reconstruct(current, learned, tok, ind, cfg.max_source, cfg.max_target, template)
    features = seta = None
    if method.sparse:
        features, seta = add_subexperts(model, tok, cfg, init, lcfg, sub, samples, template, device)
    else:
        lora.add_adapter(model, cfg.name, lcfg)
        if init is not None:
            lora.load_adapter_state(model, cfg.name, init.adapter)
        lora.set_adapter(model, cfg.name)
    added_rows = method.routes and cfg.indicator == "added"
    trainable = trainable_parameters(model, None if method.sparse else cfg.name, added_rows)
    add_task_key(trainable, cfg, init, model, features, device, seta)
    # elastic anchoring pulls the shared experts back toward their values after the earlier tasks
    if method.gate:
        seta.pairs = lora.shared_weights(model)
        seta.anchors = [p.detach().clone() for p, _ in seta.pairs]
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    model.train()
    opt, peak = optimizer(cfg, trainable, cuda)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    amp = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype,
                         enabled=dtype != torch.float32)
    hidden = torch.compile(model.hidden) if cfg.compile else model.hidden
    return Run(cfg, method, model, template, samples, trainable, opt, peak, steps_per_epoch,
               cfg.epochs * steps_per_epoch, device, amp, hidden, rank, world, features=features,
               seta=seta)


def add_subexperts(model: Llama, tok, cfg: TrainConfig, init: Expert | None, lcfg: lora.LoraConfig,
                   sub: lora.SubExpertConfig, samples: list[TrainSample], template: str,
                   device) -> tuple[torch.Tensor, SetaState | None]:
    """MoSEs/SETA: one set of MoSE layers carries every task: the previous stage's, with their
    masks, and a mask for this task. Returns what the pull constraint (MoSEs) or the gate (SETA)
    sees of each sample's query, f(x) from the frozen base model, and SETA's remembered queries."""
    lora.add_subexperts(model, lcfg, sub)
    if init is not None:
        init.use(model)
    # each task draws its own mask scores: carried over, the last task's winners, all held and
    # frozen, would fill the new task's mask and leave it almost nothing to train (see README)
    lora.redraw_scores(model, torch.Generator().manual_seed(cfg.seed * 1000
                                                            + len(init.keys if init else {})))
    features = query_features(model, [s.ids[:s.start] for s in samples], cfg.micro_batch)
    seta = None
    # tau of each earlier task's queries, remembered with their task's gate row:
    # the gate's cross-entropy sees every task through them, and the routing
    # regulariser keeps its outputs on them
    if METHODS[cfg.method].gate:
        remembered = [(list(init.keys).index(replace(cfg, task=t).name), ex) for t in cfg.previous
                      for ex in training_data(replace(cfg, previous=[t]))[1]]
        prompts = [prompt_ids(tok, ex.query, cfg.max_source, template) for _, ex in remembered]
        memory = query_features(model, prompts, cfg.micro_batch) if prompts else None
        memory_rows = torch.tensor([i for i, _ in remembered], dtype=torch.long, device=device)
        old_rows = torch.stack(list(init.keys.values())).to(device) if init is not None else None
        old = F.softmax(gate_logits(memory, old_rows), dim=-1) if prompts else None
        seta = SetaState(memory, memory_rows, old)
    lora.set_task(model, cfg.name, learning=True)
    return features, seta


def add_task_key(trainable: dict[str, torch.nn.Parameter], cfg: TrainConfig, init: Expert | None,
                 model: Llama,
                 features: torch.Tensor | None, device, seta: SetaState | None) -> None:
    """What picks this task at inference, trained with the rest: MoSEs' prompt key, SETA's gate."""
    method = METHODS[cfg.method]
    if method.pull:  # this task's prompt key, drawn apart from the earlier tasks' keys
        g = torch.Generator().manual_seed(cfg.seed * 1000 + len(init.keys if init else {}))
        key = torch.randn(model.config.dim, generator=g) * 0.02
        trainable["key"] = torch.nn.Parameter(key.to(device))
    # SETA's unified gate: one row per task so far, every row trained. The new row is
    # imprinted: it starts at the mean of its task's normalised query features, so the gate
    # begins as a nearest-mean router; random rows learn too slowly, as the queries of all
    # tasks have very similar features
    if method.gate:
        rows = [*(init.keys.values() if init else []), F.normalize(features, dim=-1).mean(0).cpu()]
        trainable["gate"] = torch.nn.Parameter(torch.stack(rows).float().to(device))
        seta.imprint = rows[-1]


def optimizer(cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter],
              cuda: bool) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW and its groups' peak learning rates. What starts from nothing (indicator rows, a prompt
    key) learns at its own rate; SETA's gate starts imprinted, so learns at the adapter's (a step at
    1e-2, on query features as alike as SmolLM2's, can turn a row further than the angle between two
    tasks). A fresh optimizer per stage and no weight decay: MoSEs' held weights get zero gradients,
    so stay exactly."""
    fresh = [p for n, p in trainable.items() if n.startswith("extra_") or n == "key"]
    fresh_lr = cfg.lr if cfg.indicator_lr == "adapter" else cfg.indicator_lr
    rest = [p for p in trainable.values() if all(p is not q for q in fresh)]
    groups = [dict(params=rest, lr=cfg.lr), dict(params=fresh, lr=fresh_lr)]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=cuda)
    return opt, [g["lr"] for g in opt.param_groups]


def resume(run: Run, state: dict) -> None:
    """Continue an unfinished run from its checkpoint."""
    out = run.cfg.run_dir()
    run.step = state["step"]
    if run.step > run.total:
        raise UserError(f"{out / STATE_FILE}: at step {run.step}, "
                        f"past this run's {run.total} steps")
    restore(state, run.trainable, run.opt, out / STATE_FILE)
    if run.main:
        print(f"resuming {out} at step {run.step}/{run.total}")


def start_run_dir(run: Run, n_rehearsed: int, sources: list[str], resumed: bool) -> None:
    """Say what is trained, then start (or restart) the run directory: every check has passed. The
    log keeps the steps before the checkpoint, since later ones are about to be redone."""
    cfg, model, method = run.cfg, run.model, run.method
    n_neg = n_rehearsed if method.routes else 0
    # held by earlier tasks' masks
    frozen = lora.subexpert_counts(model)["used"] if method.sparse else 0
    n_trained = sum(p.numel() for p in run.trainable.values()) - frozen
    n_pos = len(run.samples) - n_neg
    said = f"{cfg.method} {cfg.name}: {n_pos} positive + {n_neg} negative samples, "
    if method.gate:
        said += f"{n_rehearsed} earlier queries for the gate, "
    said += f"{n_trained:,} trainable parameters, {run.template} prompts, "
    said += f"{run.total} steps on {run.device}"
    if run.world > 1:
        said += f" and {run.world - 1} more processes"
    if method.sparse:
        said += f"; {lora.free_share(model):.0%} of the new mask is trainable at its first step"
    print(said)
    if sources:
        print("rehearsed: " + "; ".join(sources))
    out = cfg.run_dir()
    logged = read_log(out / LOG_FILE, run.step) if resumed else []
    out.mkdir(parents=True, exist_ok=True)
    # of a process killed mid-write
    remove_leftovers(out, STATE_FILE, CONFIG_FILE, LOG_FILE, EXPERT_DIR)
    atomic_write(out / CONFIG_FILE,
                 lambda p: p.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"))
    atomic_write(out / LOG_FILE, lambda p: p.write_text("".join(line + "\n" for line in logged)))


def fit(run: Run) -> tuple[float, int]:
    """The training loop: learning rate, micro-batches, backward, the sum across processes,
    clipping, the step, the log, a checkpoint. Returns the seconds it took and the tokens it saw."""
    cfg = run.cfg
    out = cfg.run_dir()
    bar = tqdm(total=run.total, initial=run.step, desc=f"train {cfg.name}", unit="step",
               disable=not run.main)
    t_start, n_tokens = time.perf_counter(), 0
    with (out / LOG_FILE).open("a") if run.main else contextlib.nullcontext() as log:
        while run.step < run.total:
            epoch, chosen = global_batch(run)
            batch = [run.samples[i] for i in chosen]
            for group, peak in zip(run.opt.param_groups, run.peak):
                group["lr"] = peak * lr_scale(run.step, run.total)
            # Eq. 5 as SFT implementations compute it: the mean NLL over all target tokens of the
            # global batch
            n_targets = sum(len(s.ids) - s.start for s in batch)
            t0 = time.perf_counter()
            loss_sum, pull_sum = backward(run, chosen, n_targets)
            # the sum of every process's share: the gradient of the whole global batch
            if run.world > 1:
                loss_sum, pull_sum = all_reduce(run, loss_sum, pull_sum)
            extra = method_terms(run, chosen, pull_sum)
            # max_grad_norm 1.0, the HF Trainer default
            torch.nn.utils.clip_grad_norm_(run.trainable.values(), 1.0)
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
    """The epoch and the samples (indices) of the step's global batch: each epoch
    shuffles them anew."""
    cfg = run.cfg
    epoch, k = divmod(run.step, run.steps_per_epoch)
    order = list(range(len(run.samples)))
    random.Random(f"{cfg.seed}/epoch{epoch}").shuffle(order)
    # the global batch in order of length, so that micro-batches hold similar lengths and
    # little padding; the loss is a sum over its tokens, so the order does not change it
    chosen = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
    return epoch, sorted(chosen, key=lambda i: len(run.samples[i].ids))


def backward(run: Run, chosen: list[int], n_targets: int) -> tuple[float, float]:
    """This process's share of the global batch, a micro-batch at a time: the gradients of
    Eq. 5 (the NLL over `n_targets` target tokens) and of MoSEs' pull term. Returns the
    share's summed NLL and pull."""
    cfg = run.cfg
    batch = [run.samples[i] for i in chosen]
    for p in run.trainable.values():
        p.grad = None
    loss_sum, pull_sum = 0.0, 0.0
    for m in range(run.rank * cfg.micro_batch, len(batch), run.world * cfg.micro_batch):
        part = chosen[m:m + cfg.micro_batch]
        nll = target_nll(run.model, run.hidden, batch[m:m + cfg.micro_batch], run.device, run.amp)
        pull = pull_term(run, part)
        (nll / n_targets + cfg.pull_weight * pull / len(batch)).backward()
        loss_sum += nll.item()
        pull_sum += pull.item()
    return loss_sum, pull_sum


def all_reduce(run: Run, loss_sum: float, pull_sum: float) -> tuple[float, float]:
    """Sum the gradients and the logged sums over the processes, in one collective."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.trainable.values()]
    flat = torch.cat([g.flatten() for g in grads]
                     + [torch.tensor([loss_sum, pull_sum], device=run.device)])
    dist.all_reduce(flat)
    for p, g in zip(run.trainable.values(), flat[:-2].split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
    loss_sum, pull_sum = flat[-2:].tolist()
    return loss_sum, pull_sum


def pull_term(run: Run, part: list[int]) -> torch.Tensor:
    """MoSEs' pull constraint on a micro-batch (samples `part`): this task's key toward its queries'
    features, 1 - cos summed over them; zero for the other methods."""
    if not run.method.pull:
        return torch.zeros((), device=run.device)
    f = run.features[part]
    return (1 - F.cosine_similarity(run.trainable["key"][None], f, dim=-1)).sum()


def method_terms(run: Run, chosen: list[int], pull_sum: float) -> dict[str, float]:
    """The method's own terms of the step, once the batch's gradients are in, and what the log shows
    of them: MoSEs' pull, SETA's gate loss and penalties, the share of a new mask left to train."""
    extra = dict(pull=pull_sum / len(chosen)) if run.method.pull else {}
    if run.method.gate:
        extra = seta_terms(run, chosen)
    if run.method.sparse:
        extra.update(mask_trainable=lora.free_share(run.model))
    return extra


def seta_terms(run: Run, chosen: list[int]) -> dict[str, float]:
    """SETA's gate loss, elastic anchoring and routing regulariser, backward: penalties on weights
    every process holds alike, so each adds their gradient itself."""
    cfg, trainable, seta = run.cfg, run.trainable, run.seta
    memory, features = seta.memory, run.features
    # the gate: this batch's queries to the newest row, the remembered ones to their own rows
    newest = torch.full((len(chosen),), len(trainable["gate"]) - 1, device=run.device)
    gate = gate_loss(trainable["gate"],
                     torch.cat([f for f in (memory, features[chosen]) if f is not None]),
                     torch.cat([seta.memory_rows, newest]))
    anchor = elastic_anchor(seta.pairs, seta.anchors)
    reg = routing_regulariser(trainable["gate"], memory,
                              seta.old) if memory is not None else torch.zeros(())
    (gate + cfg.anchor_weight * anchor + cfg.route_reg_weight * reg).backward()
    return dict(gate=gate.item(), anchor=anchor.item(), route_reg=reg.item())


def task_keys(run: Run, init: Expert | None) -> tuple[dict | None, dict | None]:
    """After training: each task's key (MoSEs: prompt keys; SETA: gate rows) and SETA's imprinted
    rows, with SETA's importance of the shared experts updated (online EWC: this task's importance
    joins the earlier tasks')."""
    cfg, trainable, method = run.cfg, run.trainable, run.method
    keys = imprints = None
    if method.gate:
        new = importance(run.model, run.hidden, run.samples, cfg, run.device, run.amp)
        for (_, imp), f in zip(run.seta.pairs, new):
            imp += f
        keys = dict(zip([*(init.keys if init else {}), cfg.name],
                        trainable["gate"].detach().cpu().clone()))
        imprints = {**(init.imprints if init else {}), cfg.name: run.seta.imprint}
    if method.pull:
        keys = {**(init.keys if init else {}), cfg.name: trainable["key"].detach().cpu().clone()}
    return keys, imprints


def trained_expert(run: Run, lcfg: lora.LoraConfig, sub: lora.SubExpertConfig | None,
                   keys: dict | None, imprints: dict | None) -> Expert:
    """The trained expert, of the kind the method trains."""
    cfg = run.cfg
    indicator = cfg.indicator if run.method.routes else UNROUTED
    info = (run.model, cfg.name, cfg.task, cfg.model, indicator, cfg.max_source, run.template, lcfg)
    if run.method.sparse:
        return SubExpert.from_model(*info, sub, keys, imprints)
    return LoraExpert.from_model(*info)


def train_sequence(cfg: TrainConfig, tasks: list[str]) -> Path:
    """Continual fine-tuning over `tasks`, one stage each, with cfg.method
    deciding what a stage learns from:

    see            stage i: a new expert on T_i, tau of the queries of T_1..T_{i-1} as negatives
    non-rehearsal  stage i: the LoRA of stage i-1, fine-tuned on T_i
    replay         stage i: the LoRA of stage i-1, fine-tuned on T_i plus
    tau of T_1..T_{i-1} in full
    moses          stage i: the sub-experts of stage i-1, a new mask and key for T_i
    seta           as moses, plus the shared experts and a gate kept on tau
    of T_1..T_{i-1}'s queries
    mtl            one stage: T_N with T_1..T_{N-1} replayed in full (tau =
    1), i.e. all tasks at once
    stl            stage i: a new LoRA on T_i alone

    The system directory holds system.json (method, base model, the adapters in order) and one run
    directory per stage; re-running resumes at the first unfinished stage.
    """
    if len(set(tasks)) != len(tasks):
        raise UserError(f"a task appears twice in the sequence {','.join(tasks)}")
    if cfg.init:
        raise UserError("--init is for one stage; a sequence starts each stage as its method says")
    names = [replace(cfg, task=t).name for t in tasks]
    method = METHODS[cfg.method]
    name = "-".join([cfg.method, *run_name(cfg), *names])
    root = Path(cfg.out or f"runs/{name}-{model_tag(cfg.model)}")
    if method.joint:
        stages = [replace(cfg, task=tasks[-1], previous=tasks[:-1], tau=1.0,
                          out=str(root / "1-mtl"))]
    else:
        stages = [replace(cfg, task=t, previous=tasks[:i] if method.rehearses else [],
                          out=str(root / f"{i + 1}-{n}"))
                  for i, (t, n) in enumerate(zip(tasks, names))]
    stages = [replace(s, init=str(Path(stages[i - 1].out) / EXPERT_DIR) if method.continues
                      and i else None)
              for i, s in enumerate(stages)]
    per_stage = ("task", "previous", "out", "init")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in per_stage}
    system = dict(method=cfg.method, model=cfg.model, tasks=tasks,
                  experts=[f"{Path(s.out).name}/{EXPERT_DIR}" for s in stages], settings=settings)
    def same(d: dict) -> dict:
        return {**d, "settings": comparable(d["settings"])}
    if (root / SYSTEM_FILE).exists() and same(read_system(root)) != same(system):
        raise UserError(f"{root} holds a sequence with other tasks, method or settings; pass "
                        f"another --out")
    for stage in stages:
        check_config(stage)
    finished = [s for s in stages if (s.run_dir() / EXPERT_DIR).exists()]
    for stage in finished:
        check_finished(stage)
    if distributed()[0] == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root, SYSTEM_FILE)
        atomic_write(root / SYSTEM_FILE,
                     lambda p: p.write_text(json.dumps(system, indent=2) + "\n"))
    for i, stage in enumerate(stages):
        if stage in finished:
            continue
        if distributed()[0] == 0:
            print(f"stage {i + 1}/{len(stages)}: {stage.task}"
                  + (f" (+ {','.join(stage.previous)})" if stage.previous else ""))
        train(stage)
    return root


def run_name(cfg: TrainConfig) -> list[str]:
    """What sets a sequence's default directory apart beside its method and tasks, e.g. ["tau0.1"]
    in runs/see-tau0.1-qa-qg-sa-sum-trans-smollm2-135m."""
    method = METHODS[cfg.method]
    parts = [part.format(**dataclasses.asdict(cfg)) for part in method.run_name]
    if method.routes:  # SEE's pseudo-negatives and indicator types (Tables 3, 4)
        parts += ["pseudo"] * (cfg.negatives == "lima")
        parts += [cfg.indicator] * (cfg.indicator != "added")
    return parts


def rate(text: str) -> float | str:
    """A learning rate, or "adapter" (the adapter's --lr)."""
    return text if text == "adapter" else float(text)


def read_system(root: Path) -> dict:
    """A sequence's system.json, checked: a known method, its tasks, one expert directory inside
    `root` per stage, and settings of TrainConfig's types."""
    path = root / SYSTEM_FILE
    if not path.is_file():
        raise UserError(f"{root} holds no system (no {SYSTEM_FILE}); train one with train.py "
                        f"--sequence")
    system = read_json(path)
    check_fields(system, path, method=str, model=str, tasks=list, experts=list, settings=dict)
    method, tasks, experts = system["method"], system["tasks"], system["experts"]
    if method not in METHODS:
        raise UserError(f"{path}: unknown method {method!r}")
    if not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
        raise UserError(f"{path}: 'tasks' must list distinct task names, got {tasks!r}")
    stages = 1 if METHODS[method].joint else len(tasks)
    if len(experts) != stages or not all(isinstance(e, str) for e in experts):
        raise UserError(f"{path}: 'experts' must list {stages} expert directories, got {experts!r}")
    for e in experts:
        inside(root, e, path)
    check_settings(system["settings"], path)
    # as comparable() reads it
    return {**system, "settings": {**dataclasses.asdict(TrainConfig()), **system["settings"]}}


def check_finished(cfg: TrainConfig) -> None:
    """Refuse a finished stage of a sequence being resumed unless its run directory is whole: its
    settings are cfg's, its log reaches the last step, its expert loads."""
    out = cfg.run_dir()
    # where the stage before lay then: system.json fixes which it was
    check_same_run(cfg, ignore=("init",))
    last = json.loads((read_log(out / LOG_FILE, None) or ["{}"])[-1])
    # logs written before "steps" end as they end
    if not last or last.get("steps", last["step"]) != last["step"]:
        raise UserError(f"{out / LOG_FILE}: ends at step {last.get('step', 0)} of "
                        f"{last.get('steps', '?')}, in a finished run")
    load_expert(out / EXPERT_DIR)


def arg_parser() -> argparse.ArgumentParser:
    """The command line: what is learned (tasks, method and its settings), then how."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train one SEE expert (a LoRA adapter that answers its "
                                            "task after <<pos>> and refuses earlier tasks' queries "
                                            "with <<neg>>), a whole sequence of them "
                                            "(--sequence/--order), or one of the paper's baselines "
                                            "(--method).")
    p.add_argument("--sequence", default=None,
                   help="comma-separated tasks to learn in turn, one expert each")
    p.add_argument("--order", default=None, choices=list(ORDERS),
                   help="the paper's task orders (Table 5; 10 = all ten)")
    p.add_argument("--task", default=None,
                   help="task abbreviation (qa, qg, sa, sum, trans, dsg, expl, para, pe, pos) "
                        f"or the path of a SuperNI task .json file (default {d.task})")
    p.add_argument("--previous", default=None,
                   help="comma-separated earlier tasks; tau of their queries become negatives")
    p.add_argument("--method", default=d.method, choices=list(METHODS),
                   help="; ".join(f"{k}: {v.help}" for k, v in METHODS.items()))
    p.add_argument("--negatives", default=d.negatives, choices=NEGATIVES,
                   help="SEE's negatives: earlier tasks' queries, or as many LIMA queries "
                        "(pseudo-negatives)")
    p.add_argument("--init", default=None, help="expert directory whose LoRA this one starts from")
    p.add_argument("--experts", type=int, default=d.experts, help="MoSEs: sub-experts per layer")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="MoSEs: sub-experts the router mixes per token")
    p.add_argument("--sparsity", type=float, default=d.sparsity,
                   help="MoSEs: c, the share of sub-expert weights a task's mask keeps")
    p.add_argument("--pull-weight", type=float, default=d.pull_weight,
                   help="MoSEs: lambda of the pull constraint on the task key")
    p.add_argument("--shared-experts", dest="shared", type=int, default=d.shared,
                   help="SETA: shared experts per layer")
    p.add_argument("--anchor-weight", type=float, default=d.anchor_weight,
                   help="SETA: weight of elastic anchoring (importance-weighted pull of shared "
                        "experts to their earlier values)")
    p.add_argument("--route-reg-weight", type=float, default=d.route_reg_weight,
                   help="SETA: weight of routing regularisation (the gate's outputs on earlier "
                        "tasks' queries kept)")
    add_run_arguments(p, d)
    return p


def add_run_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """How a stage is trained: model, data, prompts, rehearsal, LoRA, optimisation, where and in
    what dtype."""
    p.add_argument("--model", default=d.model,
                   help="'smollm2-135m', 'tiny', a local directory or a hub id (e.g. "
                        "meta-llama/Llama-2-7b-hf)")
    p.add_argument("--data-dir", default=None,
                   help="SuperNI directory (default $SEE_DATA_DIR, else ../shared/superni)")
    p.add_argument("--out", default=None,
                   help="run directory (default runs/<task>-<model>); re-running resumes")
    p.add_argument("--indicator", default=d.indicator, choices=list(INDICATORS),
                   help="o_pos/o_neg type (paper Table 4)")
    p.add_argument("--template", default=d.template, choices=list(TEMPLATES),
                   help="how queries are put: the checkpoint's chat template, or plain "
                        "'<query>\\nOutput:'")
    p.add_argument("--tau", type=float, default=d.tau, help="rehearsal ratio of each earlier task")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--targets", default=",".join(d.targets),
                   help=f"LoRA projections, from {','.join(lora.PROJECTIONS)}")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--indicator-lr", type=rate, default=d.indicator_lr,
                   help="learning rate of the added indicator rows (MoSEs: of the task keys), or "
                        "'adapter' for --lr: every indicator type learns at the adapter's rate (a "
                        "fair Table 4)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch (gradient accumulation)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="sequences per forward pass")
    p.add_argument("--max-source", type=int, default=d.max_source, help="query tokens kept")
    p.add_argument("--max-target", type=int, default=d.max_target,
                   help="indicator + response + EOS tokens kept")
    p.add_argument("--max-train", type=int, default=None,
                   help="subsample each task's training set to N examples")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 autocast on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16, AMX, Arm BF16), else float32")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="optimizer steps between resumable checkpoints")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer body (faster steps after a slow first one)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: recompute each block's activations in the "
                        "backward pass (less memory)")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, list[str] | None]:
    d = TrainConfig()
    p = arg_parser()
    a = p.parse_args(argv)
    if a.sequence is not None and a.order:
        raise UserError("give --sequence or --order, not both")
    if (a.sequence is not None or a.order) and (a.task is not None or a.previous is not None):
        raise UserError("--task and --previous are for one stage; --sequence/--order name every "
                        "task")
    a.task = d.task if a.task is None else a.task
    a.previous = [t for t in (a.previous or "").split(",") if t]
    a.targets = [t for t in a.targets.split(",") if t]
    tasks = None
    if a.order:
        tasks = ORDERS[a.order]
    elif a.sequence is not None:
        tasks = [t for t in a.sequence.split(",") if t]
    if tasks == []:
        raise UserError(f"--sequence {a.sequence!r} names no task")
    del a.sequence, a.order
    return TrainConfig(**vars(a)), tasks


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
        if rank != 0:
            return
        if tasks:
            print(f"{cfg.method} system written to {out}\nevaluate it: python evaluate.py --run "
                  f"{out}")
        else:
            print(f"expert written to {out / EXPERT_DIR}\n"
                  f"evaluate it: python evaluate.py --expert {out / EXPERT_DIR} --task {cfg.task}")


if __name__ == "__main__":
    main()
