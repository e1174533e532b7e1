"""Damaged or missing run and checkpoint files, and impossible settings: one `error:` line (exit 2),
no traceback, nothing written. The commands run in-process through their real entry points (main()
with sys.argv set), which is what `python train.py ...` runs, without a process start per case."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import train as train_mod
from artifacts import digest, seal
from checkpoint import atomic_dir, atomic_write, load_dir
from errors import UserError
from experts import load_expert

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAINING = ["--max-train", "8", "--epochs", "1", "--batch-size", "8", "--micro-batch", "8",
                 "--max-source", "48", "--max-target", "6", "--tau", "0.5",
                 "--dtype", "float32"]  # as in-process runs resolve it (conftest), on every CPU
EVAL = ["--max-eval", "2", "--max-new-tokens", "2", "--max-ood", "2"]
# what reads a file of a finished run; every other file (system.json, the
# experts) is read by evaluate.py --run
READERS = {"eval.json": "report", "eval.predictions.jsonl": "report", "config.json": "train",
           "log.jsonl": "train",
           # MoSEs: read by a next stage, not by inference
           "training-state.safetensors": "continue"}


def cli(main, args, capsys, monkeypatch) -> tuple[int, list[str]]:
    """Run a command's main() as `python <command> args` would: its exit status and its
    stderr lines."""
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def one_error_line(code, err, *names):
    """Exit 2 and exactly one line, `error: ...`, naming each of `names`; else what went wrong."""
    if (code == 2 and len(err) == 1 and err[0].startswith("error: ")
            and all(n in err[0] for n in names)):
        return None
    return f"exit {code}: " + " | ".join(err[-3:])


@pytest.fixture(scope="module")
def finished_runs(tiny_dir, tmp_path_factory):
    """A SEE and a MoSEs sequence (sa, pe) on the tiny model, trained and evaluated by the CLI; with
    the train.py arguments that resume each."""
    root = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    runs = {}
    for method in ("see", "moses"):
        args = ["--sequence", "sa,pe", "--method", method, "--model", tiny_dir, *TINY_TRAINING,
                "--out", root / method]
        for main, argv in ((train_mod.main, args),
                           (evaluate.main, ["--run", root / method, *EVAL])):
            mp.setattr(sys, "argv", ["prog", *map(str, argv)])
            main()
        runs[method] = (root / method, args)
    mp.undo()
    return runs


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "flip":  # one bit of the last tensor's data: the file still reads
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:  # garbage of the same length
        path.write_bytes(os.urandom(max(len(data), 16)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["see", "moses"])
def test_every_damaged_file_of_a_finished_run_is_one_line_of_error(finished_runs, method, tmp_path,
                                                                   capsys, monkeypatch):
    run, train_args = finished_runs[method]
    cases, failures = [], []
    # damaged in place, and restored: a moved run is one of other settings
    for path in sorted(files(run)):
        rel, original = path.relative_to(run), path.read_bytes()
        reader = READERS.get(rel.name, "evaluate")
        for how in ("delete", "truncate", "garbage", "flip")[:3 + (path.suffix == ".safetensors")]:
            out = tmp_path / f"result-{len(cases)}"
            if reader == "evaluate":
                command = (evaluate.main, ["--run", run, *EVAL, "--out", out / "eval.json"])
            elif reader == "report":
                command = (evaluate.main, ["--report", run, "--out", out / "report.md"])
            elif reader == "continue":  # a new task learned from this stage
                command = (train_mod.main,
                           ["--task", "qa", "--init", path.parent, *train_args[2:-2],
                                            "--out", out / "next"])
            else:
                command = (train_mod.main, train_args)
            corrupt(path, how)
            before = files(run) | files(tmp_path)
            try:
                code, err = cli(*command, capsys, monkeypatch)
            finally:
                path.write_bytes(original)
            problem = one_error_line(code, err, rel.name)
            written = (files(run) | files(tmp_path)) - before - {path}
            if problem is None and written:
                problem = f"wrote {sorted(map(str, written))}"
            cases.append(f"{method} {rel} {how} ({reader}): {problem or err[0]}")
            if problem:
                failures.append(cases[-1])
    print("\n".join(cases))
    assert len(cases) >= 3 * 10 and not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def cut_template(tiny_dir, tmp_path_factory):
    """A one-stage run interrupted one step past its checkpoint at step 2 (log.jsonl holds steps
    1-3, state.pt step 2), and the train.py arguments that resume it but for the run directory."""
    run = tmp_path_factory.mktemp("cut") / "run"
    args = ["--task", "sa", "--previous", "pe", "--model", tiny_dir, *TINY_TRAINING, "--batch-size",
            "2",
            "--micro-batch", "2", "--save-every", "2", "--out"]  # 6 steps
    real_scale = train_mod.lr_scale

    def crash_at_step_4(step, total):
        if step == 3:  # 3 steps done
            raise KeyboardInterrupt
        return real_scale(step, total)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "lr_scale", crash_at_step_4)
        mp.setattr(sys, "argv", ["prog", *map(str, [*args, run])])
        with pytest.raises(SystemExit):
            train_mod.main()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "log.jsonl", "state.pt"]
    return args, run


@pytest.fixture()
def cut_run(cut_template, tmp_path):
    """A copy of the interrupted run to damage, and the train.py arguments that resume it."""
    args, run = cut_template
    copy = shutil.copytree(run, tmp_path / "cut")
    return [*args, copy], copy


def test_every_damaged_file_of_an_unfinished_run_is_one_line_of_error(cut_run, tmp_path, capsys,
                                                                      monkeypatch):
    args, run = cut_run
    cases, failures = [], []
    for path in sorted(files(run)):
        for how in ("delete", "truncate", "garbage", "flip")[:3 + (path.suffix == ".safetensors")]:
            copy = tmp_path / f"copy-{len(cases)}"
            shutil.copytree(run, copy)
            corrupt(copy / path.name, how)
            before = files(tmp_path)
            code, err = cli(train_mod.main, [*args[:-1], copy], capsys, monkeypatch)
            # a missing checkpoint is a run killed before its first one: it
            # starts over, as it should
            expected_restart = (path.name, how) == ("state.pt", "delete")
            problem = one_error_line(code, err, path.name)
            if expected_restart:
                problem = None if code == 0 else f"exit {code}"
            if problem is None and not expected_restart and files(tmp_path) - before:
                problem = f"wrote {sorted(map(str, files(tmp_path) - before))}"
            cases.append(f"unfinished {path.name} {how} (train): "
                         f"{problem or ('started over' if expected_restart else err[0])}")
            if problem:
                failures.append(cases[-1])
    print("\n".join(cases))
    assert len(cases) == 9 and not failures, "\n".join(failures)


def test_a_torn_last_log_line_is_dropped_on_resume(cut_run, capsys, monkeypatch):
    args, run = cut_run
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 4, "epo')  # the crash came mid-write
    code, err = cli(train_mod.main, args, capsys, monkeypatch)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3


def test_a_log_that_ends_before_the_checkpoint_is_refused(cut_run, capsys, monkeypatch):
    args, run = cut_run
    (run / "log.jsonl").write_text((run / "log.jsonl").read_text().splitlines()[0] + "\n")
    code, err = cli(train_mod.main, args, capsys, monkeypatch)
    assert one_error_line(code, err, "log.jsonl",
                          "ends at step 1, before the checkpoint's step 2") is None, err


class Pickled:  # what a hostile state.pt could carry instead of tensors
    pass


@pytest.mark.parametrize("damage", ["pickle", "truncate", "empty"])
def test_a_pickled_or_truncated_checkpoint_is_refused(cut_run, capsys, monkeypatch, damage):
    args, run = cut_run
    if damage == "pickle":
        torch.save({"step": 2, "x": Pickled()}, run / "state.pt")
    else:
        (run / "state.pt").write_bytes(
            (run / "state.pt").read_bytes()[:1000 if damage == "truncate" else 0])
    before = files(run)
    code, err = cli(train_mod.main, args, capsys, monkeypatch)
    assert one_error_line(code, err, "state.pt", "not a checkpoint of train.py") is None, err
    assert files(run) == before


def test_a_checkpoint_of_other_parameters_is_refused(cut_run, capsys, monkeypatch):
    args, run = cut_run
    state = torch.load(run / "state.pt", weights_only=True)
    state["params"] = {"x": torch.zeros(1)}  # a whole checkpoint, of another run
    state["sha256"] = digest({k: v for k, v in state.items() if k != "sha256"})
    torch.save(state, run / "state.pt")
    code, err = cli(train_mod.main, args, capsys, monkeypatch)
    assert one_error_line(code, err, "state.pt", "do not fit this run") is None, err


def test_a_checkpoint_whose_tensor_data_changed_is_refused(cut_run, capsys, monkeypatch):
    args, run = cut_run
    state = torch.load(run / "state.pt", weights_only=True)
    next(iter(state["params"].values())).view(-1)[0] += 1  # the zip still reads, a weight differs
    torch.save(state, run / "state.pt")
    code, err = cli(train_mod.main, args, capsys, monkeypatch)
    assert one_error_line(code, err, "state.pt", "sha256", "damaged") is None, err


def test_leftovers_of_a_killed_write_go_when_the_run_resumes(cut_run, capsys, monkeypatch):
    args, run = cut_run
    (run / ".expert.k3j2x9").mkdir()  # killed during the final save
    (run / ".expert.k3j2x9" / "expert.json").write_text("{")
    (run / ".state.pt.tmp").write_bytes(b"torn")  # killed during a checkpoint
    code, err = cli(train_mod.main, args, capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "expert", "log.jsonl"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    def full_disk(path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    (tmp_path / "state.pt").write_bytes(b"old")
    with pytest.raises(UserError, match="could not write .*state.pt: No space left on device"):
        atomic_write(tmp_path / "state.pt", full_disk)
    with pytest.raises(UserError, match="could not write .*expert: No space left on device"):
        with atomic_dir(tmp_path / "expert") as tmp:
            full_disk(tmp / "adapter_model.safetensors")

    def torch_full_disk(path):  # torch.save reports a failed write so
        path.write_bytes(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(UserError,
                       match="could not write .*state.pt: PytorchStreamWriter failed writing"):
        atomic_write(tmp_path / "state.pt", torch_full_disk)
    assert (sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
            and (tmp_path / "state.pt").read_bytes() == b"old")


def sequence_args(tiny_dir, out, *extra):
    return ["--model", tiny_dir, *TINY_TRAINING, "--out", out, *extra]


@pytest.mark.parametrize("args,message", [
    (["--task", "sa", "--lr", "-1"], "need learning rates > 0, weights >= 0 and nothing beyond "
                                     "float32's 3.4e+38, got --lr -1.0"),
    (["--task", "sa", "--lr", "nan"], "got --lr nan"),
    (["--task", "sa", "--lr", "inf"], "got --lr inf"),
    (["--task", "sa", "--lr", "1e300"], "got --lr 1e+300"),
    (["--task", "sa", "--alpha", "1e300"], "got --alpha 1e+300"),
    (["--task", "sa", "--method", "moses", "--pull-weight", "1e300"], "got --pull-weight 1e+300"),
    (["--task", "sa", "--seed", str(2 ** 63)],
     "a --seed in [0, 2^63), got --seed 9223372036854775808"),
    (["--task", "sa", "--indicator-lr", "-5"], "got --indicator-lr -5.0"),
    (["--task", "sa", "--alpha", "-16"], "need LoRA alpha > 0, got -16.0"),
    (["--task", "sa", "--max-train", "0"], "need positive counts, --general-negatives >= 0 and a "
                                           "--seed in [0, 2^63), got --max-train 0"),
    (["--task", "sa", "--max-source", "0"], "got --max-source 0"),
    (["--task", "sa", "--tau", "1.5"], "--tau must be in [0, 1], got 1.5"),
    (["--sequence", "sa,foo"], "unknown task 'foo'"),  # a later task: nothing written either
    (["--sequence", "sa, pe"], "unknown task ' pe'"),
    (["--sequence", "SA"], "unknown task 'SA'"),
    (["--sequence", "sa,pe", "--task", "qa"], "--task and --previous are for one stage"),
    (["--order", "1", "--previous", "qa"], "--task and --previous are for one stage"),
])
def test_impossible_settings_are_refused_before_the_model_loads(tiny_dir, tmp_path, capsys,
                                                                monkeypatch, args, message):
    monkeypatch.setattr(train_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = cli(train_mod.main, sequence_args(tiny_dir, tmp_path / "r", *args), capsys,
                    monkeypatch)
    assert one_error_line(code, err, message) is None, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--sequence", ","], ["--sequence", "sa,,pe"],
                                  ["--task", ""], ["--task", "sa", "--previous", "pe,"]])
def test_an_empty_task_name_is_refused(tiny_dir, tmp_path, capsys, monkeypatch, args):
    monkeypatch.setattr(train_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = cli(train_mod.main, sequence_args(tiny_dir, tmp_path / "r", *args), capsys,
                    monkeypatch)
    assert code == 2 and ("holds an empty name" in err[-1] or "unknown task ''" in err[-1]), err
    assert list(tmp_path.iterdir()) == []


def write_task_file(path: Path, n: int) -> Path:
    instances = [dict(id=f"i{i}", input=f"sentence {i}", output=["yes"]) for i in range(n)]
    path.write_text(json.dumps(dict(Definition=["Say yes."], Instances=instances)))
    return path


@pytest.mark.parametrize("data",
                         ["empty train file", "task file of 100 instances", "non-UTF-8 task file"])
def test_a_task_without_training_examples_or_unreadable_is_refused(tiny_dir, tmp_path, capsys,
                                                                   monkeypatch, data):
    monkeypatch.setattr(train_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "data").mkdir()
    if data == "empty train file":
        (tmp_path / "data" / "sa.train.jsonl").write_text("")
        args, message = ["--task", "sa", "--data-dir",
                         tmp_path / "data"], "task sa has no training examples"
    elif data == "task file of 100 instances":  # all of them are the eval split
        task = write_task_file(tmp_path / "data" / "yes.json", 100)
        args, message = ["--task", task], f"task {task} has no training examples"
    else:
        (tmp_path / "data" / "sa.train.jsonl").write_bytes(b'{"full_prompt": "caf\xe9", "output": '
                                                           b'"x"}\n')
        args, message = ["--task", "sa", "--data-dir",
                         tmp_path / "data"], "sa.train.jsonl: not UTF-8 text (byte 20)"
    code, err = cli(train_mod.main, sequence_args(tiny_dir, tmp_path / "r", *args), capsys,
                    monkeypatch)
    assert one_error_line(code, err, message) is None, err
    assert not (tmp_path / "r").exists()


def test_an_unwritable_out_is_refused_before_the_model_loads(tiny_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(train_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    # a directory cannot be made inside a file (a read-only disk as root)
    (tmp_path / "file").write_text("")
    code, err = cli(train_mod.main,
                    sequence_args(tiny_dir, tmp_path / "file" / "run", "--task", "sa"), capsys,
                    monkeypatch)
    assert one_error_line(code, err, f"cannot write {tmp_path / 'file' / 'run'}",
                          "is not a directory") is None, err


def evaluate_args(tiny_dir, out, *extra):
    return ["--task", "sa", "--model", tiny_dir, "--max-eval", "2", "--max-new-tokens", "2",
            "--out", out, *extra]


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--max-source"])
def test_zero_lengths_at_evaluation_are_refused(tiny_dir, tmp_path, capsys, monkeypatch, flag):
    code, err = cli(evaluate.main, evaluate_args(tiny_dir, tmp_path / "eval-sa.json", flag, "0"),
                    capsys, monkeypatch)
    assert one_error_line(code, err, f"{flag} 0") is None, err
    assert list(tmp_path.iterdir()) == []


def test_a_result_of_other_settings_is_not_overwritten(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval-sa.json"
    code, err = cli(evaluate.main, evaluate_args(tiny_dir, out), capsys, monkeypatch)
    assert code == 0, err
    written = out.read_text()
    monkeypatch.setattr(evaluate, "evaluate_task", lambda *a,
                        **k: pytest.fail("generation started"))
    code, err = cli(evaluate.main, evaluate_args(tiny_dir, out, "--max-new-tokens", "3"), capsys,
                    monkeypatch)
    assert one_error_line(code, err,
                          "holds results of other settings (max_new_tokens: 2 -> 3)") is None, err
    assert out.read_text() == written


def test_a_result_measured_in_another_dtype_is_not_overwritten(tiny_dir, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "eval-sa.json"
    code, err = cli(evaluate.main, evaluate_args(tiny_dir, out), capsys, monkeypatch)
    assert code == 0, err
    monkeypatch.setattr(evaluate, "evaluate_task",
                        lambda *a, **k: pytest.fail("generation started"))
    code, err = cli(evaluate.main, evaluate_args(tiny_dir, out, "--dtype", "bfloat16"), capsys,
                    monkeypatch)
    assert one_error_line(code, err, "(dtype: float32 -> bfloat16)") is None, err


def test_no_run_file_is_taken_for_a_result_or_a_run_directory(finished_runs, tmp_path, capsys,
                                                              monkeypatch):
    run, train_args = finished_runs["see"]
    system = (run / "system.json").read_text()
    code, err = cli(evaluate.main, ["--run", run, *EVAL, "--out", run / "system.json"], capsys,
                    monkeypatch)
    assert one_error_line(code, err, "system.json is not a result of evaluate.py") is None, err
    assert (run / "system.json").read_text() == system
    for out in (run, run / "1-sa" / "expert" / "inner"):  # a sequence's root, inside an expert
        code, err = cli(train_mod.main, [*train_args[2:-2], "--task", "qa", "--out", out], capsys,
                        monkeypatch)
        assert one_error_line(code, err, "a sequence's directory or inside an expert") is None, err
    assert not (run / "1-sa" / "expert" / "inner").exists()


@pytest.mark.slow
def test_max_eval_caps_the_out_of_distribution_sets_too(finished_runs, tmp_path, capsys,
                                                        monkeypatch):
    out = tmp_path / "eval.json"
    code, err = cli(evaluate.main, ["--run", finished_runs["see"][0], "--max-eval", "2",
                                    "--max-new-tokens", "2", "--out", out], capsys, monkeypatch)
    result = json.loads(out.read_text())
    assert code == 0 and result["max_ood"] == 2 and result["n_ood"]["lima"] == 2, err


def test_an_unwritable_result_is_refused_before_generation(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_task", lambda *a,
                        **k: pytest.fail("generation started"))
    (tmp_path / "file").write_text("")
    code, err = cli(evaluate.main, evaluate_args(tiny_dir, tmp_path / "file" / "eval-sa.json"),
                    capsys, monkeypatch)
    assert one_error_line(code, err, "is not a directory") is None, err


def rewrite_json(path: Path, **changes) -> None:
    """Change fields of a JSON file of ours, sealed again as a hand-made file would be."""
    record = {**json.loads(path.read_text()), **changes}
    record.pop("sha256", None)
    path.write_text(json.dumps(seal(record)))


def reseal(expert: Path) -> None:
    """Record an edited expert's files in its expert.json, as a hand-made expert would be."""
    rewrite_json(expert / "expert.json", files={f.name: digest(f) for f in expert.iterdir()
                                                if f.name != "expert.json"})


