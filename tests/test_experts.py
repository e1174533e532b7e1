"""Task reconstruction (Eq. 4), the loss mask (Eq. 5), indicator types, and
an expert's directory."""
import pytest
import torch

import lora
from data import Example, rehearsal
from errors import UserError
from experts import (PROMPT, LoraExpert, base_model, load_expert, prompt_ids, reconstruct,
                     resolve_template, setup_indicators)
from train import collate


def examples(task, n, response="the answer"):
    return [Example(f"{task}-{i}", f"Definition of {task}.\n\nInput {i}", [response])
            for i in range(n)]


def test_added_indicators_are_two_new_tokens(tiny):
    model, tok = tiny
    V = model.n_vocab
    ind = setup_indicators(model, tok, "added")
    assert (ind.pos, ind.neg) == ([V], [V + 1]) and model.n_vocab == V + 2
    assert tok.decode(ind.pos) == "<<pos>>"
    assert setup_indicators(model, tok, "added") == ind and model.n_vocab == V + 2, "set up once"


@pytest.mark.parametrize("kind,pos", [("semantic", "Yes"), ("non-semantic", "«pos»")])
def test_in_vocabulary_indicators_add_nothing(tiny, kind, pos):
    model, tok = tiny
    V = model.n_vocab
    ind = setup_indicators(model, tok, kind)
    assert model.n_vocab == V and max(ind.pos + ind.neg) < V
    assert tok.decode(ind.pos).strip() == pos


def test_unknown_indicator_type_is_a_user_error(tiny):
    with pytest.raises(
            UserError,
            match="unknown indicator type 'maybe'; known: added, non-semantic, semantic"):
        setup_indicators(*tiny, "maybe")


def test_reconstruction_makes_positives_and_query_only_negatives(tiny):
    model, tok = tiny
    ind = setup_indicators(model, tok)
    current, rehearsed = examples("a", 7), examples("b", 3)
    samples = reconstruct(current, rehearsed, tok, ind)
    assert len(samples) == 10
    response = tok.encode("the answer", bos=False)
    for s, ex in zip(samples[:7], current):
        assert s.ids[:s.start] == prompt_ids(tok, ex.query, 1024)
        assert s.ids[s.start:] == ind.pos + response + [tok.eos_id], "(q, o_pos, r) + EOS"
    for s, ex in zip(samples[7:], rehearsed):
        assert s.ids[:s.start] == prompt_ids(tok, ex.query, 1024)
        assert s.ids[s.start:] == ind.neg, "(q, o_neg): no response, no EOS"


def test_without_indicators_every_sample_is_query_and_response_and_rehearsal_is_replayed_in_full(
        tiny):
    _, tok = tiny
    current, rehearsed = examples("a", 3), examples("b", 2, "an old answer")
    # the baselines: non-rehearsal, replay, MTL, STL
    samples = reconstruct(current, rehearsed, tok, None)
    assert len(samples) == 5
    for s, ex in zip(samples, current + rehearsed):
        assert s.ids[:s.start] == prompt_ids(tok, ex.query, 1024)
        assert s.ids[s.start:] == tok.encode(ex.outputs[0], bos=False) + [tok.eos_id]


@pytest.mark.parametrize("tau,negatives", [(0.01, 2), (0.1, 5), (0.2, 10)])
def test_tau_sets_the_number_of_negatives(tiny, tau, negatives):
    model, tok = tiny
    ind = setup_indicators(model, tok)
    # 1% rounds up to one query per task
    previous = {"b": examples("b", 30), "c": examples("c", 20)}
    samples = reconstruct(examples("a", 40), rehearsal(previous, tau, seed=0), tok, ind)
    assert sum(s.ids[s.start:] == ind.neg for s in samples) == negatives
    assert sum(s.ids[s.start] == ind.pos[0] for s in samples) == 40


