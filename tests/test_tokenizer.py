"""Our tokenizer against transformers' on SuperNI text, for sentencepiece
and for SmolLM2's GGUF BPE."""
import itertools

import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from checkpoint import load_gguf_tokenizer, smollm2_path
from data import data_dir, read_jsonl
from tokenizer import Tokenizer


def superni_lines(n: int = 300) -> list[str]:
    """Prompts and outputs of several tasks: prose, dialogue, Spanish, digits, lists, newlines."""
    records = itertools.chain.from_iterable(
        read_jsonl(data_dir() / f"{t}.extra.jsonl")
        for t in ("qa", "trans", "pe", "dsg", "sum", "pos", "para", "sa"))
    texts = itertools.chain.from_iterable((r["full_prompt"], r["output"]) for r in records)
    return list(itertools.islice(texts, n))


@pytest.fixture(scope="module")
def smollm2_tokenizers():
    path = smollm2_path()
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF import reads tokens, merges and specials but ignores
    # `tokenizer.ggml.pre`; give it the pre-tokenizer of SmolLM2's own tokenizer.json (=
    # llama.cpp's "smollm"): single digits, then GPT-2's split
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return load_gguf_tokenizer(path), ref


def test_sentencepiece_matches_transformers(tiny_dir):
    ours = Tokenizer.from_dir(tiny_dir)
    ref = transformers.LlamaTokenizer.from_pretrained(tiny_dir)
    lines = superni_lines()
    assert len(lines) == 300
    for line in lines:
        assert ours.encode(line) == ref(line).input_ids, line[:80]
        assert ours.decode(ours.encode(line)) == line


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_tokenizers):
    ours, ref = smollm2_tokenizers
    for line in superni_lines() + ["Numbers 12345 and 3.14159, x=42",
                                   "<|im_start|>user\nHi<|im_end|>"]:
        assert ours.encode(line) == ref(line).input_ids, line[:80]
        assert ours.decode(ours.encode(line)) == line


def test_bos_follows_the_checkpoint(tiny_dir, smollm2_tokenizers):
    sp, bpe = Tokenizer.from_dir(tiny_dir), smollm2_tokenizers[0]
    assert sp.add_bos and sp.encode("hi")[0] == sp.bos_id == 1
    assert not bpe.add_bos and bpe.encode("hi") == bpe.encode("hi", bos=False)
    assert sp.encode("hi", eos=True)[-1] == sp.eos_id == 2 and bpe.eos_ids == [2]  # <|im_end|>


@pytest.mark.parametrize("which", ["sentencepiece", "smollm2"])
def test_added_tokens_are_atomic_and_decode_literally(which, tiny_dir, smollm2_tokenizers):
    tok = Tokenizer.from_dir(tiny_dir) if which == "sentencepiece" else smollm2_tokenizers[0]
    start = tok.base_size
    pos, neg = tok.add_tokens(["<<pos>>", "<<neg>>"], start)
    assert (pos, neg) == (start, start + 1) and len(tok) == start + 2
    assert tok.encode("<<pos>>", bos=False) == [pos]
    text = "Is it good?<<pos>> yes<<neg>><<pos>>"
    ids = tok.encode(text, bos=False)
    assert ids.count(pos) == 2 and ids.count(neg) == 1
    assert ids[:ids.index(pos)] == tok.encode("Is it good?", bos=False)
    assert tok.decode(ids) == text


def test_added_ids_cannot_overlap_earlier_ids(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    with pytest.raises(ValueError,
                       match="start after the vocabulary so far \\(1024\\), not at 1023"):
        tok.add_tokens(["<<pos>>"], tok.base_size - 1)
    tok.add_tokens(["<<pos>>"], 1024)
    with pytest.raises(ValueError, match="not at 1024"):
        tok.add_tokens(["<<neg>>"], 1024)
    with pytest.raises(ValueError, match="already added: \\['<<pos>>'\\]"):
        tok.add_tokens(["<<pos>>"], 1025)


def test_new_tokens_reach_the_new_model_rows(tiny):
    model, tok = tiny
    ids = tok.add_tokens(["<<pos>>", "<<neg>>"], model.extend_vocab(2)[0])
    assert ids == [1024, 1025] and len(tok) == model.n_vocab == 1026
    x = model.embed(torch.tensor([tok.encode("<<neg>>", bos=False)]))
    assert torch.equal(x[0, 0], model.extra_embed[1])


def test_tokenizer_json_directory(tmp_path, smollm2_tokenizers):
    """The tokenizer.json back-end, as transformers saves it, gives the GGUF tokenizer's ids and
    stop tokens."""
    ours, ref = smollm2_tokenizers
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    tok = Tokenizer.from_dir(tmp_path)
    for line in superni_lines(50):
        assert tok.encode(line) == ours.encode(line)
    assert tok.eos_ids == [2, 0] and not tok.add_bos


def test_bos_added_by_a_tokenizer_json_post_processor_is_detected(tmp_path, smollm2_tokenizers):
    """Llama-3's tokenizer.json adds <|begin_of_text|> in its post-processor; we add it
    the same way."""
    from tokenizers import Tokenizer as HFTokenizer, processors
    smollm2_tokenizers[1].save_pretrained(tmp_path)
    backend = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.bos_id == 1
    assert (tok.encode("Hello") == backend.encode("Hello").ids
            == [1] + tok.encode("Hello", bos=False))
    assert tok.decode(tok.encode("Hello")) == "Hello"
