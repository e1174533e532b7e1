"""What a run is: its settings (TrainConfig, the method table, the command line made from them) and
its files, written and read here: config.json, log.jsonl, state.pt, a sequence's system.json."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import lora
from artifacts import (NUMBER, check_fields, check_writable, digest, inside, read_json,
                       read_sealed, read_text)
from checkpoint import atomic_write, model_tag, resolve_dtype
from errors import UserError
from experts import (EXPERT_FILE, INDICATORS, TEMPLATES, TRAINING_FILE, Expert, SubExpert,
                     load_expert)

STATE_FILE, CONFIG_FILE, LOG_FILE = "state.pt", "config.json", "log.jsonl"
EXPERT_DIR, SYSTEM_FILE = "expert", "system.json"
PER_STAGE = ("task", "previous", "out", "init")  # settings a sequence's system.json leaves out


@dataclass(frozen=True)
class Method:
    """What sets a method apart: train.py, evaluate.py and report.py read these facts and no method
    names. A new method is a row of METHODS, and its own terms if it has any (sparse_terms)."""
    label: str  # as the paper's tables print it: {tau} (a percentage), {sparsity} from its settings
    help: str
    continues: bool = False  # stage i starts from stage i-1's adapter
    rehearses: bool = False  # stage i also learns from tau of T_1..T_{i-1} (routed: their queries)
    kmeans: bool = False  # those nearest k-means centroids of their inputs, else drawn at random
    synthetic: bool = False  # instances the base model wrote and the latest model answered (SSR)
    routes: bool = False  # an expert per task, the experts routed by the indicator tokens they emit
    joint: bool = False  # one stage learns every task at once
    sparse: bool = False  # one set of masked sub-experts holds every task, a key per task picks it
    gate: bool = False  # with sparse: anchored shared experts, and one gate over the tasks for keys
    run_name: tuple[str, ...] = ()  # the settings its default run directory names (format strings)

    @property
    def pull(self) -> bool:
        """MoSEs' prompt keys, each pulled toward its task's queries (SETA trains a gate)."""
        return self.sparse and not self.gate


# SEE and the paper's baselines (Sec. 4.1), then MoSEs and SETA. Only SEE trains indicators and
# routes; the baselines train plain (q, r) samples. What each stage learns from: train_sequence.
METHODS = {
    "see": Method("SEE({tau})", "a new expert per task, tau of earlier tasks' queries as <<neg>>, "
                  "sequential routing", rehearses=True, routes=True, run_name=("tau{tau:g}",)),
    "non-rehearsal": Method("Non-rehearsal", "one LoRA fine-tuned on each task in turn",
                            continues=True),
    "replay": Method("RandSel({tau})", "one LoRA fine-tuned on each task in turn plus tau of "
                     "earlier tasks' full samples (RandSel)", continues=True, rehearses=True,
                     run_name=("tau{tau:g}",)),
    "kmeans": Method("KMeansSel({tau})", "as replay, the samples replayed those nearest k-means "
                     "centroids of the base model's features of their inputs (KMeansSel)",
                     continues=True, rehearses=True, kmeans=True, run_name=("tau{tau:g}",)),
    "ssr": Method("SSR({tau})", "as kmeans, the samples replayed written by the base model from "
                  "demonstrations of each earlier task and answered by the latest model (SSR)",
                  continues=True, rehearses=True, synthetic=True, run_name=("tau{tau:g}",)),
    "mtl": Method("MTL", "one LoRA on all tasks at once", joint=True),
    "stl": Method("AvgSTL", "one LoRA per task, each scored on its own task (AvgSTL)"),
    "moses": Method("MoSEs(c={sparsity})", "sparse sub-experts, a binary mask per task over their "
                    "weights, the task picked by prompt keys (MoSEs)", continues=True, sparse=True,
                    run_name=("c{sparsity:g}", "e{experts}k{top_k}", "pull{pull_weight:g}")),
    "seta": Method("SETA(c={sparsity})", "MoSEs' masked sub-experts as task experts plus anchored "
                   "shared experts, the task picked by a unified gate (SETA)", continues=True,
                   rehearses=True, sparse=True, gate=True,
                   run_name=("c{sparsity:g}", "e{experts}k{top_k}s{shared}", "tau{tau:g}",
                             "anchor{anchor_weight:g}", "rr{route_reg_weight:g}")),
}
NEGATIVES = ("tasks", "lima")  # earlier tasks' queries, or LIMA's (pseudo-negatives, paper Table 3)


def rate(text: str) -> float | str:
    """A learning rate, or "adapter" (the adapter's --lr)."""
    return text if text == "adapter" else float(text)


def names(text: str) -> list[str]:
    """A comma-separated list, e.g. --targets q_proj,v_proj; none of its names empty."""
    parts = text.split(",")
    if text and not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} holds an empty name")
    return [t for t in parts if t]


