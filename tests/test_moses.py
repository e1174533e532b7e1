"""MoSEs: per-task masks over sparse sub-experts, earlier tasks frozen,
prompt keys pick the task."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
import torch

import lora
from checkpoint import load_dir
from data import load_task
from errors import UserError
from evaluate import evaluate_run
from experts import TRAINING_FILE, load_expert, prompt_ids
from gate import match_keys, query_features
from router import key_route
from train import TrainConfig, train, train_sequence


def layer(sparsity=0.3, seed=0):
    torch.manual_seed(seed)
    return lora.SubExpertLinear(torch.nn.Linear(16, 12), lora.LoraConfig(r=4, dropout=0.0),
                                lora.SubExpertConfig(experts=2, top_k=2, sparsity=sparsity))


@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_a_tasks_mask_keeps_the_top_share_of_each_weight_tensor(sparsity):
    m = layer(sparsity)
    m.finish_task("a")
    for k in lora.MASKED:
        mask, scores = m.masks["a"][k], m.scores[k].detach().abs()
        assert mask.sum() == round(sparsity * mask.numel())
        assert scores[mask].min() >= scores[~mask].max(), "the kept weights are the best scored"


def test_weights_an_earlier_mask_holds_never_move(device):
    m = layer().to(device)
    m.finish_task("a")
    before = {k: getattr(m, k).detach().clone() for k in lora.MASKED}
    m.learning = True
    # as train.py builds it: fused on CUDA
    opt = torch.optim.AdamW(lora.subexpert_parameters(m), lr=0.1, weight_decay=0.0,
                            fused=device == "cuda")
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 16, device=device)).square().sum().backward()
        opt.step()
    for k in lora.MASKED:
        held, now = m.masks["a"][k], getattr(m, k).detach()
        assert torch.equal(now[held], before[k][held]), k
    assert not torch.equal(m.B, before["B"]), "the free weights do learn"


def loaded(expert, tiny_dir):
    """The expert's MoSE layers, put in place on a fresh tiny model."""
    model, _ = load_dir(tiny_dir)
    expert.attach(model)
    expert.use(model)
    return lora.subexpert_layers(model)


@pytest.mark.slow
def test_held_weights_stay_put_through_the_training_loop(moses_runs, tiny_dir):
    first, second = (loaded(stage(moses_runs[0.1], i), tiny_dir) for i in (1, 2))
    for path, m in first.items():
        for k in lora.MASKED:
            held = getattr(m, f"used_{k}")
            assert torch.equal(getattr(m, k)[held], getattr(second[path], k)[held]), (path, k)
            assert torch.equal(m.masks["colour"][k], second[path].masks["colour"][k])
    assert any(not torch.equal(getattr(m, k), getattr(second[p], k)) for p,
               m in first.items() for k in lora.MASKED)


def test_a_new_tasks_mask_has_trainable_room_from_its_first_step(moses_runs):
    # log line 1 holds the share of the live mask that is free, before the first update
    for i in (2, 3):
        run = next(moses_runs[0.1].glob(f"{i}-*"))
        first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
        assert first["mask_trainable"] > 0.3, f"stage {i}: the new mask starts almost wholly held"


def test_redrawn_scores_put_free_weights_in_a_new_tasks_mask_in_proportion():
    m = layer()
    m.finish_task("a")
    m.learning = True
    before = lora.free_share(m)
    lora.redraw_scores(m, torch.Generator().manual_seed(1))
    assert before == 0.0, "carried scores: the new mask is the last task's, all held"
    assert lora.free_share(m) == pytest.approx(0.7,
                                               abs=0.1), "a fresh draw: 70% of the weights are free"


def test_bit_packing_round_trips_and_matches_numpy():
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = lora.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert packed.tolist() == numpy.packbits(mask.numpy()).tolist()
    assert torch.equal(lora.unpack_bits(packed, mask.numel()).view(3, 7), mask)


def test_without_a_task_the_layer_is_the_base_layer():
    m = layer()
    x = torch.randn(3, 16)
    assert torch.equal(m(x), m.base(x))


@pytest.fixture(scope="module")
def moses_runs(tiny_dir, synthetic_tasks, tmp_path_factory):
    """MoSEs over the three synthetic tasks, with the pull constraint on and off."""
    root = tmp_path_factory.mktemp("moses")
    cfg = TrainConfig(model=str(tiny_dir), method="moses", max_train=32, epochs=20, batch_size=16,
                      micro_batch=16, lr=3e-2, max_source=96, max_target=8)
    return {w: train_sequence(replace(cfg, pull_weight=w, out=str(root / f"pull{w}")),
                              synthetic_tasks) for w in (0.1, 0.0)}


def stage(run, i):
    return load_expert(next(run.glob(f"{i}-*")) / "expert")


