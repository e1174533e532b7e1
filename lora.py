"""LoRA written out by hand: a frozen linear layer plus named adapters, saved in PEFT's layout.

y = W x + (alpha / r) * B A dropout(x), with A (r x in) Kaiming-uniform and B (out x r) zero, so a
fresh adapter leaves the model unchanged. Several adapters sit on one base; one is active."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from artifacts import NUMBER, check_fields, read_json, read_tensors
from errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the model twice: PeftModel -> LoraModel -> ours


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0  # 2r, the common default (LLaMA-Factory's); the paper gives only r
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        targets = self.targets
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise UserError(f"LoRA targets must be a list of projection names, got {targets!r}")
        check_fields(vars(self), "LoRA settings", r=int, alpha=NUMBER, dropout=NUMBER)
        if self.alpha <= 0:
            raise UserError(f"need LoRA alpha > 0, got {self.alpha}")
        self.targets = tuple(self.targets)
        if not self.targets or not set(self.targets) <= set(PROJECTIONS):
            raise UserError(f"LoRA targets must be among {', '.join(PROJECTIONS)}, got "
                            f"{', '.join(self.targets)}")
        if self.r < 1 or not 0 <= self.dropout < 1:
            raise UserError(f"need LoRA rank >= 1 and 0 <= dropout < 1, got r={self.r}, "
                            f"dropout={self.dropout}")


class LoraLinear(nn.Module):
    """A frozen nn.Linear with named adapters (parameter names as in PEFT: lora_A.<name>.weight)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None

    def add(self, name: str, cfg: LoraConfig) -> None:
        w = self.base.weight
        A = nn.Linear(self.base.in_features, cfg.r, bias=False, device=w.device, dtype=w.dtype)
        B = nn.Linear(cfg.r, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init for A
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(cfg.dropout).train(self.training)  # eval stays eval
        self.scaling[name] = cfg.alpha / cfg.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if (name := self.active) is None:
            return y
        A, B = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(A.weight.dtype))
        return y + B(A(h)).to(y.dtype) * self.scaling[name]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> None:
    """Give each of cfg.targets (wrapped in LoraLinear once) a fresh adapter `name`."""
    if any(name in m.lora_A for m in lora_layers(model).values()):
        raise UserError(f"adapter {name!r} already exists")
    if "." in name:
        raise UserError(f"adapter names cannot contain '.', got {name!r}")
    wrap_targets(model, cfg.targets, LoraLinear,
                 lambda lin: cfg.r * (lin.in_features + lin.out_features))
    for path, m in lora_layers(model).items():
        if path.rsplit(".", 1)[-1] in cfg.targets:
            m.add(name, cfg)


