"""train.py: an expert learns to claim its task, only adapter and indicator rows
learn, runs resume or refuse."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import lora
import runs
import train as train_mod
from checkpoint import load_dir
from checkpoint import native_bf16 as detect_native_bf16  # bound before conftest pins it
from data import load_ood, load_task
from errors import UserError
from experts import load_expert, prompt_ids, reconstruct, setup_indicators
from router import generate_batched
from runs import check_config
from train import TrainConfig, train, train_sequence, trainable_parameters
from rehearsal import training_data

ROOT = Path(__file__).resolve().parent.parent


def first_tokens(run_dir, tiny_dir, task, max_source):
    model, tok = load_dir(tiny_dir)
    ind = setup_indicators(model, tok)
    expert = load_expert(run_dir / "expert")
    expert.attach(model)
    expert.use(model)
    queries = [prompt_ids(tok, ex.query, max_source) for ex in load_task(task, "eval")[:20]]
    return [out[:1] for out in generate_batched(model, queries, 1, tok.eos_ids)], ind


def test_an_expert_claims_its_own_task_and_refuses_the_other(separable_run, tiny_dir):
    cfg, run_dir = separable_run
    own, ind = first_tokens(run_dir, tiny_dir, "sa", cfg.max_source)
    other, _ = first_tokens(run_dir, tiny_dir, "pe", cfg.max_source)
    assert own.count(ind.pos) == 20, "<<pos>> on held-out queries of its own task"
    assert other.count(ind.neg) == 20, "<<neg>> on held-out queries of the rehearsed task"


def test_the_run_directory_holds_config_log_and_expert(separable_run):
    cfg, run_dir = separable_run
    assert json.loads((run_dir / "config.json").read_text())["tau"] == 1.0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17)), "64 samples / batch 16 x 4 epochs"
    assert log[-1]["loss"] < log[0]["loss"]
    assert (log[0]["lr"] == cfg.lr
            and log[-1]["lr"] < cfg.lr / 10), "cosine decay from lr, no warm-up"
    assert not (run_dir / "state.pt").exists(), "the resume state goes once the expert is written"


def test_only_the_adapter_and_indicator_rows_are_trainable(tiny):
    model, tok = tiny
    setup_indicators(model, tok)
    lora.add_adapter(model, "a", lora.LoraConfig(r=2))
    lora.set_adapter(model, "a")
    trainable = trainable_parameters(model, "a", indicator_rows=True)
    adapter = {id(p) for p in lora.lora_parameters(model, "a")}
    assert ({id(p) for p in trainable.values()}
            == adapter | {id(model.extra_embed), id(model.extra_head)})
    assert all(p.requires_grad == (id(p) in {id(q) for q in trainable.values()})
               for p in model.parameters())
    model(torch.tensor([[1, 5, 7]])).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def small(tiny_dir, out, **kw):
    """A tiny run in fp32 (unless kw says otherwise): the tests that compare two runs check exact
    arithmetic identities, which bf16's rounding would blur."""
    return TrainConfig(task="sa", previous=["pe"], model=str(tiny_dir), out=str(out), tau=0.5,
                       max_train=16, epochs=2,
                       batch_size=8, micro_batch=4, lr=1e-3, max_source=64, max_target=8,
                       save_every=2, **{"dtype": "float32", **kw})


def expert_tensors(run_dir):
    return {**load_file(run_dir / "expert" / "adapter_model.safetensors"),
            **load_file(run_dir / "expert" / "indicators.safetensors")}