def setting(default, help: str, **meta):
    """A TrainConfig field: its default, --help line, and argparse's `type`, `choices`, `flag`."""
    meta = dict(help=help, **meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a run, held once: train.py's command line is generated from these fields
    (add_arguments), config.json records them and a resumed run must match them (check_same_run)."""
    task: str = setting("qa", "task abbreviation (qa, qg, sa, sum, trans, dsg, expl, para, pe, "
                              "pos), the path of a SuperNI task .json file, or your own .jsonl of "
                              "{input, output} lines")
    previous: list[str] = setting([], "comma-separated earlier tasks; tau of their queries become "
                                      "negatives", type=names)
    method: str = setting("see", "; ".join(f"{k}: {v.help}" for k, v in METHODS.items()),
                          choices=tuple(METHODS))
    negatives: str = setting("tasks", "SEE's negatives: earlier tasks' queries, or as many LIMA "
                                      "queries (pseudo-negatives)", choices=NEGATIVES)
    # a departure beyond the paper: Eq. 5 never asks an expert to refuse a query of no task, so
    # nothing but habit keeps the experts from claiming them
    general_negatives: int = setting(0, "SEE, beyond the paper: every expert, E_1 included, also "
                                        "learns <<neg>> on N general queries (LIMA's, of those "
                                        "RB-LIMA does not score)")
    init: str | None = setting(None, "expert directory whose LoRA this one starts from (else "
                                     "B = 0)", type=str)
    experts: int = setting(2, "MoSEs: sub-experts per layer")
    top_k: int = setting(2, "MoSEs: sub-experts the router mixes per token")
    sparsity: float = setting(0.3, "MoSEs: c, the share of sub-expert weights a task's mask keeps")
    pull_weight: float = setting(0.1, "MoSEs: lambda of the pull constraint on the task key")
    shared: int = setting(1, "SETA: shared experts per layer", flag="--shared-experts")
    anchor_weight: float = setting(1.0, "SETA: weight of elastic anchoring (importance-weighted "
                                        "pull of shared experts to their earlier values)")
    route_reg_weight: float = setting(1.0, "SETA: weight of routing regularisation (the gate's "
                                           "outputs on earlier tasks' queries kept)")
    model: str = setting("smollm2-135m", "'smollm2-135m', 'tiny', a local directory or a hub id "
                                         "(e.g. meta-llama/Llama-2-7b-hf)")
    data_dir: str | None = setting(None, "SuperNI directory (default $SEE_DATA_DIR, else "
                                         "../shared/superni)", type=str)
    out: str | None = setting(None, "run directory (default runs/<task>-<model>); re-running "
                                    "resumes", type=str)
    indicator: str = setting("added", "o_pos/o_neg type (paper Table 4)", choices=tuple(INDICATORS))
    template: str = setting("auto", "how queries are put: the checkpoint's chat template, or plain "
                                    "'<query>\\nOutput:'", choices=TEMPLATES)
    tau: float = setting(0.1, "rehearsal ratio of each earlier task")
    # the paper's setup (Sec. 4.1): rank, dropout, lr, global batch, epochs, lengths; alpha, the
    # targets, the cosine schedule and gradient clipping are our choices (see README)
    rank: int = setting(8, "LoRA rank r")
    alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = setting(0.1, "LoRA dropout")
    targets: list[str] = setting(["q_proj", "v_proj"], "comma-separated LoRA projections",
                                 type=names)
    lr: float = setting(2e-4, "peak learning rate of the adapter (cosine decay, no warm-up)")
    # the new <<pos>>/<<neg>> rows start from nothing, so learn faster than the adapter; "adapter":
    # at --lr, as in-vocabulary indicators (whose rows are the base model's) learn through it
    indicator_lr: float | str = setting(1e-2, "learning rate of the added indicator rows (MoSEs: "
                                              "of the task keys), or 'adapter' for --lr: every "
                                              "indicator type learns at the adapter's rate (a fair "
                                              "Table 4)", type=rate)
    epochs: int = setting(3, "passes over the training set")
    batch_size: int = setting(32, "global batch (gradient accumulation)")
    micro_batch: int = setting(4, "sequences per forward pass")
    max_source: int = setting(1024, "query tokens kept")
    max_target: int = setting(512, "indicator + response + EOS tokens kept")
    max_train: int | None = setting(None, "subsample each task's training set to N examples",
                                    type=int)
    seed: int = setting(0, "seed of sampling, initialisation and shuffling")
    dtype: str | None = setting(None, "default: bfloat16 autocast on CUDA and on CPUs with native "
                                      "bf16 (AVX512-BF16, AMX, Arm BF16), else float32",
                                type=str, choices=("float32", "bfloat16"))
    save_every: int = setting(20, "optimizer steps between resumable checkpoints")
    compile: bool = setting(False, "torch.compile the transformer body (faster steps after a slow "
                                   "first one)")
    grad_checkpoint: bool = setting(False, "activation checkpointing: recompute each block's "
                                           "activations in the backward pass (less memory)")

    @property
    def name(self) -> str:
        return task_name(self.task)

    def run_dir(self) -> Path:
        """--out, else runs/<task>[-train<N>]-<model>: a quick look never blocks the full run."""
        cut = f"-train{self.max_train}" if self.max_train is not None else ""
        return Path(self.out or f"runs/{self.name}{cut}-{model_tag(self.model)}")


def task_name(task: str) -> str:
    """A task's name in runs (its expert, stage directory and routes): qa, or a task file's stem."""
    return Path(task).stem.replace(".", "_")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig field, with its help, type, choices and default."""
    for f in dataclasses.fields(TrainConfig):
        meta, default = f.metadata, getattr(TrainConfig(), f.name)
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        shown = ",".join(default) or "none" if isinstance(default, list) else default
        help = f"{meta['help']} (default: {shown})".replace("%", "%%")
        p.add_argument(flag, dest=f.name, default=default, type=meta.get("type", type(default)),
                       choices=meta.get("choices"), help=help)


def check_types(settings: dict, path: str | Path, absent: tuple[str, ...] = ()) -> None:
    """Refuse written settings lacking a field (but `absent`) or holding a value of another type."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in absent:
            continue
        if f.name not in settings:
            raise UserError(f"{path}: no setting {f.name!r} (written by another version?)")
        default, value = getattr(TrainConfig(), f.name), settings[f.name]
        if value is None and default is None or f.name == "indicator_lr" and value == "adapter":
            continue
        kind = f.metadata.get("type", type(default))
        kind = {float: NUMBER, names: list, rate: NUMBER}.get(kind, kind)
        check_fields({f.name: value}, path, **{f.name: kind})


RESUMABLE_CHANGES = {"out", "save_every", "data_dir", "compile", "grad_checkpoint"}  # same result


def comparable(settings: dict) -> dict:
    """What a resumed run must match: dtype and --init resolved, RESUMABLE_CHANGES left out."""
    settings = dict(settings, dtype=dtype_name(settings["dtype"]))
    if settings.get("init"):  # a sequence's system.json has none
        settings["init"] = str(Path(settings["init"]).resolve())
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


def dtype_name(name: str | None) -> str:
    """--dtype as this machine resolves it (checkpoint.resolve_dtype), e.g. 'float32'."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(resolve_dtype(name, device)).removeprefix("torch.")


def write_json(path: Path, value: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))