def test_an_earlier_tasks_outputs_are_bit_identical_after_later_tasks(moses_runs, tiny_dir,
                                                                      synthetic_tasks):
    run = moses_runs[0.1]
    model, tok = load_dir(tiny_dir)
    first, last = stage(run, 1), stage(run, 3)
    first.attach(model)
    xs = [torch.tensor([prompt_ids(tok, ex.query, 96)])
          for ex in load_task(synthetic_tasks[0], "eval")[:4]]
    outputs = []
    for e in (first, last):  # the system after stage 1, then after stage 3, both given task 1 (TIL)
        e.use(model)
        lora.set_task(model, first.name)
        outputs.append([model(x) for x in xs])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    lora.set_task(model, last.name)
    assert not torch.equal(model(xs[0]),
                           outputs[0][0]), "another task's masks compute something else"


def key_accuracy(run, tiny_dir, tasks, eval_queries):
    model, tok = load_dir(tiny_dir)
    last = stage(run, len(tasks))
    last.attach(model)
    last.use(model)
    prompts, gold = eval_queries(tok, tasks)
    return sum(r == g for r, g in zip(match_keys(query_features(model, prompts), last.keys),
                                      gold)) / len(gold)


def test_the_pull_constraint_aligns_keys_with_their_tasks(moses_runs, tiny_dir, synthetic_tasks,
                                                          eval_queries):
    assert key_accuracy(moses_runs[0.0], tiny_dir, synthetic_tasks,
                        eval_queries) < 0.9, "random keys: task identification degrades"
    assert key_accuracy(moses_runs[0.1], tiny_dir, synthetic_tasks, eval_queries) >= 0.95


def inference_bytes(run, i):
    return sum(f.stat().st_size
               for f in (next(run.glob(f"{i}-*")) / "expert").iterdir() if f.name != TRAINING_FILE)


def one_lora_bytes(tiny_dir, tmp_path):
    """Bytes on disk of a real LoRA adapter of the runs' rank and targets on the tiny model."""
    model, _ = load_dir(tiny_dir)
    lora.add_adapter(model, "one", lora.LoraConfig())
    lora.write_adapter(lora.adapter_state(model, "one"), lora.LoraConfig(), tmp_path / "one",
                       str(tiny_dir))
    return sum(f.stat().st_size for f in (tmp_path / "one").iterdir())


def test_bytes_on_disk_grow_sublinearly_against_a_lora_per_task(moses_runs, tiny_dir, tmp_path):
    lora_size, sizes = one_lora_bytes(tiny_dir, tmp_path), [inference_bytes(moses_runs[0.1], i)
                                                  for i in (1, 2, 3)]
    assert all(size < (i + 1) * lora_size for i, size in enumerate(sizes)), (sizes, lora_size)
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert 0 < growth[1] < growth[0] < lora_size, f"each task adds less than the last: {growth}"


def test_a_dropped_training_state_leaves_inference_alone_and_refuses_a_next_stage(
        moses_runs, tiny_dir, tmp_path, synthetic_tasks):
    kept = next(moses_runs[0.1].glob("2-*")) / "expert"
    dropped = tmp_path / "expert"
    shutil.copytree(kept, dropped)
    (dropped / TRAINING_FILE).unlink()
    model, tok = load_dir(tiny_dir)
    prompts = [prompt_ids(tok, ex.query, 96) for ex in load_task(synthetic_tasks[0], "eval")[:4]]
    answers = []
    for e in (load_expert(kept), load_expert(dropped)):
        if not answers:
            e.attach(model)
        e.use(model)
        answers.append(key_route(model, e.keys, prompts, 3, tok.eos_ids))
    assert answers[0] == answers[1]
    cfg = TrainConfig(model=str(tiny_dir), method="moses", task=synthetic_tasks[2],
                      init=str(dropped), out=str(tmp_path / "3"))
    with pytest.raises(UserError, match=TRAINING_FILE):
        train(cfg)


def test_evaluation_reports_til_tail_and_parameters_per_stage(moses_runs, tiny_dir, tmp_path,
                                                              check_stage_parameters):
    result, predictions = evaluate_run(moses_runs[0.1], max_eval=4, max_new_tokens=3)
    assert ([len(row) for row in result["til_scores"]] == [len(row) for row in result["scores"]]
            == [1, 2, 3])
    assert result["til_bwt"] == 0.0, "TIL: the earlier tasks' masks and weights are untouched"
    assert result["task_id_accuracy"] == pytest.approx(
        sum(p["route"] == Path(p["task"]).stem for p in predictions) / len(predictions))
    # the key: one row of dim 64
    check_stage_parameters(moses_runs[0.1], result["parameters"], extra=lambda i: 64)
    assert result["parameters"][0]["lora_bytes"] == one_lora_bytes(tiny_dir, tmp_path)
