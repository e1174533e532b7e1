"""Hand-written LoRA: a no-op at init, several adapters, and PEFT's file
layout (peft is the oracle)."""
import json

import peft
import pytest
import torch

import lora
from errors import UserError
from test_model import reference_pair

CFG = lora.LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))


def randomize(model, name, seed=0):
    """Give adapter `name` random A and B (B starts at zero, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture()
def pair():
    return reference_pair({})


def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def test_a_fresh_adapter_leaves_the_outputs_unchanged(pair):
    _, model = pair
    before = model(tokens())
    lora.add_adapter(model, "a", CFG)
    lora.set_adapter(model, "a")
    model.train()  # dropout on: B = 0 must still make the update exactly zero
    assert torch.equal(model(tokens()), before)


def test_only_the_targeted_projections_are_wrapped(pair):
    _, model = pair
    lora.add_adapter(model, "a", CFG)
    wrapped = {path.rsplit(".", 1)[-1] for path in lora.lora_layers(model)}
    assert wrapped == {"q_proj", "v_proj", "down_proj"}
    assert len(lora.lora_layers(model)) == 3 * model.config.n_layers


def test_the_active_adapter_selects_the_function(pair):
    _, model = pair
    with torch.no_grad():
        base = model(tokens())
        for name, seed in (("a", 0), ("b", 1)):
            lora.add_adapter(model, name, CFG)
            randomize(model, name, seed)
        outs = {}
        for name in ("a", "b", None):
            lora.set_adapter(model, name)
            outs[name] = model(tokens())
    assert torch.equal(outs[None], base)
    assert not torch.allclose(outs["a"], outs["b"]) and not torch.allclose(outs["a"], base)


def test_bad_targets_and_duplicate_names_are_user_errors(pair):
    with pytest.raises(UserError, match="LoRA targets must be among"):
        lora.LoraConfig(targets=("qkv",))
    _, model = pair
    lora.add_adapter(model, "a", CFG)
    with pytest.raises(UserError, match="already exists"):
        lora.add_adapter(model, "a", CFG)


def test_peft_loads_what_we_save_with_identical_outputs(pair, tmp_path):
    ref, model = pair
    lora.add_adapter(model, "a", CFG)
    randomize(model, "a")
    lora.set_adapter(model, "a")
    lora.write_adapter(lora.adapter_state(model, "a"), CFG, tmp_path, "random")
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens()), peft_model(tokens()).logits, rtol=1e-5,
                                   atol=1e-5)


def load_adapter(model, name, path):
    """Add a saved adapter (ours or PEFT's) to the model under `name`."""
    cfg, state = lora.read_adapter(path)
    lora.add_adapter(model, name, cfg)
    lora.load_adapter_state(model, name, state)
    return cfg


def test_we_load_what_peft_saves_with_identical_outputs(pair, tmp_path):
    ref, model = pair
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(ref, config).eval()
    peft_model.save_pretrained(tmp_path)
    cfg = load_adapter(model, "theirs", tmp_path)
    assert (cfg.r, cfg.alpha, set(cfg.targets)) == (4, 8, {"q_proj", "v_proj", "down_proj"})
    lora.set_adapter(model, "theirs")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens()), peft_model(tokens()).logits, rtol=1e-5,
                                   atol=1e-5)


def test_an_adapter_for_another_model_is_refused(pair, tmp_path):
    _, model = pair
    lora.add_adapter(model, "a", CFG)
    lora.write_adapter(lora.adapter_state(model, "a"), CFG, tmp_path, "random")
    _, other = reference_pair({"num_hidden_layers": 1})
    with pytest.raises(UserError, match="do not match the model"):
        load_adapter(other, "a", tmp_path)


def test_an_adapter_added_to_an_eval_model_runs_without_dropout(pair):
    _, model = pair
    model.eval()
    lora.add_adapter(model, "a", CFG)
    randomize(model, "a")
    lora.set_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(tokens()), model(tokens()))


def test_peft_features_we_do_not_implement_are_refused(pair, tmp_path):
    _, model = pair
    lora.add_adapter(model, "a", CFG)
    lora.write_adapter(lora.adapter_state(model, "a"), CFG, tmp_path, "random")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="only plain LoRA adapters"):
        lora.read_adapter(tmp_path)