def check_same_run(cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a run directory whose config.json is unreadable or holds settings other than cfg's."""
    out = cfg.run_dir()
    config = comparable(dataclasses.asdict(cfg))
    saved = read_json(out / CONFIG_FILE)
    check_types(saved, out / CONFIG_FILE)
    saved = comparable(saved)
    changed = sorted(k for k in config.keys() | saved.keys()
                     if k not in ignore and config.get(k) != saved.get(k))
    if changed:
        changes = ", ".join(f"{k}: {saved.get(k)} -> {config.get(k)}" for k in changed)
        raise UserError(f"{out} holds a run with other settings ({changes}); pass another --out")


def save_state(path: Path, step: int, params: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer) -> None:
    """state.pt: what resuming needs (trained parameters, optimizer, random state)."""
    state = dict(step=step, params={k: p.detach().cpu() for k, p in params.items()},
                 optimizer=opt.state_dict(), rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    state["sha256"] = digest(state)  # of its contents: a damaged tensor is told on resuming
    atomic_write(path, lambda p: torch.save(state, p))


def read_state(path: Path) -> dict:
    """A resumable checkpoint as save_state writes it (weights_only: no pickled object loads)."""
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
    check_fields(state, path, step=int, params=dict, optimizer=dict, rng=torch.Tensor, sha256=str)
    if digest({k: v for k, v in state.items() if k != "sha256"}) != state["sha256"]:
        raise UserError(f"{path}: its contents differ from the sha256 recorded when it was "
                        f"written: damaged")
    if state["step"] < 1 or state["rng"].dtype != torch.uint8:
        raise UserError(f"{path}: not a checkpoint of train.py (step {state['step']}, rng "
                        f"{state['rng'].dtype})")
    return state


def read_log(path: Path, steps: int | None) -> list[str]:
    """log.jsonl's lines, one per step from 1. An unfinished run's (`steps` its checkpoint's
    step) drops a torn last line (a crash mid-write) and later steps; a finished run's is whole."""
    lines = read_text(path).split("\n")
    if lines[-1] and steps is None:
        raise UserError(f"{path}: its last line is cut short, in a finished run")
    lines = [line for line in lines[:-1] if line]  # the last is empty or torn: no newline after it
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or record.get("step") != n or "seconds" not in record:
            raise UserError(f"{path}:{n}: expected the record of step {n}, with its seconds")
    if steps is not None and len(lines) < steps:
        raise UserError(f"{path}: ends at step {len(lines)}, before the checkpoint's step {steps}")
    return lines[:steps]


def run_name(cfg: TrainConfig) -> list[str]:
    """What names a sequence's default directory beside its method and tasks, e.g. ["tau0.1"]."""
    method = METHODS[cfg.method]
    parts = [part.format(**dataclasses.asdict(cfg)) for part in method.run_name]
    if method.routes:  # SEE's pseudo-negatives and indicator types (Tables 3, 4)
        parts += ["pseudo"] * (cfg.negatives == "lima")
        parts += [f"general{cfg.general_negatives}"] * (cfg.general_negatives > 0)
        parts += [cfg.indicator] * (cfg.indicator != "added")
    return parts + [f"train{cfg.max_train}"] * (cfg.max_train is not None)


def read_system(root: Path) -> dict:
    """A sequence's system.json, checked: method, tasks, an expert directory per stage, settings."""
    path = root / SYSTEM_FILE
    if not path.is_file():
        raise UserError(f"{root} holds no system (no {SYSTEM_FILE}); train one with train.py "
                        f"--sequence")
    system = read_sealed(path)
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
    check_types(system["settings"], path, absent=PER_STAGE)
    return system


def resume_state(cfg: TrainConfig) -> dict | None:
    """The state of an unfinished run of cfg in its directory; refuses a finished or other run."""
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


def restore(state: dict, trainable: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
            path: Path, total: int) -> int:
    """Put a checkpoint's parameters, optimizer and random state in place; returns its step."""
    params = state["params"]
    wrong = sorted(k for k in params.keys() | trainable.keys() if k not in trainable
                   or not isinstance(params.get(k), torch.Tensor)
                   or params[k].shape != trainable[k].shape)
    if wrong or state["step"] > total:
        raise UserError(f"{path}: its parameters or step {state['step']} do not fit this run of "
                        f"{total} steps ({', '.join(wrong[:3])})")
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
    return state["step"]


def check_finished(cfg: TrainConfig) -> None:
    """Refuse a finished stage unless whole: cfg's settings, a complete log, a loading expert."""
    out = cfg.run_dir()
    check_same_run(cfg, ignore=("init",))  # the stage before may have moved: system.json fixes it
    last = json.loads((read_log(out / LOG_FILE, None) or ["{}"])[-1])
    if not last or last.get("steps") != last["step"]:
        raise UserError(f"{out / LOG_FILE}: ends at step {last.get('step', 0)} of "
                        f"{last.get('steps', '?')}, in a finished run")
    load_expert(out / EXPERT_DIR)


FLOAT32_MAX = torch.finfo(torch.float32).max  # a rate or weight above it is inf in the step


def check_numbers(cfg: TrainConfig) -> None:
    """Refuse counts below 1, a seed torch cannot take, rates or weights out of range or float32."""
    def given(*keys: str) -> list[str]:
        return [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in keys]
    counts = ["epochs", "batch_size", "micro_batch", "save_every", "max_source", "max_target"]
    counts += ["max_train"] * (cfg.max_train is not None)  # None: every example; 0: nothing
    bad = given(*[k for k in counts if getattr(cfg, k) < 1])
    bad += [f"--general-negatives {cfg.general_negatives}"] * (cfg.general_negatives < 0)
    bad += [f"--seed {cfg.seed}"] * (not 0 <= cfg.seed < 2 ** 63)
    if bad:
        raise UserError(f"need positive counts, --general-negatives >= 0 and a --seed in "
                        f"[0, 2^63), got {', '.join(bad)}")
    indicator_lr = cfg.lr if cfg.indicator_lr == "adapter" else cfg.indicator_lr
    rates = {"--lr": cfg.lr, "--indicator-lr": indicator_lr}
    weights = ["pull_weight", "anchor_weight", "route_reg_weight"]
    bad = [f"{flag} {v}" for flag, v in rates.items() if not 0 < v <= FLOAT32_MAX]
    bad += given(*[k for k in weights if not 0 <= getattr(cfg, k) <= FLOAT32_MAX])
    bad += [f"--alpha {cfg.alpha}"] * (abs(cfg.alpha) > FLOAT32_MAX)
    if bad:
        raise UserError(f"need learning rates > 0, weights >= 0 and nothing beyond float32's "
                        f"{FLOAT32_MAX:.3g}, got {', '.join(bad)}")


def check_finite(step: int, loss: float, norm: torch.Tensor) -> None:
    """Stop a diverged run before its step: the last checkpoint stays and no expert is written."""
    if not (math.isfinite(loss) and math.isfinite(float(norm))):
        raise UserError(f"step {step}: loss {loss:g}, gradient norm {float(norm):g}: training "
                        f"diverged (lower --lr, --indicator-lr, --alpha or the method's weights); "
                        f"the last checkpoint is kept and no expert written")


def check_config(cfg: TrainConfig) -> tuple[lora.LoraConfig, lora.SubExpertConfig | None]:
    """Refuse impossible settings before data or model load; returns the adapter settings."""
    check_numbers(cfg)
    if not 0 <= cfg.tau <= 1:
        raise UserError(f"--tau must be in [0, 1], got {cfg.tau}")
    if cfg.task in cfg.previous:
        raise UserError(f"task {cfg.task!r} cannot also be an earlier task (--previous)")
    if cfg.method not in METHODS or cfg.negatives not in NEGATIVES:
        raise UserError(f"unknown method {cfg.method!r} or negatives {cfg.negatives!r}; "
                        f"known: {', '.join(METHODS)}; {', '.join(NEGATIVES)}")
    method = METHODS[cfg.method]
    if (cfg.negatives == "lima" or cfg.general_negatives) and not method.routes:
        raise UserError("--negatives lima and --general-negatives are for --method see only")
    if cfg.general_negatives and cfg.negatives == "lima":
        raise UserError("--general-negatives draws from the LIMA queries --negatives lima uses; "
                        "give one of them")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch "
                        f"{cfg.micro_batch}")
    lcfg = lora.LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))
    sub = lora.SubExpertConfig(cfg.experts, cfg.top_k, cfg.sparsity,
                               cfg.shared if method.gate else 0) if method.sparse else None
    if method.sparse and not method.rehearses and cfg.previous:
        raise UserError("MoSEs rehearses nothing (no --previous)")
    if method.gate and cfg.shared < 1:
        raise UserError(f"SETA needs --shared-experts >= 1, got {cfg.shared}")
    out = cfg.run_dir().resolve()
    inside_expert = any((d / EXPERT_FILE).is_file() for d in (out, *out.parents))
    if inside_expert or (out / SYSTEM_FILE).exists():
        raise UserError(f"--out {cfg.run_dir()} is a sequence's directory or inside an expert; "
                        f"pass another --out")
    check_writable(out / CONFIG_FILE)
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


