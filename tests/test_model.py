"""Our Llama against transformers' reference implementation, and generation with the KV cache."""
import pytest
import torch
import transformers

from checkpoint import build
from model import ModelConfig, generate

BASE = dict(model_type="llama", vocab_size=96, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=112, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
CASES = {
    "multi-head": {},
    "grouped-query": dict(num_key_value_heads=2),
    "tied-embeddings": dict(tie_word_embeddings=True, num_key_value_heads=2),
    # a short original context puts the rotary frequencies in all three bands of the rescaling
    "llama3-rope": dict(rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                          original_max_position_embeddings=100)),
    "qwen2-bias": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, sliding_window=None),
}


def reference_pair(overrides: dict, seed: int = 0, device: str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """A transformers model with random weights (norms and biases included) and ours holding the
    same tensors."""
    cfg = {**BASE, **overrides}
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg),
                                                        attn_implementation="eager")
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = build(ModelConfig.from_hf(cfg), {k: v.clone() for k, v in ref.state_dict().items()},
                 dtype, device)
    return ref.to(device=device, dtype=dtype).eval(), ours


def logits_error(case: str, device: str, dtype: torch.dtype) -> float:
    """The largest logit difference between ours and transformers, relative to the largest logit."""
    ref, ours = reference_pair(CASES[case], device=device, dtype=dtype)
    idx = torch.randint(0, BASE["vocab_size"], (3, 40),
                        generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected, got = ref(idx).logits.float(), ours(idx).float()
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, device):
    rel = logits_error(case, device, torch.float32)
    assert rel < 1e-5, f"{case}: relative error {rel:.2e}"


@pytest.mark.parametrize("case", ["grouped-query", "tied-embeddings"])
def test_bfloat16_logits_match_transformers_in_bfloat16(case, device):
    # both round to bf16 (8 significant bits) at different points: 2e-2 is about 5 bf16 ulps of the
    # largest logit; on CPU it is 0.7-1.0e-2; MLP outputs 5% too large give 2.7e-2
    rel = logits_error(case, device, torch.bfloat16)
    assert rel < 2e-2, f"{case}: relative error {rel:.2e}"


def test_llama3_rope_scaling_changes_the_frequencies():
    scaled = ModelConfig.from_hf({**BASE, **CASES["llama3-rope"]})
    plain = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0})
    from model import rope_frequencies
    ratio = rope_frequencies(plain) / rope_frequencies(scaled)
    assert (ratio[0] == 1
            and ratio[-1] == pytest.approx(8)), "high frequencies kept, low ones divided by factor"
    assert ((ratio > 1.01) & (ratio < 7.99)).any(), "and the band between interpolated"


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf({**BASE, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError,
                       match="llama3 rope_scaling needs high_freq_factor, low_freq_factor"):
        ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                      "original_max_position_embeddings": 8192}})


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by running the whole sequence again at every step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(
                torch.tensor([ids], device=model.lm_head.weight.device))[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_full_recomputation(device):
    _, model = reference_pair(CASES["grouped-query"], device=device)
    prompt = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    assert generate(model, [prompt], 20, eos_ids=[-1]) == [recompute_greedy(model, prompt, 20)]


def test_batched_left_padded_generation_equals_one_at_a_time():
    _, model = reference_pair(CASES["grouped-query"])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    batched = generate(model, prompts, 15, eos_ids=[-1])
    assert batched == [generate(model, [p], 15, eos_ids=[-1])[0] for p in prompts]


def test_each_row_stops_at_its_own_eos():
    _, model = reference_pair(CASES["grouped-query"])
    prompts = [[5, 6, 7], [40, 41, 42, 43]]
    free = generate(model, prompts, 10, eos_ids=[-1])
    eos = free[0][4]  # row 0 emits this at step 4 (and maybe earlier)
    stopped = generate(model, prompts, 10, eos_ids=[eos])
    assert stopped[0] == free[0][:free[0].index(eos)]
    assert stopped[1] == free[1][:free[1].index(eos)] if eos in free[1] else stopped[1] == free[1]


@pytest.mark.parametrize("bad", [dict(prompts=[]), dict(prompts=[[1], []]), dict(max_new_tokens=0)])
def test_generation_rejects_bad_arguments(bad):
    _, model = reference_pair({})
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | bad
    with pytest.raises(ValueError):
        generate(model, args.pop("prompts"), eos_ids=[2], **args)


def test_ids_past_the_vocabulary_are_an_error_not_a_silent_clamp():
    _, model = reference_pair({})
    with pytest.raises(IndexError):
        model(torch.tensor([[96]]))
    model.extend_vocab(1)
    model(torch.tensor([[96]]))
    with pytest.raises(IndexError):
        model(torch.tensor([[97]]))


@pytest.mark.parametrize("case", ["grouped-query", "tied-embeddings"])
def test_extend_vocab_keeps_old_logits_bit_identical(case):
    _, model = reference_pair(CASES[case])
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(idx)
        new = model.extend_vocab(2)
        after = model(idx)
        mixed = model(torch.cat([idx, torch.tensor([new, new])], dim=1))
    assert new == [96, 97] and model.n_vocab == 98
    assert after.shape == (2, 20, 98) and torch.equal(after[..., :96], before)
    assert torch.equal(mixed[:, :20, :96],
                       before), "a new token later in the sequence changes nothing before it"
    mean = model.model.embed_tokens.weight.mean(0)
    assert torch.allclose(model.extra_embed, mean.expand(2, -1))
    assert (model.extra_head is model.extra_embed) == (case == "tied-embeddings")


def test_mistral_context_is_capped_at_its_sliding_window():
    """No sliding-window attention is implemented, so generation must stay inside the window."""
    cfg = ModelConfig.from_hf({**BASE, "model_type": "mistral", "max_position_embeddings": 32768,
                               "sliding_window": 4096})
    assert cfg.max_seq_len == 4096


def test_bfloat16_weights_give_close_logits(tiny_dir):
    from checkpoint import load_dir
    full, _ = load_dir(tiny_dir)
    half, _ = load_dir(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    idx = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = full(idx), half(idx).float()
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.05


def test_generate_with_a_prefix_stops_rows_that_depart_from_it(tiny):
    model, tok = tiny
    prompt = tok.encode("Definition: classify the review.")
    [greedy] = generate(model, [prompt], 6, [])
    other = (greedy[1] + 1) % model.n_vocab
    follows = generate(model, [prompt, prompt], 6, [], prefixes=[greedy[:2]])
    departs = generate(model, [prompt], 6, [], prefixes=[[greedy[0], other]])
    assert follows == [greedy, greedy], "a row that follows the prefix decodes on"
    assert departs == [greedy[:2]], "a row stops at its first departing token, which it keeps"


def test_generate_stops_a_row_that_completes_a_later_prefix_and_one_that_departs_from_all(tiny):
    model, tok = tiny
    prompt = tok.encode("Definition: classify the review.")
    [greedy] = generate(model, [prompt], 6, [])
    other = (greedy[1] + 1) % model.n_vocab
    # SEE's [o_pos, o_neg]: only the first decodes on; the second is read to its end, then stops
    assert generate(model, [prompt], 6, [],
                    prefixes=[[greedy[0], other], greedy[:2]]) == [greedy[:2]]
    assert generate(model, [prompt], 6, [], prefixes=[[other], greedy[:3]]) == [greedy[:3]]
    assert generate(model, [prompt], 6, [],
                    prefixes=[[greedy[0], other], [greedy[0], other, 1]]) == [greedy[:2]]