def wrap_targets(model: nn.Module, targets: tuple[str, ...], wrap, weights) -> None:
    """Replace each nn.Linear named in `targets` by wrap(linear), in its train/eval mode, unless
    weights(linear) fp32 weights each, with grads and AdamW moments (16 B/weight), exceed memory."""
    found = [(parent, attr) for parent in model.modules() for attr in targets
             if isinstance(getattr(parent, attr, None), nn.Linear)]
    device = model.lm_head.weight.device
    need = 16 * sum(weights(getattr(parent, attr)) for parent, attr in found)
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > have:
        raise UserError(f"the adapters need {need / 2**30:.3g} GiB to train, the device has "
                        f"{have / 2**30:.3g} GiB: lower --rank, --experts or --shared-experts")
    for parent, attr in found:
        child = getattr(parent, attr)
        setattr(parent, attr, wrap(child).train(child.training))


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter everywhere (None: the bare base model)."""
    for m in lora_layers(model).values():
        m.active = name if name in m.lora_A else None


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` under PEFT's key names (base_model.model.<module>.lora_A.weight)."""
    return {f"{PEFT_PREFIX}{path}.lora_{ab}.weight": adapters[name].weight.detach()
            for path, m in lora_layers(model).items() if name in m.lora_A
            for ab, adapters in (("A", m.lora_A), ("B", m.lora_B))}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed weights into existing adapter `name`; every key used, every layer filled."""
    layers = {path: m for path, m in lora_layers(model).items() if name in m.lora_A}
    expected = {f"{PEFT_PREFIX}{path}.lora_{ab}.weight" for path in layers for ab in "AB"}
    if set(state) != expected:
        raise UserError(f"adapter weights do not match the model: {len(set(state) - expected)} "
                        f"unexpected, {len(expected - set(state))} missing (e.g. "
                        f"{sorted(set(state) ^ expected)[:1]})")
    with torch.no_grad():
        for path, m in layers.items():
            for ab, lin in (("A", m.lora_A[name]), ("B", m.lora_B[name])):
                w = state[f"{PEFT_PREFIX}{path}.lora_{ab}.weight"]
                if w.shape != lin.weight.shape:
                    raise UserError(f"adapter weight {path}.lora_{ab} has shape {tuple(w.shape)}, "
                                    f"expected {tuple(lin.weight.shape)}")
                lin.weight.copy_(w)


def write_adapter(state: dict[str, torch.Tensor], cfg: LoraConfig, out_dir: str | Path,
                  base_model: str) -> None:
    """adapter_model.safetensors (fp32) + adapter_config.json in PEFT's layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, out_dir / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                  r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                  target_modules=list(cfg.targets), bias="none", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, use_rslora=False)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and weights of a saved adapter (ours or PEFT's)."""
    path = Path(path)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path} holds no adapter (no {' and no '.join(missing)})")
    c = read_json(path / ADAPTER_CONFIG)
    try:
        unsupported = ("use_rslora", "use_dora", "alpha_pattern", "rank_pattern",
                       "layers_to_transform", "modules_to_save")
        plain = (c["peft_type"] == "LORA" and isinstance(c["target_modules"], list)
                 and c.get("bias", "none") == "none" and not any(map(c.get, unsupported)))
        cfg = LoraConfig(r=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
                         targets=c["target_modules"])
    except (KeyError, TypeError, UserError) as e:
        raise UserError(f"{path / ADAPTER_CONFIG}: not a LoRA adapter config ({type(e).__name__}: "
                        f"{e})") from None
    if not plain:
        raise UserError(f"{path}: only plain LoRA adapters can be read (a list of target modules; "
                        f"no bias, rsLoRA, DoRA, per-layer patterns or modules_to_save)")
    weights = read_tensors(path / ADAPTER_WEIGHTS)
    ranks = {tuple(w.shape)[0] for k, w in weights.items() if k.endswith("lora_A.weight")}
    if ranks != {cfg.r}:  # before any adapter of rank r is allocated
        raise UserError(f"{path / ADAPTER_CONFIG}: r {cfg.r}, but its weights have rank "
                        f"{sorted(ranks)}")
    return cfg, weights


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() if name in m.lora_A
            for p in (m.lora_A[name].weight, m.lora_B[name].weight)]


# --- MoSEs (Mixtures of SubExperts): low-rank sub-experts behind a sparse router, seen by each task
# through its binary mask ("winning subnetworks": the top-c% of each weight tensor by a learned
# score). Weights a task kept are frozen (it computes exactly what it did), reusable by later tasks.

@dataclass(frozen=True)
class SubExpertConfig:
    experts: int = 2  # sub-experts per layer (the summary's best: E2T2)
    top_k: int = 2  # sub-experts the router mixes per token
    sparsity: float = 0.3  # c: the share of each weight tensor a task's mask keeps
    shared: int = 0  # SETA: dense low-rank experts every task uses and trains (0: MoSEs)

    def __post_init__(self):
        check_fields(vars(self), "sub-expert settings", experts=int, top_k=int, sparsity=NUMBER,
                     shared=int)
        if not 1 <= self.top_k <= self.experts or not 0 < self.sparsity <= 1 or self.shared < 0:
            raise UserError(f"need 1 <= top-k <= experts, 0 < sparsity <= 1 and shared >= 0, got "
                            f"experts={self.experts}, top-k={self.top_k}, "
                            f"sparsity={self.sparsity}, shared={self.shared}")


MASKED = ("A", "B", "router")  # the sub-expert weights a task sees through its mask
SHARED = ("shared_A", "shared_B")  # SETA's shared experts: unmasked, anchored by importance instead


def top_share(scores: torch.Tensor, share: float) -> torch.Tensor:
    """A boolean mask of the largest `share` of |scores| (at least one entry)."""
    s = scores.detach().abs().reshape(-1)
    keep = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    keep[s.topk(max(1, round(share * s.numel()))).indices] = True
    return keep.view(scores.shape)


def kaiming_stack(n: int, r: int, d_in: int, device) -> torch.Tensor:
    """n LoRA A matrices (r x d_in), each Kaiming-uniform as nn.Linear initialises them."""
    A = torch.empty(n, r, d_in, device=device)
    for a in A:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return A


class SubExpertLinear(nn.Module):
    """A frozen nn.Linear plus E low-rank sub-experts B_e A_e mixed per token by a top-k softmax
    router, seen through the task's mask; SETA adds S always-on shared experts (cf. DeepSeekMoE)."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig, sub: SubExpertConfig):
        super().__init__()
        self.base, self.sub, self.scaling = base, sub, cfg.alpha / cfg.r
        E, S, r, w = sub.experts, sub.shared, cfg.r, base.weight
        self.A = nn.Parameter(kaiming_stack(E, r, base.in_features, w.device))  # as LoRA's A
        # near zero, so the layer starts close to the base model; not zero, where a weight's mask
        # score would get no gradient (it scales the weight) and it could never join a later mask
        self.B = nn.Parameter(torch.randn(E, base.out_features, r, device=w.device) * 1e-3)
        self.router = nn.Parameter(torch.randn(E, base.in_features, device=w.device) * 0.02)
        self.scores = nn.ParameterDict({k: nn.Parameter(torch.empty_like(getattr(self, k)))
                                        for k in MASKED})
        for s in self.scores.values():
            nn.init.kaiming_uniform_(s.view(s.shape[0], -1), a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout)
        for k in MASKED:  # held weights get a zero gradient: no later task moves them
            self.register_buffer(f"used_{k}", torch.zeros_like(getattr(self, k), dtype=torch.bool))

            def freeze_held(g, k=k):
                return g.masked_fill(getattr(self, f"used_{k}"), 0)
            getattr(self, k).register_hook(freeze_held)
        self.shared_A = self.shared_B = None
        if S:  # SETA: shared experts initialised as LoRA (B = 0), each weight's importance so far
            self.shared_A = nn.Parameter(kaiming_stack(S, r, base.in_features, w.device))
            self.shared_B = nn.Parameter(torch.zeros(S, base.out_features, r, device=w.device))
            for k in SHARED:
                self.register_buffer(f"importance_{k}", torch.zeros_like(getattr(self, k)))
        self.masks: dict[str, dict[str, torch.Tensor]] = {}  # finished task -> its binary masks
        self.task: str | None = None  # whose mask the forward pass uses; None: the bare base layer
        self.learning = False  # True: the mask is the live top-c% of the scores (task in training)

    def mask(self, k: str) -> torch.Tensor:
        if not self.learning:
            return self.masks[self.task][k]
        s = self.scores[k].abs()
        return top_share(s, self.sub.sparsity) + (s - s.detach())  # straight-through estimator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.task is None and not self.learning:
            return y
        A, B, R = (getattr(self, k) * self.mask(k) for k in MASKED)
        x = x.to(A.dtype)
        logits = (x @ R.T).float()  # (..., E): each sub-expert's score, fp32 under autocast too
        top = logits.topk(self.sub.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        h = torch.einsum("...i,eri->...er", self.dropout(x), A)
        out = torch.einsum("...er,eor->...o", h * weights.unsqueeze(-1), B)
        if self.shared_A is not None:  # SETA's shared experts, summed
            h_shared = torch.einsum("...i,sri->...sr", self.dropout(x), self.shared_A)
            out = out + torch.einsum("...sr,sor->...o", h_shared, self.shared_B)
        return y + (out * self.scaling).to(y.dtype)

    def finish_task(self, name: str) -> None:
        """Keep the task's mask (top-c% of the scores now) and freeze the weights it holds."""
        with torch.no_grad():
            self.masks[name] = {k: top_share(self.scores[k], self.sub.sparsity) for k in MASKED}
            for k in MASKED:
                getattr(self, f"used_{k}").logical_or_(self.masks[name][k])


def subexpert_layers(model: nn.Module) -> dict[str, SubExpertLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SubExpertLinear)}