def test_the_loss_mask_covers_only_indicator_and_response(tiny):
    model, tok = tiny
    ind = setup_indicators(model, tok)
    samples = reconstruct(examples("a", 1), examples("b", 1, response="unused"), tok, ind)
    x, y = collate(samples, "cpu")
    pos, neg = samples
    assert (y[0] != -100).sum() == len(pos.ids) - pos.start and (y[1] != -100).sum() == len(ind.neg)
    assert (y[0, pos.start - 1:len(pos.ids) - 1].tolist()
            == pos.ids[pos.start:]), "position j predicts token j+1"
    assert ((y[0, :pos.start - 1] == -100).all()
            and (y[1, len(neg.ids) - 1:] == -100).all()), "query and padding masked"
    assert x[0, :len(pos.ids) - 1].tolist() == pos.ids[:-1]


def test_long_queries_and_responses_are_cut_to_the_limits(tiny):
    model, tok = tiny
    ind = setup_indicators(model, tok)
    long = Example("x", "word " * 2000, ["word " * 1000])
    [s] = reconstruct([long], [], tok, ind, max_source=100, max_target=30)
    assert s.start == 100 and len(s.ids) == 130
    assert s.ids[:s.start][-3:] == tok.encode(PROMPT.split("{query}")[1],
                                              bos=False)[-3:], "the answer cue survives"
    assert s.ids[s.start] == ind.pos[0] and s.ids[-1] == tok.eos_id


def test_the_chat_template_frames_the_query_and_auto_falls_back_to_plain(tiny):
    model, tok = tiny
    assert resolve_template(tok, "auto") == "plain", "tiny has no chat template"
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert resolve_template(tok, "auto") == "chat"
    ids = prompt_ids(tok, "Say hi.", 1024, "chat")
    assert tok.decode(ids) == "<user>Say hi.</><assistant>"
    cut = prompt_ids(tok, "word " * 500, 40, "chat")
    assert (len(cut) == 40
            and tok.decode(cut).endswith("</><assistant>")), "the template's tail survives the cut"


def test_an_expert_saved_and_loaded_runs_the_same_function(tiny, tiny_dir, tmp_path):
    model, tok = tiny
    setup_indicators(model, tok)  # the expert carries the added rows
    cfg = lora.LoraConfig(r=2, targets=("q_proj", "v_proj"))
    lora.add_adapter(model, "qa", cfg)
    with torch.no_grad():
        for p in lora.lora_parameters(model, "qa"):
            p.normal_(0, 0.1)
        model.extra_embed.normal_(0, 0.1)
        model.extra_head.normal_(0, 0.1)
    lora.set_adapter(model, "qa")
    x = torch.tensor([prompt_ids(tok, "Definition.\n\nInput", 64)])
    expected = model(x)
    LoraExpert.from_model(model, "qa", "qa", str(tiny_dir), "added", 64, "plain",
                          cfg).save(tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "expert.json", "indicators.safetensors"]

    from checkpoint import load_dir
    fresh, fresh_tok = load_dir(tiny_dir)
    setup_indicators(fresh, fresh_tok)
    expert = load_expert(tmp_path / "e")
    expert.attach(fresh)
    expert.use(fresh)
    assert torch.equal(fresh(x), expected)
    with base_model(fresh):
        assert (fresh(x).shape[-1]
                == fresh.config.vocab_size), "the base model has no indicator tokens"
    with pytest.raises(UserError, match="already exists"):
        expert.save(tmp_path / "e")


def test_a_tied_model_trains_and_stores_one_set_of_indicator_rows(tmp_path):
    from test_model import reference_pair
    from train import trainable_parameters
    _, model = reference_pair({"tie_word_embeddings": True})
    model.extend_vocab(2)
    cfg = lora.LoraConfig(r=2)
    lora.add_adapter(model, "a", cfg)
    trainable = trainable_parameters(model, "a", indicator_rows=True)
    assert ("extra_embed" in trainable and "extra_head" not in trainable
            and model.extra_head is model.extra_embed)
    expert = LoraExpert.from_model(model, "a", "a", "random", "added", 64, "plain", cfg)
    assert set(expert.rows) == {"embed"}
    expert.rows["embed"] = torch.randn_like(expert.rows["embed"])
    lora.add_adapter(model, "b", cfg)
    expert.name = "b"
    expert.use(model)
    assert (torch.equal(model.extra_head, expert.rows["embed"])
            and torch.equal(model.extra_embed, expert.rows["embed"]))