@pytest.mark.parametrize("change,message", [
    (dict(experts=[]), "'experts' must list 2 expert directories, got []"),
    (dict(experts=["1-sa/expert", "../../elsewhere/expert"]),
     "'../../elsewhere/expert' points outside"),
    (dict(settings={"tau": "ten"}), "field 'tau' is 'ten', expected a finite number"),
    (dict(tasks="sa,pe"), "field 'tasks' is 'sa,pe', expected list"),
])
def test_a_hostile_system_json_is_refused(finished_runs, tmp_path, capsys, monkeypatch, change,
                                          message):
    run = shutil.copytree(finished_runs["see"][0], tmp_path / "run")
    if "settings" in change:  # one setting changed, the others kept
        settings = json.loads((run / "system.json").read_text())["settings"]
        change = dict(settings={**settings, **change["settings"]})
    rewrite_json(run / "system.json", **change)
    code, err = cli(evaluate.main, ["--run", run, *EVAL, "--out", tmp_path / "out.json"], capsys,
                    monkeypatch)
    assert one_error_line(code, err, "system.json", message) is None, err


def test_an_adapter_config_with_a_string_for_a_number_is_refused(finished_runs, tmp_path, capsys,
                                                                 monkeypatch):
    run = shutil.copytree(finished_runs["see"][0], tmp_path / "run")
    rewrite_json(run / "1-sa" / "expert" / "adapter_config.json", lora_alpha="16")
    reseal(run / "1-sa" / "expert")
    code, err = cli(evaluate.main, ["--run", run, *EVAL, "--out", tmp_path / "out.json"], capsys,
                    monkeypatch)
    assert one_error_line(code, err, "adapter_config.json",
                          "field 'alpha' is '16', expected a finite number") is None, err


