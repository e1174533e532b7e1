"""SuperNI tasks by abbreviation or task file, one-line errors for bad
input, and RandSel rehearsal."""
import json

import pytest

from data import (ORDERS, TASK_FILE_EVAL, TASKS, Example, data_dir, load_task, rehearsal,
                  rehearsal_sets, subsample)
from errors import UserError


def test_a_task_by_its_abbreviation_reads_its_split():
    examples = load_task("qa", "eval")
    assert len(examples) == 500
    first = json.loads((data_dir() / "qa.eval.jsonl").read_text().splitlines()[0])
    assert examples[0] == Example(first["id"], first["full_prompt"], [first["output"]])


def test_tasks_without_a_full_train_split_fall_back_to_their_sample(capsys):
    assert len(load_task("qg", "train")) == 200
    assert "qg.train.smp01.jsonl" in capsys.readouterr().out


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError,
                       match="unknown task 'qq'; known: qa, qg, sa, sum, trans, dsg, expl, para, "
                             "pe, pos"):
        load_task("qq")


def test_the_paper_orders_use_known_tasks():
    assert ORDERS["1"] == ["qa", "qg", "sa", "sum", "trans"] and len(ORDERS["10"]) == 10
    assert all(t in TASKS for order in ORDERS.values() for t in order)


@pytest.mark.parametrize("line,problem", [('{"full_prompt": "q", "output": "r"', "malformed JSON"),
                                          ('{"full_prompt": "q"}', "need a string 'full_prompt'"),
                                          ('["q", "r"]', "expected a JSON object")])
def test_a_malformed_record_names_its_file_and_line(tmp_path, line, problem):
    good = json.dumps({"id": "1", "full_prompt": "q", "output": "r"})
    (tmp_path / "sa.eval.jsonl").write_text(f"{good}\n\n{line}\n")
    with pytest.raises(UserError, match=f"sa.eval.jsonl:3: {problem}"):
        load_task("sa", "eval", tmp_path)


def test_missing_data_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data directory .* not found"):
        load_task("sa", "eval", tmp_path / "nowhere")


def test_an_official_superni_task_file_is_read_with_all_references(tmp_path):
    instances = [{"id": f"t-{i}", "input": f"input {i}", "output": [f"a{i}", f"b{i}"]}
                 for i in range(130)]
    path = tmp_path / "task999_demo.json"
    path.write_text(json.dumps({"Definition": ["Do the thing."], "Instances": instances}))
    evaluation, train = load_task(str(path), "eval"), load_task(str(path), "train")
    assert len(evaluation) == TASK_FILE_EVAL and len(train) == 30
    assert train[0] == Example("t-100", "Do the thing.\n\ninput 100", ["a100", "b100"])


def test_a_file_that_is_not_a_task_file_is_a_user_error(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"Instances": []}))
    with pytest.raises(UserError, match="not a SuperNI task file"):
        load_task(str(tmp_path / "x.json"), "eval")


def examples(task, n):
    return [Example(f"{task}-{i}", f"{task} query {i}", [f"r{i}"]) for i in range(n)]


def test_rehearsal_draws_tau_of_each_earlier_task():
    drawn = rehearsal({"a": examples("a", 200), "b": examples("b", 50)}, 0.1, seed=0)
    assert sum(e.id.startswith("a-")
               for e in drawn) == 20 and sum(e.id.startswith("b-") for e in drawn) == 5
    assert len({e.id for e in drawn}) == 25, "without replacement"
    assert len(rehearsal({"a": examples("a", 20)}, 0.01, seed=0)) == 1, "at least one per task"
    assert rehearsal({"a": examples("a", 20)}, 0.0, seed=0) == []


def test_rehearsal_is_reproducible_per_seed_and_per_task():
    prev = {"a": examples("a", 200), "b": examples("b", 200)}
    assert rehearsal(prev, 0.1, seed=3) == rehearsal(prev, 0.1, seed=3)
    assert rehearsal(prev, 0.1, seed=3) != rehearsal(prev, 0.1, seed=4)
    with_c = rehearsal({**prev, "c": examples("c", 200)}, 0.1, seed=3)
    assert with_c[:40] == rehearsal(prev, 0.1,
                                    seed=3), "a new task does not change the others' draw"