def test_an_interrupted_run_resumes_to_the_same_expert(tiny_dir, tmp_path, monkeypatch, device):
    whole = train(small(tiny_dir, tmp_path / "whole"))

    def crash_after_step_5(step, total):
        if step == 5:  # one step past the checkpoint at step 4, already logged
            raise KeyboardInterrupt
        return real_scale(step, total)
    real_scale = train_mod.lr_scale
    monkeypatch.setattr(train_mod, "lr_scale", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(small(tiny_dir, tmp_path / "cut"))
    assert (tmp_path / "cut" / "state.pt").exists() and not (tmp_path / "cut" / "expert").exists()
    monkeypatch.setattr(train_mod, "lr_scale", real_scale)
    resumed = train(small(tiny_dir, tmp_path / "cut"))
    a, b = expert_tensors(whole), expert_tensors(resumed)
    # bit for bit on the CPU; CUDA's embedding backward adds its rows'
    # gradients atomically, in no fixed order
    same = torch.equal if device == "cpu" else lambda x, y: torch.allclose(x, y, rtol=0, atol=1e-6)
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    logged = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7)), "steps redone after the checkpoint are logged once"


def test_a_finished_run_or_other_settings_are_refused(tiny_dir, tmp_path):
    train(small(tiny_dir, tmp_path / "r"))
    with pytest.raises(UserError, match="already holds a trained expert"):
        train(small(tiny_dir, tmp_path / "r"))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "r" / "config.json").read_text()), "tau": 0.2}))
    with pytest.raises(UserError, match=r"other settings \(tau: 0.2 -> 0.5\)"):
        train(small(tiny_dir, tmp_path / "s"))


def test_a_second_training_of_one_run_or_sequence_at_once_is_refused(tiny_dir, tmp_path):
    # the lock another process would hold (flock conflicts across open files, even in one process)
    with checkpoint.exclusive(tmp_path / "r" / "config.json"):
        with pytest.raises(UserError, match="another process is writing in .*r; let it finish"):
            train(small(tiny_dir, tmp_path / "r"))
        assert not (tmp_path / "r" / "config.json").exists()
    cfg = replace(small(tiny_dir, tmp_path / "seq"), previous=[])
    with checkpoint.exclusive(tmp_path / "seq" / "system.json"):
        with pytest.raises(UserError, match="another process is writing in .*seq; let it finish"):
            train_sequence(cfg, ["sa", "pe"])
        assert [p.name for p in (tmp_path / "seq").iterdir()] == []


def test_bfloat16_autocast_keeps_the_trained_weights_in_float32(tiny_dir, tmp_path, device):
    run = train(replace(small(tiny_dir, tmp_path / "bf16", dtype="bfloat16"), epochs=1))
    assert all(t.dtype == torch.float32 for t in expert_tensors(run).values())
    assert any(t.abs().sum() > 0 for k,
               t in expert_tensors(run).items() if "lora_B" in k), "B moved off zero"


def test_one_bfloat16_autocast_step_follows_the_float32_step(tiny_dir, tmp_path, device):
    # one optimizer step (8 positives + 4 negatives in one batch): the same loss, and
    # Adam moves the adapter's B (from zero) and the indicator rows the same way, up to
    # bf16's rounding of the gradients
    runs = {d: train(replace(small(tiny_dir, tmp_path / d, dtype=d, dropout=0.0), epochs=1,
                             max_train=8, batch_size=12))
            for d in ("float32", "bfloat16")}
    model, tok = load_dir(tiny_dir)
    setup_indicators(model, tok)
    losses = {d: json.loads((run / "log.jsonl").read_text())["loss"] for d, run in runs.items()}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-3)
    moved = {d: torch.cat([t.flatten() for k, t in expert_tensors(run).items() if "lora_B" in k]
                          + [(load_file(run / "expert" / "indicators.safetensors")["embed"]
                              - model.extra_embed).flatten()])
             for d, run in runs.items()}
    cosine = torch.nn.functional.cosine_similarity(moved["float32"], moved["bfloat16"],
                                                   dim=0).item()
    assert cosine > 0.9, f"cosine of the two updates {cosine:.3f}"


