"""general.py: zero-shot MMLU (paper Fig. 4) on the tiny model, with a small MMLU-format set."""
import pytest
import torch

from errors import UserError
from general import accuracy, choices, load_mmlu, score_run
from runs import TrainConfig
from train import train_sequence

QUESTIONS = [f"Which is number {i}?,one {i},two {i},three {i},four {i}" for i in range(6)]


def write_mmlu(root, answers):
    (root / "test").mkdir(parents=True, exist_ok=True)
    rows = [f"{q},{a}\n" for q, a in zip(QUESTIONS, answers)]
    (root / "test" / "anatomy_test.csv").write_text("".join(rows[:3]))
    (root / "test" / "virology_test.csv").write_text("".join(rows[3:]))
    return root


@pytest.fixture(scope="module")
def see_run(tiny_dir, tmp_path_factory):
    cfg = TrainConfig(model=str(tiny_dir), tau=0.5, max_train=8, epochs=1, batch_size=8,
                      micro_batch=8, max_source=64, max_target=8, dtype="float32",
                      out=str(tmp_path_factory.mktemp("general") / "see"))
    return train_sequence(cfg, ["sa", "pe"])


def test_mmlu_rows_become_zero_shot_queries_and_a_bad_row_is_named(tmp_path):
    items = load_mmlu(write_mmlu(tmp_path, "ABCDAB"), per_subject=2)
    assert [g for _, g in items] == [0, 1, 3, 0]  # the first two of each subject, in file order
    assert items[0][0].startswith("The following are multiple choice questions (with answers) "
                                  "about anatomy.\n\nWhich is number 0?\nA. one 0\nB. two 0\n")
    assert items[0][0].endswith("D. four 0\nAnswer:")
    (tmp_path / "test" / "virology_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d,E\n")
    with pytest.raises(UserError, match="virology_test.csv:2: need question,A,B,C,D,answer"):
        load_mmlu(tmp_path, None)


def test_the_hub_exports_header_and_index_answers_read_as_the_letters_do(tmp_path):
    letters = load_mmlu(write_mmlu(tmp_path / "letters", "ABCDAB"), None)
    hub = tmp_path / "hub" / "test"
    hub.mkdir(parents=True)
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    (hub / "anatomy_test.csv").write_text(header + "".join(f"{q},{a}\n" for q, a in
                                                          zip(QUESTIONS[:3], "012")))
    (hub / "virology_test.csv").write_text(header + "".join(f"{q},{a}\n" for q, a in
                                                           zip(QUESTIONS[3:], "301")))
    assert load_mmlu(hub.parent, None) == letters
    (hub / "virology_test.csv").write_text(header + f"{QUESTIONS[3]},A\n")
    with pytest.raises(UserError, match="virology_test.csv:2: .*one of 0123"):
        load_mmlu(hub.parent, None)


def test_choices_are_the_likeliest_letter_whatever_the_batch(tiny):
    model, tok = tiny
    prompts = [tok.encode(q) for q in QUESTIONS]
    alone = [choices(model, tok, [p])[0] for p in prompts]
    assert choices(model, tok, prompts, batch_size=4) == alone
    letters = [tok.encode(v, bos=False)[-1] for k in "ABCD" for v in (k, " " + k)]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]]))[0, -1, letters].view(4, 2).amax(-1)
    assert alone[0] == int(logits.argmax())


def test_see_ae_is_each_experts_accuracy_with_pos_forced_averaged(see_run, tmp_path):
    # answers set to what the base model picks: the base model scores 100
    probe = score_run(see_run, load_mmlu(write_mmlu(tmp_path, "AAAAAA"), None), None, 4, "cpu",
                      torch.float32)
    assert set(probe["experts"]) == {"sa", "pe"} and probe["n"] == 6
    assert probe["ae"] == pytest.approx(sum(probe["experts"].values()) / 2)
    assert sum(probe["routes"].values()) == 6
    from experts import base_model, load_system, prompt_ids, resolve_template
    model, tok, experts, ind, _ = load_system(None, [str(see_run / "1-sa/expert")], "cpu",
                                              torch.float32)
    items = load_mmlu(tmp_path, None)
    prompts = [prompt_ids(tok, q, 64, resolve_template(tok, experts[0].template))
               for q, _ in items]
    with base_model(model):
        base = choices(model, tok, prompts)
    write_mmlu(tmp_path, "".join("ABCD"[b] for b in base))
    scored = score_run(see_run, load_mmlu(tmp_path, None), None, 4, "cpu", torch.float32)
    assert scored["base"] == 100.0
    experts[0].use(model)
    forced = choices(model, tok, [p + ind.pos for p in prompts])
    assert scored["experts"]["sa"] == accuracy(forced, base)


def test_the_command_writes_the_base_models_result_and_refuses_a_missing_directory(
        tiny_dir, tmp_path, monkeypatch, capsys):
    import json
    import sys
    import general
    mmlu = write_mmlu(tmp_path / "mmlu", "ABCDAB")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["general.py", "--mmlu", str(mmlu), "--model", str(tiny_dir),
                                      "--per-subject", "2", "--dtype", "float32"])
    general.main()
    result = json.loads((tmp_path / "runs" / f"base-{tiny_dir.name}" / "mmlu.json").read_text())
    assert result["n"] == 4 and result["per_subject"] == 2 and "ae" not in result
    assert f"base {tiny_dir}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["general.py", "--mmlu", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as stop:
        general.main()
    assert stop.value.code == 2
    assert "no MMLU test/<subject>_test.csv files" in capsys.readouterr().err