def test_rehearsal_of_tasks_that_ship_only_samples_is_sized_as_the_papers_2000():
    drawn, sources = rehearsal_sets(["qg", "sum"], 0.1, seed=0)
    assert sum(e.id.startswith("task074")
               for e in drawn) == 200 and len(drawn) == 400, "tau x 2000 each, not x 200"
    assert sources == ["qg: 200 from qg.train.smp01.jsonl", "sum: 200 from sum.train.smp01.jsonl"]
    assert ({e.id for e in rehearsal_sets(["qg"], 0.05, seed=0)[0]}
            == {e.id for e in load_task("qg", "train.smp005")})
    drawn, sources = rehearsal_sets(["qg"], 0.2, seed=0)
    assert len(drawn) == 200 and sources == ["qg: 200 of 200 drawn at random (400 asked, only 200 "
                                             "ship)"]


def test_rehearsal_takes_the_fixed_sample_file_for_tau_and_draws_otherwise():
    drawn, sources = rehearsal_sets(["qa"], 0.01, seed=0)
    assert ([e.id for e in drawn] == [e.id for e in load_task("qa", "train.smp001")]
            and len(drawn) == 20)
    assert len(rehearsal_sets(["qa"], 0.2, seed=0)[0]) == 400, "no sample file: tau of the 2000"
    drawn, sources = rehearsal_sets(["qa", "qg"], 0.1, seed=0, max_train=64)
    assert (len(drawn) == 12
            and sources[1] == "qg: 6 of 64 drawn at random"), "a cut training set: tau of the cut"


def test_subsample_is_seeded_and_keeps_everything_when_asked_for_more():
    xs = examples("a", 100)
    assert subsample(xs, 10, 1) == subsample(xs, 10, 1) != subsample(xs, 10, 2)
    assert subsample(xs, None, 1) == xs and subsample(xs, 500, 1) == xs


def test_out_of_distribution_queries_come_from_lima(tmp_path):
    from data import OOD_EVAL, load_ood
    test, rest = load_ood(), load_ood(split="train")
    assert (len(test) == OOD_EVAL and len(rest) == 1029 - OOD_EVAL
            and all(ex.query for ex in test + rest))
    assert not ({ex.query for ex in test}
                & {ex.query for ex in rest}), "pseudo-negatives never meet RB-Acc's queries"
    (tmp_path / "ood.jsonl").write_text('{"instruction": "Write a poem.", "input": "about '
                                        'rain"}\n{"input": "x"}\n')
    with pytest.raises(UserError, match="ood.jsonl:2: need a string 'instruction'"):
        load_ood(tmp_path / "ood.jsonl")


def test_your_own_jsonl_task_keeps_its_last_tenth_for_eval(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [json.dumps({"input": f"q{i}", "output": [f"a{i}", "b"], "definition": "Answer."})
             for i in range(20)]
    path.write_text("\n".join(lines) + "\n")
    train, held = load_task(str(path), "train"), load_task(str(path), "eval")
    assert [len(train), len(held)] == [18, 2] and train[0].query == "Answer.\n\nq0"
    assert held[0] == Example("mine-19", "Answer.\n\nq18", ["a18", "b"])


@pytest.mark.parametrize("line,message", [
    ({"input": "q", "output": 3}, "mine.jsonl:2: need a string 'input' and an 'output' string"),
    ({"output": "a"}, "mine.jsonl:2: need a string 'input'"),
    ({"input": "q", "output": "a", "definition": ["x"]}, "mine.jsonl:2: 'definition', if given"),
])
def test_a_bad_line_of_your_own_task_is_named(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"input": "q", "output": "a"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError, match=message):
        load_task(str(path), "train")


def test_a_line_with_a_lone_surrogate_is_named(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"input": "q\\ud800", "output": "a"}\n')
    with pytest.raises(UserError, match="mine.jsonl:1: holds a lone surrogate"):
        load_task(str(path), "train")


def test_a_superni_task_file_with_a_lone_surrogate_is_refused(tmp_path):
    path = tmp_path / "task999_x.json"
    path.write_text('{"Definition": ["Do."], "Instances": [{"id": "1", "input": "q\\udc00", '
                    '"output": ["a"]}]}')
    with pytest.raises(UserError, match="task999_x.json: holds a lone surrogate"):
        load_task(str(path), "train")