def test_native_bf16_is_read_from_the_cpus_capabilities(monkeypatch):
    for flags, expected in (({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                            ({"bf16": True}, True), ({"avx2": True, "avx512_bf16": False}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
        assert detect_native_bf16() == expected, flags


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_the_default_dtype_follows_the_cpu_and_config_records_it(tiny_dir, tmp_path, monkeypatch,
                                                                 device, native):
    from checkpoint import resolve_dtype
    monkeypatch.setattr(checkpoint, "native_bf16", lambda: native)
    expected = "bfloat16" if native or device == "cuda" else "float32"
    assert resolve_dtype(None, device) == getattr(torch, expected)
    assert resolve_dtype("float32", device) == torch.float32, "a dtype given is kept"
    run = train(replace(small(tiny_dir, tmp_path / "r", dtype=None), epochs=1))
    assert (json.loads((run / "config.json").read_text())["dtype"]
            == expected), "the dtype the run computed in"


def test_activation_checkpointing_gives_the_plain_paths_gradients(tiny_dir, device):
    from experts import reconstruct
    examples = load_task("sa", "train")[:4] + load_task("pe", "train")[:2]
    grads, kept = [], []
    for checkpointed in (False, True):
        model, tok = load_dir(tiny_dir, device=device)
        ind = setup_indicators(model, tok)
        torch.manual_seed(0)  # the same A
        lora.add_adapter(model, "a", lora.LoraConfig(r=2, dropout=0.0))
        lora.set_adapter(model, "a")
        trainable = trainable_parameters(model, "a", indicator_rows=True)
        with torch.no_grad():  # B off zero, so that A gets a gradient too
            for p in lora.lora_parameters(model, "a"):
                p.add_(0.1)
        if checkpointed:
            model.checkpoint_blocks()
        model.train()
        samples = reconstruct(examples[:4], examples[4:], tok, ind, 64, 8)
        saved = []  # the elements of every tensor the forward pass keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            loss, _ = train_mod.eq5_loss(model, model.hidden, samples, 1, device,
                                         torch.autocast(device, enabled=False))
        loss.backward()
        grads.append({k: p.grad for k, p in trainable.items()})
        kept.append(sum(saved))
    plain, checkpointed = grads
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7) for k in plain)
    assert all(plain[k].abs().max() > 0 for k in plain), "every trainable tensor has a gradient"
    assert kept[1] < kept[0] / 2, "the blocks' activations are recomputed, not kept"


def test_adapter_and_indicator_rows_have_their_own_learning_rates(tiny_dir, tmp_path):
    # one step of Adam moves every parameter with a gradient by about its learning rate
    cfg = replace(small(tiny_dir, tmp_path / "one"), epochs=1, max_train=8, batch_size=12, lr=1e-3,
                  indicator_lr=3e-2)
    run = train(cfg)
    model, tok = load_dir(tiny_dir)
    setup_indicators(model, tok)
    rows = load_file(run / "expert" / "indicators.safetensors")
    assert (rows["embed"] - model.extra_embed).abs().max().item() == pytest.approx(3e-2, rel=1e-3)
    B = [t for k, t in expert_tensors(run).items() if "lora_B" in k]
    assert max(t.abs().max().item()
               for t in B) == pytest.approx(1e-3, rel=1e-3), "B moved from zero by lr"


def test_a_sequence_resumes_at_its_unfinished_stage_and_ends_as_an_uninterrupted_one(
        tiny_dir, tmp_path, monkeypatch):
    cfg = replace(small(tiny_dir, tmp_path / "whole"), previous=[])
    whole = train_sequence(cfg, ["sa", "pe"])  # stage 1: 4 steps; stage 2 (sa rehearsed): 6 steps
    assert (json.loads((whole / "system.json").read_text())["experts"]
            == ["1-sa/expert", "2-pe/expert"])
    assert json.loads((whole / "2-pe" / "config.json").read_text())["previous"] == ["sa"]
    calls, real_scale = [], train_mod.lr_scale

    def crash_in_stage_2(step, total):
        calls.append(step)
        if len(calls) == 4 + 3:  # stage 2, one step past its checkpoint
            raise KeyboardInterrupt
        return real_scale(step, total)
    monkeypatch.setattr(train_mod, "lr_scale", crash_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        train_sequence(replace(cfg, out=str(tmp_path / "cut")), ["sa", "pe"])
    monkeypatch.setattr(train_mod, "lr_scale", real_scale)
    cut = train_sequence(replace(cfg, out=str(tmp_path / "cut")), ["sa", "pe"])
    for stage in ("1-sa", "2-pe"):
        a, b = expert_tensors(whole / stage), expert_tensors(cut / stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    with pytest.raises(UserError, match="other tasks, method or settings"):
        train_sequence(replace(cfg, out=str(tmp_path / "cut"), tau=0.2), ["sa", "pe"])


@pytest.mark.parametrize("method,stages", [
    # (stage directory, task, rehearsed tasks, the stage whose LoRA it starts from)
    ("see", [("1-sa", "sa", [], None), ("2-pe", "pe", ["sa"], None),
             ("3-qa", "qa", ["sa", "pe"], None)]),
    ("non-rehearsal", [("1-sa", "sa", [], None), ("2-pe", "pe", [], "1-sa"),
                       ("3-qa", "qa", [], "2-pe")]),
    ("replay", [("1-sa", "sa", [], None), ("2-pe", "pe", ["sa"], "1-sa"),
                ("3-qa", "qa", ["sa", "pe"], "2-pe")]),
    ("kmeans", [("1-sa", "sa", [], None), ("2-pe", "pe", ["sa"], "1-sa"),
                ("3-qa", "qa", ["sa", "pe"], "2-pe")]),
    ("ssr", [("1-sa", "sa", [], None), ("2-pe", "pe", ["sa"], "1-sa"),
             ("3-qa", "qa", ["sa", "pe"], "2-pe")]),
    ("mtl", [("1-mtl", "qa", ["sa", "pe"], None)]),
    ("stl", [("1-sa", "sa", [], None), ("2-pe", "pe", [], None), ("3-qa", "qa", [], None)]),
])
def test_each_method_arranges_its_stages(tmp_path, monkeypatch, method, stages):
    seen = []

    def record(cfg, on_start):
        seen.append(cfg)
        on_start()
        (Path(cfg.out) / "expert").mkdir(parents=True)
    monkeypatch.setattr(train_mod, "train", record)
    root = train_sequence(TrainConfig(method=method, out=str(tmp_path / method)),
                          ["sa", "pe", "qa"])
    assert [(Path(c.out).name, c.task, c.previous, c.init and Path(c.init).parent.name)
            for c in seen] == stages
    assert (json.loads((root / "system.json").read_text())["experts"]
            == [f"{s[0]}/expert" for s in stages])
    assert all(c.tau == (1.0 if method == "mtl" else 0.1)
               for c in seen), "MTL replays every earlier example"


def test_a_continued_lora_starts_from_the_previous_stage_and_has_no_indicators(tiny_dir, tmp_path):
    cfg = replace(small(tiny_dir, tmp_path / "sa"), method="non-rehearsal", previous=[])
    first = load_expert(train(cfg) / "expert")
    # with lr 1e-30 (an lr must be > 0) the second stage moves no weight by more than
    # 1e-30: its LoRA is where it started
    second = load_expert(train(replace(cfg, task="pe", lr=1e-30,
                                       init=str(tmp_path / "sa" / "expert"),
                                       out=str(tmp_path / "pe"))) / "expert")
    assert (first.adapter.keys() == second.adapter.keys()
            and any(v.abs().max() > 0 for v in first.adapter.values()))
    assert all(torch.allclose(first.adapter[k], second.adapter[k], rtol=0, atol=1e-25)
               for k in first.adapter)
    assert second.indicator == "none" and second.rows == {}


def test_pseudo_negatives_are_as_many_lima_queries_as_rehearsal_would_draw():
    cfg = TrainConfig(task="qa", previous=["sa", "pe"], tau=0.1, max_train=40)
    _, negatives, _ = training_data(cfg)
    _, pseudo, sources = training_data(replace(cfg, negatives="lima"))
    lima = {ex.query for ex in load_ood(split="train")}
    assert len(pseudo) == len(negatives) == 8 and all(ex.query in lima for ex in pseudo)
    assert sources == ["LIMA: 8 pseudo-negatives in place of sa: 4 of 40 drawn at random; pe: 4 of "
                       "40 drawn at random"]
    with pytest.raises(UserError, match="for --method see only"):
        train(replace(cfg, negatives="lima", method="replay"))
    with pytest.raises(UserError, match="LIMA has only 829 to spare"):
        training_data(replace(cfg, negatives="lima", tau=1.0, max_train=None))


def test_a_run_written_without_a_setting_is_refused_naming_it(tiny_dir, tmp_path):
    cfg = small(tiny_dir, tmp_path / "old")
    (tmp_path / "old").mkdir()
    written = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "negatives"}
    (tmp_path / "old" / "config.json").write_text(json.dumps(written))
    with pytest.raises(UserError, match="config.json: no setting 'negatives'"):
        runs.resume_state(cfg)


def test_general_negatives_are_lima_queries_rb_lima_does_not_score_for_every_expert(tiny_dir):
    cfg = TrainConfig(task="qa", tau=0.1, max_train=40, general_negatives=5)
    current, first, sources = training_data(cfg)  # E_1: no earlier task, five negatives
    scored = {ex.query for ex in load_ood(split="eval")}
    pool = {ex.query for ex in load_ood(split="train")}
    assert len(first) == 5 and all(ex.query in pool - scored for ex in first)
    assert sources == ["LIMA: 5 general queries as negatives"]
    _, later, _ = training_data(replace(cfg, task="qg", previous=["qa"]))
    assert len(later) == 4 + 5 and [ex.query for ex in later[4:]] == [ex.query for ex in first]
    model, tok = load_dir(tiny_dir)
    ind = setup_indicators(model, tok)
    samples = reconstruct(current, first, tok, ind, 64, 8)
    assert sum(s.ids[s.start:] == ind.neg for s in samples) == 5, "each one a (q, <<neg>>) sample"
    for bad in (dict(method="replay"), dict(negatives="lima")):
        with pytest.raises(UserError, match="--general-negatives"):
            check_config(replace(cfg, **bad))


def test_a_diverged_run_stops_naming_its_step_and_writes_no_expert(tiny_dir, tmp_path):
    # representable in float32, but its pull's gradient is not
    cfg = replace(small(tiny_dir, tmp_path / "r"), method="moses", previous=[], pull_weight=3e38)
    with pytest.raises(UserError, match=r"step 1: loss .*, gradient norm inf: training diverged"):
        train(cfg)
    assert not (tmp_path / "r" / "expert").exists()
    logged = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged), "the diverged step is not logged"


def test_a_quick_look_has_its_own_default_directory():
    assert TrainConfig(task="qa").run_dir() == Path("runs/qa-smollm2-135m")
    assert TrainConfig(task="qa", max_train=320).run_dir() == Path("runs/qa-train320-smollm2-135m")
    root, _, _ = runs.plan_sequence(TrainConfig(max_train=200), ["qa", "qg"])
    assert root == Path("runs/see-tau0.1-train200-qa-qg-smollm2-135m")


def run_cli(args, tiny_dir):
    """train.py in a child process, in fp32 unless args say otherwise: the child's default dtype
    follows the host CPU, which conftest's pin does not reach."""
    env = {**os.environ, "SEE_CACHE": str(tiny_dir.parent)}
    args = [*args, "--dtype", "float32"] if "--dtype" not in args else args
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["--task", "qq"], "error: unknown task 'qq'; known: qa, qg, sa"),
    (["--task", "sa", "--batch-size", "30", "--micro-batch", "4"],
     "error: --batch-size 30 must be a multiple of --micro-batch 4"),
    (["--task", "sa", "--max-source", "2000", "--max-target", "512"],
     "error: --max-source 2000 + --max-target 512 exceed"),
    (["--sequence", "sa,pe", "--max-source", "2000", "--max-target", "512"],
     "error: --max-source 2000 + --max-target 512 exceed"),
    (["--task", "sa", "--micro-batch", "0"], "error: need positive counts, --general-negatives"),
    (["--task", "sa", "--previous", "pe,sa"], "error: task 'sa' cannot also be an earlier task"),
    (["--task", "sa", "--max-target", "2"], "error: --max-target 2 leaves no room for a response"),
    (["--task", "sa", "--method", "moses", "--sparsity", "1.5"],
     "error: need 1 <= top-k <= experts, 0 < sparsity <= 1"),
    (["--order", "1", "--init", "x"], "error: --init is for one stage"),
    (["--task", "sa", "--method", "moses", "--previous", "pe"], "error: MoSEs rehearses nothing"),
    (["--task", "sa", "--method", "seta", "--anchor-weight", "-1"],
     "error: need learning rates > 0, weights >= 0 and nothing beyond float32's 3.4e+38, got "
     "--anchor-weight -1"),
    (["--task", "sa", "--method", "seta", "--shared-experts", "0"],
     "error: SETA needs --shared-experts >= 1"),
    (["--task", "sa", "--method", "seta", "--previous", "pe"],
     "error: SETA with --previous needs --init"),
])
@pytest.mark.slow
def test_bad_arguments_are_one_line_of_error(tiny_dir, tmp_path, args, message):
    out = run_cli(["--model", "tiny", "--out", str(tmp_path / "r"), *args], tiny_dir)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(message)
    assert not (tmp_path / "r").exists(), "a run that never started leaves nothing behind"