def test_an_edited_adapter_config_is_refused_as_not_the_file_written(finished_runs, tmp_path,
                                                                    capsys, monkeypatch):
    run = shutil.copytree(finished_runs["see"][0], tmp_path / "run")
    rewrite_json(run / "1-sa" / "expert" / "adapter_config.json", r=10 ** 12)
    code, err = cli(evaluate.main, ["--run", run, *EVAL, "--out", tmp_path / "out.json"], capsys,
                    monkeypatch)
    assert one_error_line(code, err, "adapter_config.json", "not the file written") is None, err
    reseal(run / "1-sa" / "expert")  # a hand-made expert that claims another rank than its weights
    code, err = cli(evaluate.main, ["--run", run, *EVAL, "--out", tmp_path / "out.json"], capsys,
                    monkeypatch)
    assert one_error_line(code, err, "adapter_config.json", "r 1000000000000") is None, err


def test_indicator_rows_of_the_wrong_shape_are_refused(finished_runs, tmp_path, capsys,
                                                       monkeypatch):
    run = shutil.copytree(finished_runs["see"][0], tmp_path / "run")
    rows = run / "2-pe" / "expert" / "indicators.safetensors"
    save_file({k: torch.zeros(3, 5) for k in load_file(rows)}, rows)
    reseal(rows.parent)
    code, err = cli(evaluate.main, ["--run", run, *EVAL, "--out", tmp_path / "out.json"], capsys,
                    monkeypatch)
    assert one_error_line(code, err, "indicators.safetensors", "(3, 5)") is None, err