def add_subexperts(model: nn.Module, cfg: LoraConfig, sub: SubExpertConfig) -> None:
    """Wrap cfg.targets in MoSE layers (the model must have no adapters there yet)."""
    if lora_layers(model) or subexpert_layers(model):
        raise UserError("the model already carries adapters")
    wrap_targets(model, cfg.targets, lambda lin: SubExpertLinear(lin, cfg, sub),
                 lambda lin: (2 * sub.experts + sub.shared) * cfg.r * (
                     lin.in_features + lin.out_features) + 2 * sub.experts * lin.in_features)


def set_task(model: nn.Module, name: str | None, learning: bool = False) -> None:
    """Run the MoSE layers with task `name`'s mask (None: the bare base model), or its live mask."""
    layers = subexpert_layers(model).values()
    if name is not None and not layers:
        raise UserError("the model has no sub-experts")
    for m in layers:
        if name is not None and not learning and name not in m.masks:
            raise UserError(f"no task {name!r} among the sub-experts' tasks ({', '.join(m.masks)})")
        m.task, m.learning = name, learning


def finish_task(model: nn.Module, name: str) -> None:
    for m in subexpert_layers(model).values():
        m.finish_task(name)


BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])  # numpy.packbits' order


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor, flattened, at 8 entries a byte (uint8; the last byte zero-padded)."""
    bits = mask.reshape(-1).to(torch.uint8).cpu()
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)])
    return (bits.view(-1, 8) * BITS).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n entries of a packed boolean tensor (the inverse of pack_bits), flattened."""
    return (packed.long().cpu().unsqueeze(1) & BITS).reshape(-1)[:n] > 0