def per_token_nll(model, batch):
    from train import collate
    x, y = collate(batch, "cpu")
    nll = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                                            reduction="none").view(y.shape)
    return [nll[i][y[i] != -100] for i in range(len(batch))]


def test_length_grouped_micro_batches_leave_every_tokens_loss_as_alone(tiny):
    from experts import reconstruct
    model, tok = tiny
    ind = setup_indicators(model, tok)
    examples = load_task("sa", "train")[:6] + load_task("pe", "train")[:6]
    samples = sorted(reconstruct(examples[:8], examples[8:], tok, ind, 96, 8),
                     key=lambda s: len(s.ids))
    assert len({len(s.ids) for s in samples}) > 3, "lengths differ, so the batch is padded"
    with torch.no_grad():
        together, alone = per_token_nll(model,
                                        samples), [per_token_nll(model, [s])[0] for s in samples]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(together, alone))


@pytest.mark.slow
def test_compiled_training_learns_the_same_expert(tiny_dir, tmp_path, device):
    # without dropout: compiled code draws its dropout masks from another generator
    plain = expert_tensors(train(small(tiny_dir, tmp_path / "plain", dropout=0.0)))
    compiled = expert_tensors(train(small(tiny_dir, tmp_path / "compiled", dropout=0.0,
                                          compile=True)))
    assert all(torch.allclose(plain[k], compiled[k], atol=1e-5) for k in plain)


