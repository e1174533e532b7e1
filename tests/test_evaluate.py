"""evaluate.py: SuperNI's ROUGE-L, scores written as JSON, and whole continual
runs: SEE against the baselines."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from evaluate import evaluate_run, method_label
from metrics import rouge_l
from train import METHODS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("prediction,references", [
    ("The cat sat on the mat.", ["The cat sat on the mat."]),
    ("the cats were running home", ["A cat runs home"]),  # stemming: cats/cat, running/runs
    ("Positive", ["Negative"]),
    ("", ["something"]),
    ("They are on vacation in France",
     ["They are tourists .", "They are on a vacation with others in France ."]),
])
def test_rouge_l_is_the_best_rougeL_f_measure_over_references_times_100(prediction, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references) * 100
    assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_on_worked_examples():
    assert rouge_l("running dogs", ["runs dog"]) == 100.0, "stemming is on"
    # the cat were run home / a cat run home: LCS 3, P 3/5, R 3/4
    assert rouge_l("the cats were running home",
                   ["A cat runs home"]) == pytest.approx(100 * 2 * 0.6 * 0.75 / 1.35)
    assert rouge_l("Positive",
                   ["Negative", "positive"]) == 100.0, "best reference, case-insensitive"


def run_cli(args, tiny_dir):
    """evaluate.py in a child process, in fp32 unless args say otherwise: the child's default dtype
    follows the host CPU, which conftest's pin does not reach."""
    env = {**os.environ, "SEE_CACHE": str(tiny_dir.parent)}
    args = [*args, "--dtype", "float32"] if "--dtype" not in args else args
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_a_see_run_whose_indicators_learned_at_the_adapters_rate_is_labelled_apart():
    settings = dict(tau=0.1, sparsity=0.3, negatives="tasks", general_negatives=0,
                    indicator="added", indicator_lr=1e-2)
    slow = {**settings, "indicator_lr": "adapter"}
    assert method_label({"method": "see", "settings": settings}) == "SEE(10%)"
    assert method_label({"method": "see", "settings": slow}) == "SEE(10%) ind. lr = adapter's"


@pytest.mark.slow
@pytest.mark.parametrize("task,by_expert", [("sa", 1.0), ("pe", 0.0)])
def test_an_expert_answers_its_task_and_leaves_the_other_to_the_base_model(
        separable_run, tiny_dir, tmp_path, task, by_expert):
    cfg, run_dir = separable_run
    out = tmp_path / "eval.json"
    # queries are cut to the expert's own training length (96 tokens) without being told
    res = run_cli(["--expert", str(run_dir / "expert"), "--task", task, "--max-eval", "12",
                   "--max-new-tokens", "4", "--out", str(out)], tiny_dir)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    records = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert result["n"] == len(records) == 12 and result["answered_by_experts"] == by_expert
    assert {r["route"] for r in records} == {"sa" if by_expert else "base"}
    assert result["rougeL"] == pytest.approx(sum(rouge_l(r["prediction"], r["references"])
                                                 for r in records) / 12)
    assert f"{result['rougeL']:.2f}" in res.stdout


@pytest.mark.slow
def test_without_experts_the_base_model_answers(tiny_dir, tmp_path):
    res = run_cli(["--model", "tiny", "--task", "sa", "--max-eval", "4", "--max-new-tokens", "3",
                   "--out", str(tmp_path / "base.json")], tiny_dir)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "base.json").read_text())
    assert result["n"] == 4 and result["answered_by_experts"] == 0 and result["experts"] == []


@pytest.mark.slow
def test_a_missing_expert_is_one_line_of_error(tiny_dir, tmp_path):
    res = run_cli(["--expert", str(tmp_path / "nope"), "--task", "sa"], tiny_dir)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: {tmp_path / 'nope'} is not an expert directory (no expert.json)")


@pytest.fixture(scope="module")
def continual_runs(tiny_dir, synthetic_tasks, tmp_path_factory):
    """SEE(100%) and non-rehearsal over the same three synthetic tasks, each scored after
    every stage."""
    from evaluate import evaluate_run
    from train import train_sequence
    root = tmp_path_factory.mktemp("continual")
    cfg = TrainConfig(model=str(tiny_dir), tau=1.0, max_train=32, epochs=20, batch_size=16,
                      micro_batch=16, lr=3e-2, indicator_lr=1e-2, max_source=96, max_target=8)
    runs = {m: train_sequence(replace(cfg, method=m, out=str(root / m)), synthetic_tasks)
            for m in ("see", "non-rehearsal")}
    return runs, {m: evaluate_run(run, max_eval=8, max_new_tokens=6, max_ood=8)[0] for m,
                  run in runs.items()}