def subexpert_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What a finished stage keeps. For inference: the held weights' values, a bit per weight saying
    which are held, each task's mask as a bit per held weight, SETA's shared experts. To train on:
    the free weights and the shared experts' importance. Mask scores are redrawn, not kept."""
    state, training = {}, {}
    for path, m in subexpert_layers(model).items():
        for k in MASKED:
            w, used = getattr(m, k).detach(), getattr(m, f"used_{k}")
            state[f"{path}.{k}"], state[f"{path}.{k}.used"] = w[used].cpu(), pack_bits(used)
            training[f"{path}.{k}.free"] = w[~used].cpu()
            for task, masks in m.masks.items():
                state[f"{path}.masks.{task}.{k}"] = pack_bits(masks[k][used])
        for k in SHARED if m.sub.shared else ():
            state[f"{path}.{k}"] = getattr(m, k).detach().cpu().clone()
            training[f"{path}.importance_{k}"] = getattr(m, f"importance_{k}").cpu().clone()
    return state, training


def sized(state: dict[str, torch.Tensor], key: str, n: int) -> torch.Tensor:
    """state[key], which must hold n entries."""
    if state[key].numel() != n:
        raise UserError(f"sub-expert tensor {key} has {state[key].numel()} entries, expected {n}")
    return state[key]


