"""A self-contained Llama (Llama-2/3, Mistral, Qwen2, SmolLM2) in plain PyTorch.

Module names mirror Hugging Face's (`model.layers.0.self_attn.q_proj`, ...) so that safetensors
checkpoints load as they are and LoRA adapters can be saved in the PEFT layout. It imports nothing
of the project: checkpoint.py loads it, router.py generates with it."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1: {"rope_type": "llama3", "factor": 8.0, ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict."""
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} (supported: "
                             f"{', '.join(MODEL_TYPES)})")
        n_heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}  # where transformers >= 5 writes theta and scaling
        scaling = cfg.get("rope_scaling") or (rope if "rope_type" in rope else None)
        kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default", "llama3"):
            raise ValueError(f"unsupported rope_scaling {scaling}")
        llama3_fields = {"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}
        if kind == "llama3" and not llama3_fields <= scaling.keys():
            raise ValueError(f"llama3 rope_scaling needs "
                             f"{', '.join(sorted(llama3_fields - scaling.keys()))}")
        max_len = cfg.get("max_position_embeddings", 4096)
        if model_type == "mistral" and cfg.get("sliding_window"):
            max_len = min(max_len, cfg["sliding_window"])  # no sliding-window attention here
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=None if kind in (None, "default") else scaling,
            max_seq_len=max_len,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, then cast back before the weight, as the reference implementation does
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3.1's long-context rescaling."""
    steps = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu")  # even under meta
    inv_freq = 1.0 / cfg.rope_theta ** (steps / cfg.head_dim)
    s = cfg.rope_scaling  # from_hf keeps it only for rope_type llama3
    if s is None:
        return inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > orig / low, inv_freq / factor,
                       torch.where(wavelen < orig / high, inv_freq, scaled))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by the angles cos/sin (B, 1, T, D), in HF checkpoints' halves layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values of one layer; slot i holds the i-th token of every row."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, start_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps)))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # rows added by extend_vocab (k, dim), apart so that the base rows stay frozen and exact
        self.extra_embed: nn.Parameter | None = None
        self.extra_head: nn.Parameter | None = None
        # a plain attribute, so model.to(bfloat16) cannot round the angles of far positions
        self.inv_freq = rope_frequencies(cfg)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def n_vocab(self) -> int:
        """Base vocabulary plus the rows added by extend_vocab."""
        return self.config.vocab_size + (0 if self.extra_embed is None else len(self.extra_embed))

    def extend_vocab(self, k: int) -> list[int]:
        """Add k token rows (input and output), the mean of the base rows, and return their ids.

        Base rows are untouched and their logits computed exactly as before (the new logits are
        concatenated after them), so every old logit stays bit-identical. The extra rows become new
        Parameters: call this before building an optimizer.
        """
        old_n = self.n_vocab
        def grow(old: nn.Parameter | None, base: torch.Tensor) -> nn.Parameter:
            rows = base.detach().mean(0, keepdim=True).expand(k, -1)
            return nn.Parameter(rows.clone() if old is None else torch.cat([old.detach(), rows]))
        self.extra_embed = grow(self.extra_embed, self.model.embed_tokens.weight)
        # tied checkpoints share one matrix for input and output, so the new rows are shared too
        tied = self.config.tie_embeddings
        self.extra_head = self.extra_embed if tied else grow(self.extra_head, self.lm_head.weight)
        return list(range(old_n, old_n + k))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if self.extra_embed is None:
            return self.model.embed_tokens(idx)
        V = self.config.vocab_size  # ids past the extra rows still fail, in the second lookup
        base = self.model.embed_tokens(idx.clamp(max=V - 1))
        extra = F.embedding((idx - V).clamp(min=0), self.extra_embed)
        return torch.where((idx >= V).unsqueeze(-1), extra.to(base.dtype), base)  # rows may be fp32

    def setup_caches(self, batch: int, max_len: int) -> None:
        dtype, device = self.lm_head.weight.dtype, self.lm_head.weight.device
        shape = (batch, self.config.n_kv_heads, max_len, self.config.head_dim)
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(shape, dtype, device)

    def clear_caches(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, start_pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, n_vocab), T = 1 if last_only, for tokens idx (B, T) from slot start_pos."""
        x = self.hidden(idx, pad_mask, start_pos)
        return self.head(x[:, -1:] if last_only else x)

    def hidden(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None,
               start_pos: int = 0) -> torch.Tensor:
        """Final hidden states (B, T, dim), normalised, before the output head. pad_mask (B,
        start_pos+T), True for real tokens, covers every slot so far (left padding); positions then
        count real tokens only, so a padded row computes what it would alone."""
        B, T = idx.shape
        slots = torch.arange(start_pos + T, device=idx.device)
        causal = slots[None, :] <= slots[start_pos:, None]  # (T, start_pos + T)
        if pad_mask is None:
            pos = slots[start_pos:].expand(B, T)
            mask = None if start_pos == 0 else causal
        else:
            pos = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:]
            # a pad query sees itself: an empty attention row gives zeros in CPU SDPA, but not every
            # CUDA kernel promises that, and one NaN there would reach real rows through the keys
            own = slots[None, :] == slots[start_pos:, None]
            mask = (causal & (pad_mask[:, None, :] | own)).unsqueeze(1)
        if self.inv_freq.device != idx.device:
            self.inv_freq = self.inv_freq.to(idx.device)
        angles = pos.unsqueeze(-1).float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
        x = self.embed(idx)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, start_pos)
        return self.model.norm(x)

    def checkpoint_blocks(self) -> None:
        """Activation checkpointing: blocks recompute their activations in the backward pass."""
        for block in self.model.layers:
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                              use_reentrant=False)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary, then the added rows."""
        logits = self.lm_head(x)
        if self.extra_head is not None:
            logits = torch.cat([logits, F.linear(x, self.extra_head)], dim=-1)
        return logits


