"""evaluate.py: SuperNI's ROUGE-L, and scores written as JSON with the predictions beside them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from evaluate import rouge_l

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("prediction,references", [
    ("The cat sat on the mat.", ["The cat sat on the mat."]),
    ("the cats were running home", ["A cat runs home"]),  # stemming: cats/cat, running/runs
    ("Positive", ["Negative"]),
    ("", ["something"]),
    ("They are on vacation in France", ["They are tourists .", "They are on a vacation with others in France ."]),
])
def test_rouge_l_is_the_best_rougeL_f_measure_over_references_times_100(prediction, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references) * 100
    assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_on_worked_examples():
    assert rouge_l("running dogs", ["runs dog"]) == 100.0, "stemming is on"
    # the cat were run home / a cat run home: LCS 3, P 3/5, R 3/4
    assert rouge_l("the cats were running home", ["A cat runs home"]) == pytest.approx(100 * 2 * 0.6 * 0.75 / 1.35)
    assert rouge_l("Positive", ["Negative", "positive"]) == 100.0, "best reference, case-insensitive"


def run_cli(args, tiny_dir):
    env = {**os.environ, "SEE_CACHE": str(tiny_dir.parent)}
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("task,by_expert", [("sa", 1.0), ("pe", 0.0)])
def test_an_expert_answers_its_task_and_leaves_the_other_to_the_base_model(separable_run, tiny_dir, tmp_path, task, by_expert):
    cfg, run_dir = separable_run
    out = tmp_path / "eval.json"
    # queries are cut to the expert's own training length (96 tokens) without being told
    res = run_cli(["--expert", str(run_dir / "expert"), "--task", task, "--max-eval", "12", "--max-new-tokens", "4",
                   "--out", str(out)], tiny_dir)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    records = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert result["n"] == len(records) == 12 and result["answered_by_experts"] == by_expert
    assert {r["route"] for r in records} == {"sa" if by_expert else "base"}
    assert result["rougeL"] == pytest.approx(sum(rouge_l(r["prediction"], r["references"]) for r in records) / 12)
    assert f"{result['rougeL']:.2f}" in res.stdout


def test_without_experts_the_base_model_answers(tiny_dir, tmp_path):
    res = run_cli(["--model", "tiny", "--task", "sa", "--max-eval", "4", "--max-new-tokens", "3",
                   "--out", str(tmp_path / "base.json")], tiny_dir)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "base.json").read_text())
    assert result["n"] == 4 and result["answered_by_experts"] == 0 and result["experts"] == []


def test_a_missing_expert_is_one_line_of_error(tiny_dir, tmp_path):
    res = run_cli(["--expert", str(tmp_path / "nope"), "--task", "sa"], tiny_dir)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'nope'} is not an expert directory (no expert.json)"


def test_a_continual_run_gives_the_score_matrix_and_the_papers_metrics(tiny_dir, tmp_path):
    from dataclasses import replace

    from evaluate import average_rouge, backward_transfer, evaluate_run
    from train import TrainConfig, train_sequence
    cfg = TrainConfig(model=str(tiny_dir), out=str(tmp_path / "see"), tau=1.0, max_train=32, epochs=4, batch_size=16,
                      micro_batch=16, lr=1e-2, max_source=96, max_target=8)
    run = train_sequence(cfg, ["sa", "pe"])
    result = evaluate_run(run, max_eval=6, max_new_tokens=3, max_ood=8)
    assert [len(row) for row in result["scores"]] == [1, 2], "a_i after stage j, for i <= j"
    assert result["ar"] == average_rouge(result["scores"]) and result["bwt"] == backward_transfer(result["scores"])
    assert result["routing_f1"] == 1.0, "separable tasks: every query reaches its own expert"
    assert result["n_ood"] == 8 and 0 <= result["rb_acc"] <= 1
    assert 1 <= result["routing_steps"] <= 2