def torchrun(args, tiny_dir):
    """train.py on two processes. A run that aborted in torch's teardown ("terminate called without
    an active exception": once in CI, never in 160 runs here) runs once more from a clean directory;
    a second abort fails the test."""
    env = {**os.environ, "SEE_CACHE": str(tiny_dir.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "train.py", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return done


@pytest.mark.slow
def test_two_processes_under_torchrun_train_the_expert_one_process_does(tiny_dir, tmp_path):
    args = ["--model", "tiny", "--task", "sa", "--previous", "pe", "--tau", "0.5", "--max-train",
            "16", "--epochs", "2",
            "--batch-size", "8", "--micro-batch", "2", "--max-source", "64", "--max-target", "8",
            "--lr", "1e-2", "--dtype", "float32",  # compared to 1e-6: fp32 on every CPU
            "--dropout", "0"]  # no dropout: each process draws its own masks
    one = run_cli([*args, "--out", str(tmp_path / "one")], tiny_dir)
    two = torchrun([*args, "--out", str(tmp_path / "two")], tiny_dir)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = expert_tensors(tmp_path / "one"), expert_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k), "it did train"
    logs = [(tmp_path / r / "log.jsonl").read_text().splitlines() for r in ("one", "two")]
    assert [json.loads(x)["loss"]
            for x in logs[0]] == pytest.approx([json.loads(x)["loss"] for x in logs[1]], rel=1e-5)


def test_the_micro_batch_size_does_not_change_what_is_learned(tiny_dir, tmp_path):
    # one sequence per forward pass against length-ordered, padded micro-batches of the whole batch
    one = expert_tensors(train(replace(small(tiny_dir, tmp_path / "one", dropout=0.0),
                                       micro_batch=1)))
    eight = expert_tensors(train(replace(small(tiny_dir, tmp_path / "eight", dropout=0.0),
                                         micro_batch=8)))
    assert all(torch.allclose(one[k], eight[k], atol=1e-5) for k in one)


def test_kmeans_selection_keeps_the_points_nearest_each_centroid():
    from rehearsal import kmeans_nearest
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 10
    sizes = [10, 6, 4]
    points = torch.cat([c + torch.randn(n, 8, generator=g) for c, n in zip(centres, sizes)])
    chosen = kmeans_nearest(points, 5, seed=0, clusters=3)
    # slots in proportion to the clusters' sizes (2.5, 1.5, 1: largest remainder), each filled
    # by its cluster's points nearest its mean
    x = torch.nn.functional.normalize(points, dim=-1)
    expected, start = [], 0
    for n, k in zip(sizes, [3, 1, 1]):
        members = x[start:start + n]
        nearest = (members - members.mean(0)).norm(dim=-1).argsort()[:k] + start
        expected += nearest.tolist()
        start += n
    assert chosen == sorted(expected)


def test_kmeans_sel_replays_as_many_as_randsel(tiny_dir, tmp_path, capsys):
    train(small(tiny_dir, tmp_path / "k", method="kmeans"))
    assert "rehearsed: pe: 8 of 16 nearest k-means centroids" in capsys.readouterr().out


def test_ssr_reads_the_instance_the_base_model_wrote():
    from rehearsal import parse_synthetic
    assert parse_synthetic(" a new review\nOutput: positive\n\nInput: more") == ("a new review",
                                                                                  "positive")
    assert parse_synthetic(" only an input, no output") is None
    assert parse_synthetic("\nOutput: no input") is None


def test_ssr_writes_with_the_base_model_and_answers_with_the_latest(tiny, tmp_path, monkeypatch):
    import lora
    import rehearsal
    model, tok = tiny
    cfg = replace(small(tmp_path, tmp_path / "r", method="ssr"), task="qa", previous=["sa"],
                  max_source=512)
    lora.add_adapter(model, cfg.name, lora.LoraConfig(r=2, alpha=4.0, dropout=0.0,
                                                      targets=("q_proj",)))
    lora.set_adapter(model, cfg.name)
    calls = []

    def fake_generate(model, prompts, max_new_tokens, eos_ids, batch_size, desc):
        active = {m.active for m in lora.lora_layers(model).values()}
        calls.append((active, [tok.decode(p) for p in prompts]))
        if "synthesised" in desc:  # the base model's instances: three distinct inputs, repeated
            return [tok.encode(f" new input {i % 3}\nOutput: x", bos=False)
                    for i in range(len(prompts))]
        return [tok.encode(f"answer {i}", bos=False) for i in range(len(prompts))]
    monkeypatch.setattr(rehearsal, "generate_batched", fake_generate)
    examples, sources = rehearsal.ssr_rehearsal(model, tok, cfg, "plain")
    (written_by, synthesis), (answered_by, refinement) = calls
    assert written_by == {None} and answered_by == {cfg.name}
    demos = 16  # SSR's 1% sample (20 of sa's 2000), of the 16 examples --max-train keeps
    assert len(synthesis) == len(set(synthesis)) > 0.9 * demos * (demos - 1), (
        "every ordered pair of demonstrations that fits --max-source")
    assert all(p.count("Input:") == 3 and p.endswith(("Output: negative\n\nInput:",
                                                       "Output: positive\n\nInput:"))
               for p in synthesis), "definition, two demonstrations, and Input: to continue"
    n = min(3, len(rehearsal.rehearsal_sets(["sa"], 0.5, 0, 16)[0]))
    assert sorted(ex.query[-11:] for ex in examples) == [f"new input {i}" for i in range(n)]
    assert [ex.outputs for ex in examples] == [[f"answer {i}"] for i in range(n)]
    assert all(p.endswith("Output:") for p in refinement)
    assert sources == [f"sa: {n} of 3 instances synthesised from {demos} demonstrations"]


def test_ssr_demonstrates_one_percent_of_the_papers_set_where_only_samples_ship(tiny, tmp_path,
                                                                               monkeypatch):
    import lora
    import rehearsal
    model, tok = tiny
    monkeypatch.setattr(rehearsal, "generate_batched", lambda model, prompts, *a, **kw: [
        tok.encode(f" input {i}\nOutput: x", bos=False) for i in range(len(prompts))])
    cfg = replace(small(tmp_path, tmp_path / "r", method="ssr"), task="qa", previous=["qg"],
                  max_train=None, max_source=4096)  # qg ships 200 of the paper's 2,000 examples
    lora.add_adapter(model, cfg.name, lora.LoraConfig(r=2, alpha=4.0, dropout=0.0,
                                                      targets=("q_proj",)))
    _, sources = rehearsal.ssr_rehearsal(model, tok, cfg, "plain")
    assert sources[0].endswith("synthesised from 20 demonstrations"), sources


def test_ssr_writes_each_earlier_task_once_per_sequence(tiny, tmp_path, monkeypatch):
    import lora
    import rehearsal
    model, tok = tiny
    (tmp_path / "seq").mkdir()
    (tmp_path / "seq" / "system.json").write_text("{}")
    written = []

    def fake_generate(model, prompts, max_new_tokens, eos_ids, batch_size, desc):
        written.append(desc)
        return [tok.encode(f" input {i}\nOutput: x", bos=False) for i in range(len(prompts))]
    monkeypatch.setattr(rehearsal, "generate_batched", fake_generate)
    stages = []
    for stage, task in (("2-qa", "qa"), ("3-pe", "pe")):
        cfg = replace(small(tmp_path, tmp_path / "seq" / stage, method="ssr"), task=task,
                      previous=["sa"], max_source=512)
        lora.add_adapter(model, cfg.name, lora.LoraConfig(r=2, alpha=4.0, dropout=0.0,
                                                          targets=("q_proj",)))
        stages.append(rehearsal.ssr_rehearsal(model, tok, cfg, "plain"))
    assert written == ["SSR: sa synthesised", "SSR: sa refined", "SSR: sa refined"]
    assert [ex.query for ex in stages[0][0]] == [ex.query for ex in stages[1][0]]
    assert stages[0][1] == stages[1][1]
    assert (tmp_path / "seq" / "ssr-sa.json").exists()


def test_ssr_trains_on_its_synthetic_instances(tiny_dir, tmp_path, capsys):
    train(replace(small(tiny_dir, tmp_path / "s", method="ssr"), max_source=256))
    assert "instances synthesised from" in capsys.readouterr().out