def test_an_expert_without_its_indicator_rows_is_refused(finished_runs, capsys, monkeypatch,
                                                         tmp_path):
    run = shutil.copytree(finished_runs["see"][0], tmp_path / "run")
    (run / "1-sa" / "expert" / "indicators.safetensors").unlink()
    with pytest.raises(UserError, match="indicators.safetensors: not the file written"):
        load_expert(run / "1-sa" / "expert")


# --- model checkpoint files


def damaged_checkpoint(tiny_dir, tmp_path, name, content) -> Path:
    ckpt = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    if callable(content):
        content(ckpt / name)
    else:
        (ckpt / name).write_bytes(content)
    return ckpt


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def shard_index(weight_map):
    return lambda path: path.with_name("model.safetensors.index.json").write_text(
        json.dumps(dict(weight_map=weight_map)))


@pytest.mark.parametrize("name,content,message", [
    ("model.safetensors", halve, "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", b"\xff" * 64, "model.safetensors: not a readable safetensors file"),
    ("config.json", b'{"model_type": "llama", "hidden_size": ', "config.json: malformed JSON"),
    ("config.json", lambda p: rewrite_json(p, hidden_size="64"),
     "config.json: field 'hidden_size' is '64', expected int"),
    ("config.json", lambda p: rewrite_json(p, rms_norm_eps=None, rope_theta="1e4"),
     "field 'rope_theta' is '1e4'"),
    ("config.json", lambda p: rewrite_json(p, num_hidden_layers=0),
     "config.json: sizes must be positive"),
    ("tokenizer.model", halve, "tokenizer.model: not a sentencepiece model"),
    ("tokenizer_config.json", b"\xff\xfe", "tokenizer_config.json: not UTF-8 text"),
    ("x", shard_index(["model.safetensors"]), "need a 'weight_map' of tensor names to file names"),
    ("x", shard_index({"lm_head.weight": "../../outside.safetensors"}),
     "'../../outside.safetensors' points outside"),
])
def test_a_damaged_checkpoint_is_one_clear_error(tiny_dir, tmp_path, name, content, message):
    ckpt = damaged_checkpoint(tiny_dir, tmp_path, name, content)
    with pytest.raises(UserError,
                       match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_dir(ckpt)


@pytest.mark.parametrize("template,message", [
    ("{% for m in messages %}{{ m.content }", "chat template: TemplateSyntaxError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template: SecurityError"),
])
def test_a_broken_or_hostile_chat_template_is_one_clear_error(tiny_dir, tmp_path, template,
                                                              message):
    ckpt = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    (ckpt / "chat_template.jinja").write_text(template)
    _, tok = load_dir(ckpt)
    with pytest.raises(UserError, match=message):
        tok.chat("hello")


# --- SIGKILL


def train_cli(tiny_dir, out):
    args = ["--task", "sa", "--previous", "pe", "--model", tiny_dir, "--max-train", "16",
            "--epochs", "3",
            "--batch-size", "2", "--micro-batch", "2", "--max-source", "48", "--max-target", "6",
            "--tau", "0.5", "--save-every", "1", "--dtype", "float32", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def expert_tensors(run):
    return {**load_file(run / "expert" / "adapter_model.safetensors"),
            **load_file(run / "expert" / "indicators.safetensors")}


@pytest.mark.slow
def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_expert(tiny_dir,
                                                                                     tmp_path):
    assert train_cli(tiny_dir, tmp_path / "whole").wait() == 0
    killed = train_cli(tiny_dir, tmp_path / "killed")
    while not (tmp_path / "killed" / "state.pt").exists() and killed.poll() is None:
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert ((tmp_path / "killed" / "state.pt").exists()
            and not (tmp_path / "killed" / "expert").exists())
    assert train_cli(tiny_dir, tmp_path / "killed").wait() == 0
    a, b = expert_tensors(tmp_path / "whole"), expert_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / r / "log.jsonl").read_text() for r in ("whole", "killed")]
    assert [json.loads(x)["loss"]
            for x in logs[0].splitlines()] == [json.loads(x)["loss"] for x in logs[1].splitlines()]


def test_a_full_disk_anywhere_is_one_line_of_error(capsys):
    import errno
    from errors import user_errors
    with pytest.raises(SystemExit) as stop, user_errors():
        raise OSError(errno.ENOSPC, "No space left on device", "runs/r/log.jsonl")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: runs/r/log.jsonl: No space left on device\n"
    with pytest.raises(FileNotFoundError), user_errors():  # not the machine's refusal: a bug
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")


def test_an_expert_json_edited_since_it_was_written_is_refused(tiny_dir, tmp_path):
    from experts import load_expert
    from train import TrainConfig, train
    expert = train(TrainConfig(task="sa", model=str(tiny_dir), out=str(tmp_path / "one"), max_train=8, epochs=1, batch_size=8,
                               micro_batch=8, max_source=48, max_target=6)) / "expert"
    meta = expert / "expert.json"
    meta.write_text(meta.read_text().replace('"max_source": 48', '"max_source": 58'))
    with pytest.raises(UserError, match=r"expert.json: not the file written .* damaged or edited"):
        load_expert(expert)
