"""LoRA written out by hand: a frozen linear layer plus named low-rank adapters, saved in PEFT's layout.

y = W x + (alpha / r) * B A dropout(x), with A (r x in) Kaiming-uniform and B (out x r) zero, so a
fresh adapter leaves the model unchanged. Several adapters can sit on one base; one is active.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

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
        self.targets = tuple(self.targets)
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown or not self.targets:
            raise UserError(f"LoRA targets must be among {', '.join(PROJECTIONS)}, got {', '.join(self.targets)}")
        if self.r < 1 or not 0 <= self.dropout < 1:
            raise UserError(f"need LoRA rank >= 1 and 0 <= dropout < 1, got r={self.r}, dropout={self.dropout}")


class LoraLinear(nn.Module):
    """A frozen nn.Linear with named adapters (parameter names as in PEFT: lora_A.<name>.weight)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into base.weight, if any

    def add(self, name: str, cfg: LoraConfig) -> None:
        w = self.base.weight
        A = nn.Linear(self.base.in_features, cfg.r, bias=False, device=w.device, dtype=w.dtype)
        B = nn.Linear(cfg.r, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init for A
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(cfg.dropout).train(self.training)  # an eval-mode model stays in eval
        self.scaling[name] = cfg.alpha / cfg.r

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update scaling * B A, shaped like the base weight."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        name = self.active
        if name is None or name == self.merged:
            return y
        A, B = self.lora_A[name], self.lora_B[name]
        return y + B(A(self.lora_dropout[name](x.to(A.weight.dtype)))).to(y.dtype) * self.scaling[name]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> None:
    """Wrap cfg.targets in LoraLinear (once) and give each wrapped projection a fresh adapter `name`."""
    if any(name in m.lora_A for m in lora_layers(model).values()):
        raise UserError(f"adapter {name!r} already exists")
    if "." in name:
        raise UserError(f"adapter names cannot contain '.', got {name!r}")
    for parent in list(model.modules()):
        for attr in cfg.targets:
            child = getattr(parent, attr, None)
            if isinstance(child, nn.Linear):
                setattr(parent, attr, LoraLinear(child).train(child.training))
                child = getattr(parent, attr)
            if isinstance(child, LoraLinear):
                child.add(name, cfg)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter everywhere (None: the bare base model)."""
    for m in lora_layers(model).values():
        if m.merged is not None and m.merged != name:
            raise UserError(f"adapter {m.merged!r} is merged into the base weights; unmerge it first")
        m.active = name if name in m.lora_A else None


def merge(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights and make it the active one (faster inference);
    unmerge() takes it out again (up to rounding)."""
    set_adapter(model, name)
    with torch.no_grad():
        for m in lora_layers(model).values():
            if m.merged is not None:
                raise UserError(f"adapter {m.merged!r} is already merged; unmerge it first")
            if name in m.lora_A:
                m.base.weight += m.delta(name).to(m.base.weight.dtype)
                m.merged = name


def unmerge(model: nn.Module) -> None:
    with torch.no_grad():
        for m in lora_layers(model).values():
            if m.merged is not None:
                m.base.weight -= m.delta(m.merged).to(m.base.weight.dtype)
                m.merged = None


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` under PEFT's key names (base_model.model.<module>.lora_A.weight)."""
    state = {}
    for path, m in lora_layers(model).items():
        if name in m.lora_A:
            state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A[name].weight.detach()
            state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B[name].weight.detach()
    return state


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed weights into existing adapter `name`; every key must be used, every layer filled."""
    layers = {path: m for path, m in lora_layers(model).items() if name in m.lora_A}
    expected = {f"{PEFT_PREFIX}{path}.lora_{ab}.weight" for path in layers for ab in "AB"}
    if set(state) != expected:
        raise UserError(f"adapter weights do not match the model: {len(set(state) - expected)} unexpected, "
                        f"{len(expected - set(state))} missing (e.g. {sorted(set(state) ^ expected)[:1]})")
    with torch.no_grad():
        for path, m in layers.items():
            for ab, lin in (("A", m.lora_A[name]), ("B", m.lora_B[name])):
                w = state[f"{PEFT_PREFIX}{path}.lora_{ab}.weight"]
                if w.shape != lin.weight.shape:
                    raise UserError(f"adapter weight {path}.lora_{ab} has shape {tuple(w.shape)}, "
                                    f"expected {tuple(lin.weight.shape)}")
                lin.weight.copy_(w)


def save_adapter(model: nn.Module, name: str, cfg: LoraConfig, out_dir: str | Path, base_model: str) -> None:
    """Write adapter `name` as PEFT does, so that PeftModel.from_pretrained reads it."""
    write_adapter(adapter_state(model, name), cfg, out_dir, base_model)


def write_adapter(state: dict[str, torch.Tensor], cfg: LoraConfig, out_dir: str | Path, base_model: str) -> None:
    """adapter_model.safetensors (fp32) + adapter_config.json in PEFT's layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model, r=cfg.r,
                  lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                  bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, use_rslora=False)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and weights of a saved adapter (ours or PEFT's)."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{path} holds no adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    try:
        c = json.loads((path / ADAPTER_CONFIG).read_text())
        plain = (c["peft_type"] == "LORA" and isinstance(c["target_modules"], list) and c.get("bias", "none") == "none"
                 and not any(c.get(k) for k in ("use_rslora", "use_dora", "alpha_pattern", "rank_pattern",
                                                  "layers_to_transform", "modules_to_save")))
        cfg = LoraConfig(r=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0), targets=c["target_modules"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / ADAPTER_CONFIG}: not a LoRA adapter config ({type(e).__name__}: {e})") from None
    if not plain:
        raise UserError(f"{path}: only plain LoRA adapters can be read (a list of target modules; no bias, rsLoRA, "
                        f"DoRA, per-layer patterns or modules_to_save)")
    return cfg, load_file(path / ADAPTER_WEIGHTS)


def load_adapter(model: nn.Module, name: str, path: str | Path) -> LoraConfig:
    """Add a saved adapter to the model under `name`."""
    cfg, state = read_adapter(path)
    add_adapter(model, name, cfg)
    load_adapter_state(model, name, state)
    return cfg


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() if name in m.lora_A
            for p in (m.lora_A[name].weight, m.lora_B[name].weight)]
