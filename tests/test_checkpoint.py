"""Loading checkpoints: local directories (single and sharded), the hub cache format, and bad input."""
import json
import shutil

import pytest
import torch

import checkpoint
from checkpoint import load, load_dir
from errors import UserError
from test_model import CASES, reference_pair


def save_reference(tmp_path, case: str, tiny_dir, **kw):
    """Save a random transformers model as a HF directory, with the tiny sentencepiece tokenizer beside it."""
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
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert_same_logits(ref, load_dir(tmp_path)[0])


def test_hub_repo_id_is_read_from_the_hub_cache(tmp_path, tiny_dir, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download; offline, it finds the cached snapshot."""
    import huggingface_hub.constants as hf
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    model, tok = load("org/tiny-llama")
    expected, _ = load_dir(tiny_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_hub_download_takes_only_safetensors_config_and_tokenizer():
    from huggingface_hub.utils import filter_repo_objects  # the filter snapshot_download applies
    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "pytorch_model.bin", "consolidated.00.pth",
            "consolidated.safetensors", "README.md", "original/params.json"]
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
    with pytest.raises(UserError, match="does not match its config .*wrong shape: model.layers.0.mlp"):
        load_dir(tmp_path / "m")


def test_tiny_is_an_ordinary_directory_and_reproducible(tmp_path, tiny_dir):
    again = checkpoint.make_tiny(tmp_path / "tiny")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())
    assert (again / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    a, b = load_dir(again)[0], load_dir(tiny_dir)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
