"""Loading checkpoints: local directories (single and sharded), the hub
cache format, and bad input."""
import json
import shutil

import pytest
import torch

import checkpoint
from checkpoint import load, load_dir
from errors import UserError
from test_model import CASES, reference_pair


def save_reference(tmp_path, case: str, tiny_dir, **kw):
    """Save a random transformers model as a HF directory, with the tiny sentencepiece
    tokenizer beside it."""
    ref, _ = reference_pair(CASES[case])
    ref.save_pretrained(tmp_path, **kw)
    shutil.copy(tiny_dir / "tokenizer.model", tmp_path)
    return ref


def assert_same_logits(ref, ours):
    idx = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = ref(idx).logits, ours(idx)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2-bias"])
def test_local_directory_as_transformers_writes_it(tmp_path, tiny_dir, case):
    ref = save_reference(tmp_path, case, tiny_dir)
    model, tok = load(str(tmp_path))
    assert_same_logits(ref, model)
    assert tok.encode("hello")[0] == tok.bos_id == 1


def test_sharded_safetensors(tmp_path, tiny_dir):
    ref = save_reference(tmp_path, "grouped-query", tiny_dir, max_shard_size="20KB")
    assert ((tmp_path / "model.safetensors.index.json").exists()
            and not (tmp_path / "model.safetensors").exists())
    assert_same_logits(ref, load_dir(tmp_path)[0])


def test_hub_repo_id_is_read_from_the_hub_cache(tmp_path, tiny_dir, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download; offline, it finds the
    cached snapshot."""
    import huggingface_hub.constants as hf
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    model, tok = load("org/tiny-llama")
    expected, _ = load_dir(tiny_dir)
    assert all(torch.equal(a, b) for a,
               b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_hub_download_takes_only_safetensors_config_and_tokenizer():
    from huggingface_hub.utils import filter_repo_objects  # the filter snapshot_download applies
    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "pytorch_model.bin",
            "consolidated.00.pth", "consolidated.safetensors", "README.md", "original/params.json"]
    kept = set(filter_repo_objects(repo, allow_patterns=checkpoint.HUB_FILES))
    assert kept == set(repo[:7])


def test_missing_path_is_a_clear_error():
    with pytest.raises(UserError, match="'./no/such/dir' not found"):
        load("./no/such/dir")


def test_unknown_model_type_is_a_clear_error(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(UserError, match="unsupported model_type 'gpt_neox'"):
        load_dir(tmp_path / "m")


def test_tensors_that_do_not_match_the_config_are_a_clear_error(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(UserError,
                       match="does not match its config .*wrong shape: model.layers.0.mlp"):
        load_dir(tmp_path / "m")


def test_tiny_is_an_ordinary_directory_and_reproducible(tmp_path, tiny_dir):
    again = checkpoint.make_tiny(tmp_path / "tiny")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())
    assert (again / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    a, b = load_dir(again)[0], load_dir(tiny_dir)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bin_only_checkpoint_is_refused_with_the_reason(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="has no model.safetensors .*never from .bin pickles"):
        load_dir(tmp_path / "m")


def write_gguf(path, pre: str, extra_tensor: str | None = None):
    """A 1-layer llama GGUF with a 4-token byte-level vocabulary, as llama.cpp's converter
    lays it out."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(block_count=1, context_length=64, embedding_length=8,
                           feed_forward_length=16,
                           head_count=2, head_count_kv=2, layer_norm_rms_eps=1e-5).items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab", "<|end|>"])
    w.add_token_merges(["a b"])
    w.add_token_types([1, 1, 1, 3])
    w.add_eos_token_id(3)
    shapes = {"token_embd.weight": (4, 8), "output_norm.weight": (8,),
              "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16),
              **{f"blk.0.attn_{k}.weight": (8, 8) for k in ("q", "k", "v", "output")}}
    if extra_tensor:
        shapes[extra_tensor] = (4,)
    for name, shape in shapes.items():
        w.add_tensor(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_small_gguf_loads_with_its_tokenizer(tmp_path):
    model, tok = checkpoint.load(str(write_gguf(tmp_path / "m.gguf", "gpt2")))
    assert model.config.tie_embeddings and model.config.n_layers == 1
    assert tok.encode("ab<|end|>") == [2, 3] and tok.eos_ids == [3] and tok.decode([2, 0]) == "aba"


@pytest.mark.parametrize("pre, extra, message",
                         [("llama-bpe", None, "pre-tokenizer 'llama-bpe' is not supported"),
                                                 ("gpt2", "rope_freqs.weight",
                                                  "unsupported GGUF tensors rope_freqs")])
def test_gguf_we_cannot_read_is_a_clear_error(tmp_path, pre, extra, message):
    with pytest.raises(UserError, match=message):
        checkpoint.load(str(write_gguf(tmp_path / "m.gguf", pre, extra)))