@pytest.mark.slow
def test_see_routes_every_query_to_its_expert_and_does_not_forget(continual_runs):
    from metrics import average_rouge, backward_transfer
    see = continual_runs[1]["see"]
    assert [len(row) for row in see["scores"]] == [1, 2, 3], "a_i after stage j, for i <= j"
    assert (see["ar"] == average_rouge(see["scores"])
            and see["bwt"] == backward_transfer(see["scores"]))
    assert see["routing_f1"] >= 0.95 and see["bwt"] == pytest.approx(0, abs=1.0)
    assert all(r["f1"] >= 0.95 for r in see["per_task_routing"].values())
    assert see["n_ood"] == {"lima": 8, "superni": 8 * 10}, (
        "all ten SuperNI tasks are held out of a synthetic sequence")


@pytest.mark.slow
def test_non_rehearsal_forgets_earlier_tasks(continual_runs):
    see, plain = continual_runs[1]["see"], continual_runs[1]["non-rehearsal"]
    assert plain["bwt"] < -10 and plain["bwt"] < see["bwt"] - 10
    assert (plain["routing_f1"] is None
            and plain["rb_acc"] is None), "one adapter answers everything: nothing is routed"


@pytest.mark.slow
def test_the_run_cli_prints_the_papers_table_and_writes_json(continual_runs, tiny_dir, tmp_path):
    runs, results = continual_runs
    # fp32, as evaluate_run scored them, on a CPU with native bf16 too
    res = run_cli(["--run", str(runs["see"]), "--run", str(runs["non-rehearsal"]), "--max-eval",
                   "8", "--max-new-tokens", "6", "--max-ood", "8", "--dtype", "float32"], tiny_dir)
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.strip().splitlines()[-5:-2]
    assert header.split() == ["method", "colour", "count", "mood", "AR", "BWT", "R-F1", "RB-LIMA",
                              "RB-SNI", "steps", "prefill", "except"]
    assert rows[0].startswith("SEE(100%)") and rows[1].startswith("Non-rehearsal")
    for run, row in zip(runs.values(), rows):
        written = json.loads((run / "eval.json").read_text())
        assert f"{written['ar']:.2f}" in row and f"{written['bwt']:.2f}" in row
        assert (written["scores"]
                == results[written["method"]]["scores"]), "the CLI scores as evaluate_run does"


@pytest.mark.slow
def test_the_written_results_say_where_and_how_long_it_ran(continual_runs, tiny_dir):
    runs, _ = continual_runs
    res = run_cli(["--run", str(runs["non-rehearsal"]), "--max-eval", "8", "--max-new-tokens", "6",
                   "--max-ood", "8"], tiny_dir)
    assert res.returncode == 0, res.stderr
    written = json.loads((runs["non-rehearsal"] / "eval.json").read_text())
    logged = [json.loads(line) for log in sorted(runs["non-rehearsal"].glob("*/log.jsonl"))
              for line in log.read_text().splitlines()]
    assert len(logged) > 1 and all(r["seconds"] > 0 for r in logged)
    assert written["train_seconds"] == pytest.approx(sum(r["seconds"] for r in logged))
    assert written["eval_seconds"] > 0 and "threads" in written["device"]


@pytest.mark.slow
def test_a_run_reports_exceptions_and_prefills_per_query(continual_runs):
    see = continual_runs[1]["see"]
    assert set(see["exceptions"]) == {"tasks", "lima", "superni"}
    assert (1 <= see["routing_steps"] <= 3
            and see["routing_steps"] <= see["prefills"] <= see["routing_steps"] + 1)


@pytest.mark.slow
def test_a_run_says_who_answered_each_out_of_distribution_set(continual_runs):
    see = continual_runs[1]["see"]
    assert set(see["ood_routes"]) == set(see["n_ood"])
    for name, routes in see["ood_routes"].items():
        assert set(routes) <= {"base", *(TrainConfig(task=t).name for t in see["tasks"])}
        assert sum(routes.values()) == see["n_ood"][name]
        assert routes.get("base", 0) / see["n_ood"][name] == pytest.approx(see["rb_acc"][name])


