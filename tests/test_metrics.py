"""The paper's metrics on hand-made score matrices and routing decisions."""
import pytest

from metrics import average_rouge, backward_transfer, rouge_l, routing_cost, routing_scores
from experts import NEG, NEITHER, POS

# scores[j][i]: ROUGE-L of task i after stage j (only i <= j is ever used)
SCORES = [[50.0],
          [40.0, 60.0],
          [30.0, 55.0, 70.0]]


def test_ar_is_the_mean_over_tasks_after_the_last_stage():
    assert average_rouge(SCORES) == pytest.approx((30 + 55 + 70) / 3)


def test_bwt_compares_each_earlier_task_with_just_after_it_was_learned():
    assert backward_transfer(SCORES) == pytest.approx(((30 - 50) + (55 - 60)) / 2)
    assert backward_transfer([[50.0], [50.0, 10.0]]) == 0.0, "no forgetting"
    assert backward_transfer([[42.0]]) == 0.0, "one task: nothing to forget"


def test_routing_precision_recall_f1_and_rb_acc():
    gold = ["qa", "qa", "qa", "qg", "qg", None, None, None, None]
    routes = ["qa", "qa", "qg", "qg", None, None, "qa", None, None]
    s = routing_scores(routes, gold)
    assert s["per_task"]["qa"] == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
    assert s["per_task"]["qg"] == pytest.approx(dict(precision=1 / 2, recall=1 / 2, f1=1 / 2))
    assert s["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2) and s["rb_acc"] == pytest.approx(3 / 4)


def test_perfect_routing_scores_one():
    gold = ["a", "b", None]
    s = routing_scores(gold, gold)
    assert s["f1"] == 1.0 and s["rb_acc"] == 1.0


def test_routing_cost_counts_visits_prefills_and_exceptions():
    # newest first: claimed by the newest; by the second; refused by all
    # three; an exception at the second
    outcomes = [[POS], [NEG, POS], [NEG, NEG, NEG], [NEG, NEITHER]]
    to_base = [False, False, True, True]
    assert routing_cost(outcomes, to_base) == pytest.approx(
        dict(visited=(1 + 2 + 3 + 2) / 4, prefills=(1 + 2 + 4 + 3) / 4, exceptions=1))


def test_xlingual_rouge_keeps_accented_letters_and_case():
    # rouge-score's default tokenizer keeps [a-z0-9] only: "más" becomes "m s" and matches "mós"
    assert rouge_l("el más grande", ["el mós grande"]) == pytest.approx(100.0)
    assert (rouge_l("el más grande", ["el mós grande"], xlingual=True)
            == pytest.approx(100 * 2 / 3))
    assert rouge_l("el más grande", ["el más grande"], xlingual=True) == pytest.approx(100.0)
    assert rouge_l("Qué", ["qué"], xlingual=True) == 0.0, "SuperNI's xlingual tokens keep case"


def test_xlingual_rouge_uses_the_bpe_tokenizer_it_is_given(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import metrics
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["el más grande de los años"] * 20,
                            trainers.BpeTrainer(vocab_size=300))
    bpe.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setenv(metrics.XLINGUAL_ENV, str(tmp_path / "tokenizer.json"))
    tokens = metrics.XlingualTokens()
    assert tokens.tokenize("el más grande") == [t.lstrip("Ġ")
                                                for t in bpe.encode("el más grande").tokens]
    assert tokens.name == str(tmp_path / "tokenizer.json")
    assert "más" not in tokens.tokenize("más"), (
        "byte-level: accented letters are byte pairs, as GPT-2's are")