def reads_on(tokens: list[int], prefixes: list[list[int]]) -> bool:
    """Whether the prefixes rule reads a row on past `tokens`: not past a token that departs from
    every prefix, nor once it completes a prefix other than the first (SEE: [o_pos, o_neg])."""
    for j, p in enumerate(prefixes):
        if tokens[:len(p)] == p[:len(tokens)]:  # follows p so far
            if j == 0 or len(tokens) < len(p):
                return True
            if len(tokens) == len(p):
                return False
    return False


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
             prefixes: list[list[int]] | None = None,
             ban: list[int] | None = None) -> list[list[int]]:
    """Continue each prompt greedily in one left-padded batch with the KV cache. A row stops at its
    first EOS (not kept), after max_new_tokens, or where reads_on says (the tokens read are kept):
    with `prefixes`, only rows that complete the first prefix decode on.
    Tokens in `ban` are never generated after the first prefix (SEE's added indicator tokens:
    routing signals, not response text)."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("cannot generate from an empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"need max_new_tokens >= 1, got {max_new_tokens}")
    device = model.lm_head.weight.device
    B, P = len(prompts), max(map(len, prompts))
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    pad_mask = torch.arange(P + max_new_tokens, device=device) >= pads[:, None]
    padded = bool(pads.any())
    banned = torch.tensor(ban or [], dtype=torch.long, device=device)
    ban_from = len(prefixes[0]) if prefixes else 0
    held = max(map(len, prefixes)) if prefixes else 0  # steps during which the prefixes rule reads
    rows, live = [[] for _ in prompts], set(range(B))
    model.setup_caches(B, P + max_new_tokens)
    try:
        logits = model(idx, pad_mask[:, :P] if padded else None, 0, last_only=True)
        for t in range(max_new_tokens):
            step = logits[:, -1]
            if len(banned) and t >= ban_from:
                step = step.index_fill(-1, banned, float("-inf"))
            tok = step.argmax(-1)  # greedy, as the paper decodes
            for i, x in enumerate(tok.tolist()):
                if i in live and x in eos_ids:
                    live.discard(i)
                elif i in live:
                    rows[i].append(x)
                    if t < held and not reads_on(rows[i], prefixes):
                        live.discard(i)
            if not live or t == max_new_tokens - 1:
                break
            logits = model(tok[:, None], pad_mask[:, :P + t + 1] if padded else None, P + t)
    finally:
        model.clear_caches()
    return rows