@pytest.mark.slow
def test_routing_none_scores_each_task_by_its_own_expert_with_o_pos_forced(continual_runs):
    from evaluate import evaluate_run
    runs, results = continual_runs
    result, predictions = evaluate_run(runs["see"], max_eval=8, max_new_tokens=6, routing="none")
    assert result["label"] == "SEE(100%) own-expert" and [len(row) for row in result["scores"]] == [3]
    assert result["bwt"] is None and result["routing_f1"] is None and result["rb_acc"] is None
    assert {p["task"]: p["route"] for p in predictions} == {t: Path(t).stem
                                                            for t in result["tasks"]}
    # the experts claim their own queries, so forcing o_pos answers them as routing did
    assert result["scores"][0] == results["see"]["scores"][-1]


@pytest.mark.slow
def test_routing_none_lets_the_named_expert_answer_every_query(separable_run, tiny_dir, tmp_path):
    _, run_dir = separable_run
    res = run_cli(["--expert", str(run_dir / "expert"), "--task", "pe", "--max-eval", "4",
                   "--max-new-tokens", "3", "--routing", "none"], tiny_dir)
    assert res.returncode == 0, res.stderr
    result = json.loads((run_dir / "eval-pe-expert-only.json").read_text())
    assert (result["answered_by_experts"] == 1.0
            and result["routing"] == "none"), "routed, the sa expert refuses pe"
    assert not (run_dir / "eval-pe.json").exists(), "a result measured otherwise is not overwritten"


@pytest.mark.parametrize("method", ["mtl", "stl"])
def test_mtl_and_stl_give_one_row_and_no_bwt(tiny_dir, tmp_path, method):
    from evaluate import evaluate_run
    from train import train_sequence
    cfg = TrainConfig(model=str(tiny_dir), method=method, out=str(tmp_path / method), max_train=8,
                      epochs=1, batch_size=8, micro_batch=8, max_source=64, max_target=6)
    result, predictions = evaluate_run(train_sequence(cfg, ["sa", "pe"]), max_eval=3,
                                       max_new_tokens=2)
    assert [len(row) for row in result["scores"]] == [2] and result["bwt"] is None
    routes = {p["task"]: p["route"] for p in predictions}
    assert routes == ({"sa": "pe", "pe": "pe"} if method == "mtl"
                      else {"sa": "sa", "pe": "pe"}), "which adapter answered"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_in_the_table_trains_and_evaluates_as_its_facts_say(tiny_dir, tmp_path, name):
    from evaluate import method_label
    from experts import SubExpert, load_expert
    from train import train_sequence
    method = METHODS[name]
    cfg = TrainConfig(model=str(tiny_dir), method=name, out=str(tmp_path / name), tau=1.0,
                      max_train=4, epochs=1,
                      batch_size=4, micro_batch=4, max_source=256, max_target=8)  # SSR's prompts
    run = train_sequence(cfg, ["sa", "pe"])
    system = json.loads((run / "system.json").read_text())
    stages = [json.loads((run / e).parent.joinpath("config.json").read_text())
              for e in system["experts"]]
    assert len(stages) == (1 if method.joint else 2)
    if not method.joint:
        assert ((stages[1]["previous"] == ["sa"]) == method.rehearses
                and bool(stages[1]["init"]) == method.continues)
    assert all(isinstance(load_expert(run / e), SubExpert) == method.sparse
               for e in system["experts"])
    log = json.loads(
        (run / system["experts"][-1]).parent.joinpath("log.jsonl").read_text().splitlines()[-1])
    assert ("pull" in log, "gate" in log) == (method.pull,
                                              method.gate), "the method's own loss terms are logged"
    result, predictions = evaluate_run(run, max_eval=2, max_new_tokens=2, max_ood=2)
    assert result["label"] == method_label(system)
    assert len(result["scores"]) == (2 if method.continues or method.routes else 1)
    assert (result["bwt"] is None) == (len(result["scores"]) == 1)
    assert ((result["routing_f1"] is not None)
            == (method.routes or method.sparse)), "routing or task identification"
    assert ("til_ar" in result) == method.sparse and (result["rb_acc"] is not None) == method.routes
    assert len(predictions) == 4 and all(("perplexity" in p) != method.sparse for p in predictions)