def plan_sequence(cfg: TrainConfig, tasks: list[str]) -> tuple[Path, list[TrainConfig], dict]:
    """A sequence's directory, its stages' settings (what each learns from, as cfg.method says:
    train.train_sequence) and its system.json; refused if the directory holds another sequence."""
    if len(set(tasks)) != len(tasks):
        raise UserError(f"a task appears twice in the sequence {','.join(tasks)}")
    if cfg.init:
        raise UserError("--init is for one stage; a sequence starts each stage as its method says")
    names = [task_name(t) for t in tasks]
    method = METHODS[cfg.method]
    name = "-".join([cfg.method, *run_name(cfg), *names])
    root = Path(cfg.out or f"runs/{name}-{model_tag(cfg.model)}")
    if method.joint:
        stages = [replace(cfg, task=tasks[-1], previous=tasks[:-1], tau=1.0,
                          out=str(root / "1-mtl"))]
    else:  # a continuing method starts each stage from the expert of the one before
        stages = [replace(cfg, task=t, previous=tasks[:i] if method.rehearses else [],
                          out=str(root / f"{i + 1}-{n}"),
                          init=str(root / f"{i}-{names[i - 1]}" / EXPERT_DIR)
                          if method.continues and i else None)
                  for i, (t, n) in enumerate(zip(tasks, names))]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_STAGE}
    system = dict(method=cfg.method, model=cfg.model, tasks=tasks,
                  experts=[f"{Path(s.out).name}/{EXPERT_DIR}" for s in stages], settings=settings)

    def same(d: dict) -> dict:
        return {**d, "settings": comparable(d["settings"])}
    if (root / SYSTEM_FILE).exists() and same(read_system(root)) != same(system):
        raise UserError(f"{root} holds a sequence with other tasks, method or settings; pass "
                        f"another --out")
    return root, stages, system