def load_subexpert_state(model: nn.Module, state: dict[str, torch.Tensor],
                         training: dict[str, torch.Tensor] | None = None) -> None:
    """The inverse of subexpert_state, into a model with the same MoSE layers. Without `training`
    the free weights are zero: no finished task's mask holds them, so inference never sees them."""
    layers = subexpert_layers(model)
    tasks = sorted({key.split(".masks.")[1].split(".")[0] for key in state if ".masks." in key})
    shared = [(path, k) for path, m in layers.items() if m.sub.shared for k in SHARED]
    expected = {f"{path}.{name}" for path in layers for k in MASKED
                for name in (k, f"{k}.used", *(f"masks.{t}.{k}" for t in tasks))}
    expected |= {f"{path}.{k}" for path, k in shared}
    to_train = {f"{path}.{k}.free" for path in layers for k in MASKED}
    to_train |= {f"{path}.importance_{k}" for path, k in shared}
    for what, got, keys in (("sub-expert weights", state, expected),
                            ("sub-expert training state", training, to_train)):
        if got is not None and set(got) != keys:
            raise UserError(f"{what} do not match the model: {len(set(got) - keys)} unexpected, "
                            f"{len(keys - set(got))} missing")
    with torch.no_grad():
        for path, m in layers.items():
            m.task, m.learning, m.masks = None, False, {t: {} for t in tasks}
            for k in MASKED:
                w = getattr(m, k)
                used = unpack_bits(sized(state, f"{path}.{k}.used", -(-w.numel() // 8)),
                                   w.numel()).view(w.shape)
                n = int(used.sum())
                used = used.to(w.device)
                w[used] = sized(state, f"{path}.{k}", n).to(w)
                w[~used] = sized(training, f"{path}.{k}.free",
                                 w.numel() - n).to(w) if training else 0.0
                getattr(m, f"used_{k}").copy_(used)
                for t in tasks:
                    m.masks[t][k] = torch.zeros_like(used)
                    m.masks[t][k][used] = unpack_bits(sized(state, f"{path}.masks.{t}.{k}",
                                                            -(-n // 8)), n).to(w.device)
            for k in SHARED if m.sub.shared else ():
                p, importance = getattr(m, k), getattr(m, f"importance_{k}")
                p.copy_(sized(state, f"{path}.{k}", p.numel()).view_as(p))
                importance[...] = sized(training, f"{path}.importance_{k}",
                                        p.numel()).view_as(p) if training else 0.0


def redraw_scores(model: nn.Module, generator: torch.Generator) -> None:
    """Redraw every mask score: a new task's live mask starts as a random top-c% of all weights."""
    with torch.no_grad():
        for m in subexpert_layers(model).values():
            for s in m.scores.values():
                init = torch.empty(s.shape)
                nn.init.kaiming_uniform_(init.view(s.shape[0], -1), a=math.sqrt(5),
                                         generator=generator)
                s.copy_(init)


def free_share(model: nn.Module) -> float:
    """The share of the live mask that no finished task holds: what the new task can change."""
    kept = free = 0
    for m in subexpert_layers(model).values():
        for k in MASKED:
            live = top_share(m.scores[k], m.sub.sparsity)
            kept += int(live.sum())
            free += int((live & ~getattr(m, f"used_{k}")).sum())
    return free / max(kept, 1)


def subexpert_counts(model: nn.Module) -> dict[str, int]:
    """Sub-expert weights in all, held (stored), in each task's mask, and SETA's shared ones."""
    layers = subexpert_layers(model).values()
    counts = dict(weights=sum(getattr(m, k).numel() for m in layers for k in MASKED),
                  used=sum(int(getattr(m, f"used_{k}").sum()) for m in layers for k in MASKED),
                  shared=sum(p.numel() for p, _ in shared_weights(model)))
    for m in layers:
        for t, masks in m.masks.items():
            held = sum(int(v.sum()) for v in masks.values())
            counts[f"mask_{t}"] = counts.get(f"mask_{t}", 0) + held
    return counts


def lora_bytes(model: nn.Module, cfg: LoraConfig, base_model: str) -> int:
    """Bytes on disk of one task's rank-cfg.r LoRA adapter on the sub-experts' projections."""
    state = {f"{PEFT_PREFIX}{path}.lora_{ab}.weight": torch.zeros(shape)
             for path, m in subexpert_layers(model).items() for ab, shape in
             (("A", (cfg.r, m.base.in_features)), ("B", (m.base.out_features, cfg.r)))}
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(state, cfg, tmp, base_model)
        return sum(f.stat().st_size for f in Path(tmp).iterdir())


def subexpert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What a MoSE stage trains: sub-expert weights and routers (those earlier tasks hold get zero
    gradients, see SubExpertLinear), the mask scores, and SETA's shared experts."""
    return [p for m in subexpert_layers(model).values()
            for p in (m.A, m.B, m.router, *m.scores.values())] + \
        [p for p, _ in shared_weights(model)]


def shared_weights(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """SETA's shared-expert weights, each with its importance to the tasks learned so far."""
    return [(getattr(m, k), getattr(m, f"importance_{k}")) for m in subexpert_layers(model).values()
            if m.sub.shared for k in SHARED]