@pytest.mark.slow
def test_run_and_task_are_exclusive(tiny_dir, tmp_path):
    res = run_cli(["--run", str(tmp_path), "--task", "sa"], tiny_dir)
    assert res.returncode == 2 and "give --task" in res.stderr
    res = run_cli(["--run", str(tmp_path)], tiny_dir)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: {tmp_path} holds no system (no system.json); train one with train.py --sequence")


@pytest.mark.slow
def test_perplexity_is_the_answering_experts_after_its_indicator(continual_runs):
    from evaluate import evaluate_run
    runs, _ = continual_runs
    ppl = {m: {} for m in runs}
    for m, run in runs.items():
        for p in evaluate_run(run, max_eval=4, max_new_tokens=2, max_ood=1)[1]:
            ppl[m].setdefault(Path(p["task"]).stem, []).append(p["perplexity"])
    # the tiny model is barely trained (its answers are argmaxes of flat distributions), so compare:
    # SEE's own expert for an early task, against the one adapter of non-rehearsal, which forgot it
    for task in ("colour", "count"):
        assert max(ppl["see"][task]) < 0.7 * min(ppl["non-rehearsal"][task])


def test_response_perplexity_scores_the_response_and_eos_after_the_prefix_as_training_cuts_them(
        tiny):
    import math

    import torch

    from metrics import response_perplexity
    model, tok = tiny
    prompt, prefix, response = (tok.encode("Name the colour.\nOutput:"),
                                tok.encode("yes", bos=False), "a red house by the river")
    words = tok.encode(response, bos=False)

    def by_hand(target):  # one forward per scored token, each from the sequence before it
        ids, nll = prompt + prefix + target, []
        with torch.no_grad():
            for j in range(len(prompt) + len(prefix), len(ids)):
                nll.append(-model(torch.tensor([ids[:j]]))[0, -1].log_softmax(-1)[ids[j]].item())
        return math.exp(sum(nll) / len(nll))
    assert response_perplexity(model, tok, prompt, prefix,
                               response) == pytest.approx(by_hand(words + [tok.eos_id]), rel=1e-4)
    cut = len(prefix) + 3  # max_target holds the prefix, two response tokens and EOS
    assert response_perplexity(model, tok, prompt, prefix, response,
                               max_target=cut) == pytest.approx(
        by_hand(words[:2] + [tok.eos_id]), rel=1e-4)


def test_a_second_evaluation_writing_in_the_same_directory_is_refused(tmp_path):
    from errors import UserError
    from checkpoint import exclusive
    with exclusive(tmp_path / "run" / "eval.json"):
        with pytest.raises(UserError, match="another process is writing in"):
            with exclusive(tmp_path / "run" / "eval-expert-only.json"):
                pass
    with exclusive(tmp_path / "run" / "eval.json"):  # released when the first is done
        pass


def test_a_refused_evaluation_leaves_no_directory_behind(tmp_path):
    from errors import UserError
    from checkpoint import exclusive
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="no system"):
        with exclusive(tmp_path / "kept" / "new" / "deeper" / "eval.json"):
            raise UserError("no system")  # as a damaged run is refused inside the lock
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


@pytest.mark.parametrize("args", [["--template", "plain"], ["--max-source", "40"],
                                  ["--split", "train"], ["--model", "tiny"]])
def test_run_settings_that_would_be_ignored_are_refused(tmp_path, capsys, monkeypatch, args):
    import evaluate
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--run", str(tmp_path), *args])
    with pytest.raises(SystemExit):
        evaluate.main()
    assert "drop --model, --template, --max-source and --split" in capsys.readouterr().err


def test_a_directory_as_result_is_refused_before_anything_is_written(tmp_path):
    from artifacts import check_writable
    from errors import UserError
    with pytest.raises(UserError, match="it is a directory; name a file"):
        check_writable(tmp_path)


def test_a_result_that_cannot_be_written_leaves_no_predictions(tmp_path, monkeypatch):
    import evaluate
    from errors import UserError
    real = evaluate.atomic_write

    def full_disk(path, write):
        if path.suffix == ".json":
            raise UserError(f"could not write {path}: No space left on device")
        real(path, write)
    monkeypatch.setattr(evaluate, "atomic_write", full_disk)
    with pytest.raises(UserError, match="No space left"):
        evaluate.write_result(tmp_path / "eval.json", dict(ar=1.0), [dict(prediction="x")])
    assert list(tmp_path.iterdir()) == []
